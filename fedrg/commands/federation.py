"""``fedrg simulate``: a whole federation of synthetic hospitals on Flower's simulation engine."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fedrg.config import ExperimentConfig, SiteConfig, load_config
from fedrg.errors import FedrgError
from fedrg.paths import cache_dir

console = Console()

DEFAULT_SIMULATED_BUDGET = 100.0


def synthetic_cohorts(cfg: ExperimentConfig) -> list[Path]:
    """Synthetic cohorts for ``cfg`` (cached by their recipe; built once, atomically)."""
    from fedrg.data.synth import synthesize

    recipe = {"hospitals": cfg.federation.hospitals, "patients": cfg.data.synthetic_patients,
              "seed": cfg.federation.seed, "data": cfg.data.model_dump(mode="json"),
              "version": 1}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.data.synthetic_dir) if cfg.data.synthetic_dir else cache_dir() / "synthetic" / digest
    dirs = [root / f"hospital-{i}" for i in range(1, cfg.federation.hospitals + 1)]
    if all((d / "manifest.csv").is_file() for d in dirs):
        return dirs
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=root.parent))
    try:
        synthesize(tmp, hospitals=cfg.federation.hospitals, patients=cfg.data.synthetic_patients,
                   seed=cfg.federation.seed, data_cfg=cfg.data)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dirs


def simulated_sites(cohorts: list[Path], state_root: Path, budget: float) -> list[SiteConfig]:
    """One site config per cohort; each hospital's ledger lives in ``state_root/<name>``."""
    sites = []
    for cohort in cohorts:
        if not (cohort / "manifest.csv").is_file():
            raise FedrgError(f"cohort {cohort} has no manifest.csv; point --cohorts at cohort "
                             "directories (see docs/cohort-format.md) or omit it to use synthetic data")
        sites.append(SiteConfig(name=cohort.name, cohort=str(cohort),
                                state_dir=str(state_root / cohort.name), epsilon_budget=budget))
    return sites


def export_ledgers(sites: list[SiteConfig], run_dir: Path) -> Path:
    """Copy each hospital's public ledger files into ``run_dir/ledgers/<name>/`` for auditors.

    Only the ledger, its signed head and the public key are copied; the signing key stays
    in the hospital's state directory.
    """
    out = run_dir / "ledgers"
    for site in sites:
        src = Path(site.state_dir)
        if not (src / "ledger.jsonl").is_file():
            continue
        dst = out / site.name
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("ledger.jsonl", "ledger_head.json", "ledger_ed25519.pub"):
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
    return out


def _print_round(row: dict[str, Any], markers: list[str]) -> None:
    auroc = row.get("auroc") or {}
    eps = row.get("epsilon") or {}
    parts = [f"[bold]round {row['round']}[/bold]",
             f"hospitals {row.get('participants', 0)}",
             f"loss {row['loss']:.3f}" if row.get("loss") is not None else "loss -",
             *(f"AUROC {m} {auroc[m]:.3f}" for m in markers if auroc.get(m) is not None),
             f"findings F1 {row['findings_f1']:.3f}" if row.get("findings_f1") is not None else "",
             f"max eps {max(eps.values()):.2f}" if eps else "",
             f"{row.get('seconds', 0):.1f}s"]
    if row.get("declined"):
        parts.append(f"[yellow]declined: {', '.join(row['declined'])}[/yellow]")
    if row.get("reason"):
        parts.append(f"[red]{row['reason']}[/red]")
    console.print("  ".join(p for p in parts if p))


def register(app: typer.Typer) -> None:
    """Add ``simulate``."""

    @app.command()
    def simulate(
        config: Path | None = typer.Option(None, "--config", "-c", help="TOML config (configs/simulation.toml)"),
        hospitals: int | None = typer.Option(None, help="number of simulated hospitals"),
        rounds: int | None = typer.Option(None, help="number of federated rounds"),
        out: Path | None = typer.Option(None, "--out", help="run directory (default runs/sim-<time>)"),
        resume: Path | None = typer.Option(None, "--resume", help="continue this interrupted run"),
        cohorts: list[Path] | None = typer.Option(None, "--cohort", help="use these cohorts instead of synthetic ones"),
        state_dir: Path | None = typer.Option(None, help="root of the simulated hospitals' state (ledgers)"),
        budget: float = typer.Option(DEFAULT_SIMULATED_BUDGET, help="lifetime epsilon budget of each simulated hospital"),
        set_: list[str] | None = typer.Option(None, "--set", help="override: section.key=value"),
        ray_address: str | None = typer.Option(
            None, "--ray-address", help="run the hospitals on this existing Ray cluster "
            "(e.g. 127.0.0.1:6379 from 'ray start --head'); default: a private local Ray"),
    ) -> None:
        """Run a simulated federation of hospitals (synthetic cohorts by default)."""
        from fedrg.federated.report import round_table
        from fedrg.flower.simulation import run_simulated_federation

        try:
            overrides = list(set_ or [])
            if resume is not None:
                if not (resume / "config.json").is_file():
                    raise FedrgError(f"--resume {resume}: no config.json there; pass a run directory "
                                     "written by fedrg simulate")
                cfg = load_config(resume / "config.json", overrides)
                run_dir = resume
            else:
                if cohorts:  # the cohorts given decide the federation's size (validated below)
                    hospitals = len(cohorts)
                if hospitals is not None:
                    overrides.append(f"federation.hospitals={hospitals}")
                    if hospitals < 2 and not any(o.startswith("federation.min_hospitals") for o in overrides):
                        overrides.append(f"federation.min_hospitals={hospitals}")
                if rounds is not None:
                    overrides.append(f"federation.rounds={rounds}")
                cfg = load_config(config, overrides)
                run_dir = out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
                if (run_dir / "checkpoint").exists():
                    raise FedrgError(f"run directory {run_dir} already holds a run; use --resume "
                                     f"{run_dir} to continue it or choose another --out")
            if cohorts:
                cohort_dirs = list(cohorts)
            else:
                with console.status("preparing synthetic cohorts (cached after the first run)"):
                    cohort_dirs = synthetic_cohorts(cfg)
            state_root = state_dir or cache_dir() / "sites" / hashlib.sha256(
                str(sorted(map(str, cohort_dirs))).encode()).hexdigest()[:16]
            sites = simulated_sites(cohort_dirs, state_root, budget)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
            with console.status("preparing the base model (built once, then cached)"):
                from fedrg.model.base import load_base

                load_base(cfg.model.base)
            console.print(f"[bold]fedrg simulate[/bold]: {cfg.federation.hospitals} hospitals, "
                          f"{cfg.federation.rounds} rounds, DP {'on' if cfg.privacy.enabled else 'OFF'}"
                          f" (target epsilon {cfg.privacy.target_epsilon}), secure aggregation "
                          f"{'on' if cfg.secagg.enabled else 'OFF'}; run directory {run_dir}")
            t0 = time.perf_counter()
            result = run_simulated_federation(
                cfg, run_dir, sites, resume=resume is not None,
                on_round=lambda row: _print_round(row, cfg.data.markers), ray_address=ray_address)
            export_ledgers(sites, run_dir)
        except FedrgError as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(2) from None
        rounds_rows = result.metrics["rounds"]
        console.print(round_table(rounds_rows, cfg.data.markers))
        if rounds_rows and rounds_rows[-1].get("epsilon"):
            eps = rounds_rows[-1]["epsilon"]
            console.print("epsilon spent this run: " + ", ".join(
                f"{h} {v:.3f}" for h, v in sorted(eps.items()))
                + f" (target {cfg.privacy.target_epsilon})")
        if result.stopped_early:
            console.print(f"[yellow]stopped early:[/yellow] {result.stopped_early}")
        console.print(f"done in {time.perf_counter() - t0:.0f}s: {run_dir}/metrics.json, "
                      f"{run_dir}/adapter (fedrg predict --adapter {run_dir}/adapter ...), "
                      f"{run_dir}/plots/*.png; hospital ledgers in {state_root} "
                      f"(copies for auditors: fedrg audit {run_dir})")
