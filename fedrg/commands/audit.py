"""``fedrg audit``: verify privacy ledgers and recompute epsilon independently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from fedrg.errors import FedrgError


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if math.isfinite(x) else "inf"


def _span(values: list[float], fmt: str = "{:.4g}") -> str:
    uniq = sorted(set(values))
    if not uniq:
        return "-"
    return fmt.format(uniq[0]) if len(uniq) == 1 else (
        f"{fmt.format(uniq[0])}-{fmt.format(uniq[-1])}")


def audit(
    path: Path = typer.Argument(
        ..., help="run directory, hospital state directory, or ledger.jsonl file"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON only"),
    html_out: Path | None = typer.Option(
        None, "--html", help="also write a self-contained HTML report to this file"
    ),
    public_key: Path | None = typer.Option(
        None, "--public-key",
        help="Ed25519 public key (PEM) to verify with, instead of ledger_ed25519.pub "
        "next to each ledger",
    ),
) -> None:
    """Verify every privacy ledger under PATH: hash chain, signatures, independently
    recomputed epsilon (dp_accounting) and budget. Exits 1 if anything fails."""
    from rich.console import Console
    from rich.table import Table

    from fedrg.privacy.audit import audit_path

    err_console = Console(stderr=True)
    try:
        result = audit_path(path, public_key=public_key)
    except FedrgError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False)
        if json_out:
            typer.echo(json.dumps({"ok": False, "hospitals": []}))
        raise typer.Exit(1) from None
    if html_out is not None:
        from fedrg.privacy.audit_report import write_html

        write_html(result, html_out)
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
        raise typer.Exit(0 if result.ok else 1)

    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        console = Console(width=170)
    table = Table(title=f"Privacy audit of {path}")
    for col in ("hospital", "runs", "rounds", "steps", "noise multiplier", "sample rate",
                "delta", "eps recorded", "eps recomputed", "eps PLD", "budget", "status"):
        table.add_column(col, justify="left" if col == "hospital" else "right")
    for h in result.hospitals:
        style = "green" if h.ok else "red"
        table.add_row(
            h.hospital, str(h.runs), str(h.rounds), f"{h.steps:,}",
            _span(h.noise_multipliers), _span(h.sample_rates), _span(h.deltas, "{:.1e}"),
            _fmt(h.epsilon_recorded), _fmt(h.epsilon_recomputed),
            _fmt(h.epsilon_recomputed_pld), _fmt(h.budget, 2),
            f"[{style}]{h.status}[/{style}]",
        )
    console.print(table)
    for h in result.hospitals:
        for p in h.problems:
            console.print(f"[red]{h.hospital}:[/red] {p}", highlight=False)
        for w in h.warnings:
            console.print(f"[yellow]{h.hospital}:[/yellow] {w}", highlight=False)
    console.print(
        "eps recomputed: dp_accounting (RDP for rdp ledgers, PLD for prv/gdp), from the "
        "recorded mechanism parameters only; eps PLD: tighter bound, for reference.",
        style="dim", highlight=False,
    )
    if html_out is not None:
        console.print(f"HTML report written to {html_out}", highlight=False)
    if result.ok:
        console.print("[green]audit passed[/green]")
    else:
        console.print("[red]audit FAILED[/red]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``fedrg audit`` to ``app``."""
    app.command("audit")(audit)
