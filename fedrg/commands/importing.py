"""``fedrg import``: a GDC download + DICOM series -> a fedrg cohort (fedrg/data/importers)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedrg.errors import FedrgError


def _marker_map(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        marker, sep, column = item.partition("=")
        if not sep or not marker.strip() or not column.strip():
            raise typer.BadParameter(f"--marker {item!r} must look like MARKER=CLINICAL_COLUMN, "
                                     "e.g. mgmt_methylated=mgmt_status")
        out[marker.strip()] = column.strip()
    return out


def import_cohort(
    gdc_dir: Path = typer.Argument(..., help="GDC download folder (STAR - Counts TSVs, MAF, sample sheet, clinical.tsv)"),
    dicom: Path = typer.Option(..., "--dicom", help="folder of DICOM series (PatientID = case_submitter_id)"),
    out: Path = typer.Option(..., "--out", help="cohort folder to create (must be new or empty)"),
    expression_column: str = typer.Option("tpm_unstranded", "--expression-column",
                                          help="STAR - Counts column: tpm_unstranded, unstranded, fpkm_unstranded..."),
    marker: list[str] | None = typer.Option(None, "--marker",
                                            help="MARKER=CLINICAL_COLUMN, e.g. mgmt_methylated=mgmt_status (repeatable)"),
    series_description: str | None = typer.Option(None, "--series-description",
                                                  help="keep series whose description contains this, e.g. FLAIR"),
    sample_sheet: Path | None = typer.Option(None, "--sample-sheet", help="GDC sample sheet (default: found in GDC_DIR)"),
    clinical: Path | None = typer.Option(None, "--clinical", help="GDC clinical TSV (default: found in GDC_DIR)"),
    config: Path | None = typer.Option(None, "--config", help="experiment TOML (data section: panel, genes, markers)"),
    set_: list[str] | None = typer.Option(None, "--set", help="override, e.g. data.markers=[...]"),
) -> None:
    """Import a GDC download plus DICOM series as a cohort; list every case it cannot match."""
    from fedrg.commands.output import check_output_dir, fail
    from fedrg.config import load_config
    from fedrg.data.importers.build import REPORT_FILE, import_gdc

    console = Console()
    try:
        check_output_dir(out, option="--out")
        cfg = load_config(config, set_ or []).data
        report = import_gdc(gdc_dir, dicom, out, cfg, expression_column=expression_column,
                            marker_columns=_marker_map(marker), series_description=series_description,
                            sample_sheet=sample_sheet, clinical=clinical)
    except FedrgError as err:
        fail(err)
    console.print(f"wrote {out} ({len(report.patients)} patients; report in {out / REPORT_FILE})",
                  highlight=False, soft_wrap=True)
    if report.unmatched:
        console.print(f"[yellow]{len(report.unmatched)} case(s) not imported:[/yellow]", highlight=False)
        for u in report.unmatched:
            console.print(f"  - {u.case} ({u.source}): {u.reason}", highlight=False, markup=False,
                          soft_wrap=True)
    for note in report.notes:
        console.print(f"  note: {note}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"next: fedrg validate {out}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``import`` to ``app``."""
    app.command("import")(import_cohort)
