"""``fedrg synth`` and ``fedrg validate``: synthetic cohorts and cohort checking."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedrg.errors import FedrgError


def _data_cfg(config: Path | None, overrides: list[str] | None):
    from fedrg.config import load_config

    return load_config(config, overrides or []).data


def synth(
    out: Path = typer.Option(..., "--out", help="output folder (hospital-1..N are written in it)"),
    hospitals: int = typer.Option(3, "--hospitals", min=1, help="number of hospital cohorts"),
    patients: int = typer.Option(60, "--patients", min=1, help="mean patients per hospital"),
    seed: int = typer.Option(0, "--seed", help="same seed, same bytes"),
    config: Path | None = typer.Option(None, "--config", help="experiment TOML (data section)"),
    set_: list[str] | None = typer.Option(None, "--set", help="override, e.g. data.gene_panel=[...]"),
    world: str | None = typer.Option(
        None, "--world", help="'public' (the public pre-training cohorts' world) or 'shifted' "
        "(other scanners, expression platform, case mix and associations; docs/cohort-format.md); "
        "default: data.world of --config / --set, else 'shifted', like `fedrg simulate`"),
) -> None:
    """Write synthetic glioma radiogenomics cohorts (NIfTI/DICOM, TSV, VCF, manifest)."""
    from fedrg.commands.output import check_output_dir, fail
    from fedrg.data.synth import synthesize
    from fedrg.data.worlds import check_world

    console = Console()
    try:
        check_output_dir(out, option="--out")
        if world is not None:
            check_world(world, setting="--world")
        cfg = _data_cfg(config, [*(set_ or []), *([f"data.world={world}"] if world is not None else [])])
        dirs = synthesize(out, hospitals=hospitals, patients=patients, seed=seed, data_cfg=cfg,
                          world=cfg.world)
    except FedrgError as err:
        fail(err)
    for d in dirs:
        n = sum(1 for _ in (d / "manifest.csv").open()) - 1
        console.print(f"wrote {d} ({n} patients, {cfg.world} world)", highlight=False)


def validate(
    cohort_dir: Path = typer.Argument(..., help="cohort folder holding manifest.csv"),
    config: Path | None = typer.Option(None, "--config", help="experiment TOML (data section)"),
    set_: list[str] | None = typer.Option(None, "--set", help="override, e.g. data.image_mode=3d"),
) -> None:
    """Read every file of a cohort, print a summary, exit 1 listing all problems."""
    from fedrg.commands.output import fail
    from fedrg.data.validate import format_prevalence, validate_cohort

    console = Console()
    try:
        cfg = _data_cfg(config, set_)
    except FedrgError as err:
        fail(err)
    result = validate_cohort(cohort_dir, cfg)
    s = result.summary
    table = Table(title=f"cohort {cohort_dir}", show_header=False)
    table.add_row("patients", str(s.patients))
    for m, (pos, known) in s.marker_prevalence.items():
        table.add_row(f"{m} (positive/known)", format_prevalence(pos, known))
    if s.has_expression:
        table.add_row("panel genes found", f"{len(s.genes_found)}/{len(cfg.gene_panel)}")
        if s.genes_missing:
            verb = "imputed" if cfg.impute_missing_genes else "missing"
            table.add_row(f"genes {verb}", ", ".join(s.genes_missing))
    else:
        table.add_row("genomics", "no genomics/expression.tsv (images only)")
    if s.has_variants:
        table.add_row("mutations", ", ".join(f"{g} {n}" for g, n in s.mutation_counts.items()))
    table.add_row("image formats", ", ".join(f"{k} {v}" for k, v in s.image_formats.items()))
    table.add_row("image shapes (read)", ", ".join(f"{k} ({v})" for k, v in s.image_shapes.items()))
    table.add_row("tensor shape", "x".join(map(str, s.tensor_shape)) + f" ({cfg.image_mode})")
    table.add_row("empty reports", str(s.empty_reports))
    console.print(table)
    for w in result.warnings:
        console.print(Text.assemble(("warning:", "yellow"), f" {w}"), highlight=False,
                      soft_wrap=True)
    if result.problems:
        console.print(f"[red]{len(result.problems)} problem(s):[/red]", highlight=False)
        for p in result.problems:
            console.print(f"  - {p}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)
    warned = f" ({len(result.warnings)} warning(s) above)" if result.warnings else ""
    console.print(f"[green]ok[/green]: cohort is valid{warned}")


def register(app: typer.Typer) -> None:
    """Add ``synth`` and ``validate`` to ``app``."""
    app.command("synth")(synth)
    app.command("validate")(validate)
