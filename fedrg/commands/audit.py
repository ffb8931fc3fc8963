"""``fedrg audit``: verify privacy ledgers and recompute epsilon independently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.markup import escape

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
    path: Path | None = typer.Argument(
        None, help="run directory, hospital state directory, or ledger.jsonl file"
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
    keys: Path | None = typer.Option(
        None, "--keys",
        help="key registry you trust (TOML/JSON: hospital = public key, PEM or base64); a "
        "ledger signed by any other key is UNVERIFIED",
    ),
    policy_file: Path | None = typer.Option(
        None, "--policy",
        help="site policy (a hospital TOML with \\[policy], or the policy table): check every "
        "entry's mechanism against it",
    ),
    heads: Path | None = typer.Option(
        None, "--heads",
        help="ledger_heads.json a server kept (default: any found under PATH): report a "
        "ledger that does not extend the last head seen",
    ),
    empirical: bool = typer.Option(
        False, "--empirical",
        help="instead of PATH: train with random canary patients, once with DP-SGD and once "
        "without, and report empirical epsilon lower bounds (docs/audit.md)",
    ),
    cohort: Path | None = typer.Option(
        None, "--cohort", help="--empirical: cohort directory (default: a synthetic cohort "
        "made in a temporary directory)",
    ),
    epsilon: float = typer.Option(2.0, "--epsilon", help="--empirical: target epsilon of the "
                                  "DP run"),
    canaries: int = typer.Option(256, "--canaries", help="--empirical: number of canaries"),
    steps: int = typer.Option(200, "--steps", help="--empirical: training steps per run"),
) -> None:
    """Verify every privacy ledger under PATH: hash chain, signatures, independently
    recomputed epsilon (dp_accounting) and budget. Exits 1 if anything fails.

    With --empirical: audit the training code itself with canaries (Steinke, Nasr and
    Jagielski 2023). Exits 1 if the DP run's empirical lower bound exceeds its accounted
    epsilon."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from fedrg.audit.verify import audit_path

    err_console = Console(stderr=True)
    if empirical:
        _empirical(cohort=cohort, epsilon=epsilon, canaries=canaries, steps=steps,
                   json_out=json_out)
        return
    if path is None:
        err_console.print("[red]error:[/red] give PATH (a run directory, hospital state "
                          "directory or ledger file), or --empirical", highlight=False)
        raise typer.Exit(2)
    if html_out is not None:  # before the audit: its result must not be lost to a bad path
        from fedrg.commands.output import check_output_file, fail

        try:
            check_output_file(html_out, option="--html")
        except FedrgError as err:
            fail(err)
    try:
        policy = None
        if policy_file is not None:
            from fedrg.audit.policy_check import load_policy

            policy = load_policy(policy_file)
        result = audit_path(path, public_key=public_key, policy=policy, keys=keys, heads=heads)
    except FedrgError as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        if json_out:
            typer.echo(json.dumps({"ok": False, "hospitals": []}))
        raise typer.Exit(1) from None
    if html_out is not None:
        from fedrg.audit.report import write_html

        write_html(result, html_out)
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
        raise typer.Exit(0 if result.ok else 1)

    console = Console()  # plain text (no colour codes) when not a terminal
    # Two narrow tables (each fits 80 columns) instead of one wide one.
    compact = {"box": box.SIMPLE_HEAD, "pad_edge": False, "title_justify": "left"}
    table = Table(title=f"Privacy audit of {path}", **compact)
    for col in ("hospital", "rounds", "steps", "eps\nrecorded", "eps\nPLD",
                "eps\nRDP", "budget", "status"):
        table.add_column(col, justify="left" if col == "hospital" else "right",
                         overflow="fold", min_width=10 if col == "hospital" else None)
    mech = Table(title="Recorded mechanism", **compact)
    for col in ("hospital", "runs", "noise multiplier", "sample rate", "delta", "accountant"):
        mech.add_column(col, justify="left" if col == "hospital" else "right",
                        overflow="fold")
    for h in result.hospitals:
        style = "green" if h.ok else "red"
        table.add_row(
            h.hospital, str(h.rounds), f"{h.steps:,}",
            _fmt(h.epsilon_recorded), _fmt(h.epsilon_recomputed_pld),
            _fmt(h.epsilon_recomputed_rdp), _fmt(h.budget, 2),
            f"[{style}]{h.status}[/{style}]",
        )
        mech.add_row(h.hospital, str(h.runs), _span(h.noise_multipliers), _span(h.sample_rates),
                     _span(h.deltas, "{:.1e}"), ", ".join(sorted(set(h.accountants))) or "-")
    console.print(table)
    console.print(mech)
    for h in result.hospitals:  # one line each: the status in full, whatever the width
        style = "green" if h.ok else "red"
        console.print(f"{h.hospital}: [{style}]{h.status}[/{style}] ({h.evaluation_releases} "
                      "evaluation release(s), their epsilon included above)", highlight=False)
    for h in result.hospitals:
        for p in h.problems:
            console.print(f"[red]{h.hospital}:[/red] {escape(p)}", highlight=False)
        for w in h.warnings:
            console.print(f"[yellow]{h.hospital}:[/yellow] {escape(w)}", highlight=False)
    console.print(
        "eps PLD: what dp_accounting's PLD accountant proves from the recorded mechanism "
        "parameters alone (DP-SGD rounds and DP evaluation releases alike); a ledger fails "
        "only if it records less (an understatement). eps RDP: dp_accounting's looser RDP "
        "bound, for information.",
        style="dim", highlight=False,
    )
    if html_out is not None:
        console.print(f"HTML report written to {html_out}", highlight=False)
    if result.ok:
        console.print("[green]audit passed[/green]")
    else:
        console.print("[red]audit FAILED[/red]")
        raise typer.Exit(1)


def _empirical(*, cohort: Path | None, epsilon: float, canaries: int, steps: int,
               json_out: bool) -> None:
    """``fedrg audit --empirical``: a DP run and a non-private run with canaries."""
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from fedrg.audit.empirical import audit_data_config, run_empirical_pair

    err_console = Console(stderr=True)
    try:
        with tempfile.TemporaryDirectory(prefix="fedrg-audit-") as tmp:
            if cohort is None:
                from fedrg.data.synth import synthesize

                cohort = synthesize(Path(tmp), hospitals=1, patients=48, seed=0,
                                    data_cfg=audit_data_config())[0]
                source = "synthetic cohort (48 patients on average, seed 0)"
            else:
                source = str(cohort)
            pair = run_empirical_pair(cohort, target_epsilon=epsilon, canaries=canaries,
                                      steps=steps)
    except FedrgError as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        if json_out:
            typer.echo(json.dumps({"ok": False, "error": str(err)}))
        raise typer.Exit(1) from None
    if json_out:
        typer.echo(json.dumps({**pair.to_json(), "cohort": source}, indent=2))
        raise typer.Exit(0 if pair.ok else 1)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    table = Table(title=f"Empirical privacy audit (one run each, canaries) on {source}")
    for col in ("run", "eps accounted", "eps lower bound", "canaries", "included", "guesses",
                "correct", "noise multiplier", "steps", "seconds"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for name, r in (("DP-SGD", pair.dp), ("non-private", pair.non_private)):
        table.add_row(name, _fmt(r.epsilon_accounted), _fmt(r.epsilon_lower_bound), str(r.m),
                      str(r.included), str(r.guesses), str(r.correct),
                      _fmt(r.noise_multiplier), str(r.steps), f"{r.seconds:.0f}")
    console.print(table)
    dp, np_ = pair.dp, pair.non_private
    console.print(
        f"Lower bounds hold with confidence {1 - dp.beta:.0%} at delta={dp.target_delta:g}. "
        "A DP run whose bound exceeds its accounted epsilon leaks more than it accounts for.",
        style="dim", highlight=False)
    if not pair.powered:
        console.print(
            f"[yellow]inconclusive:[/yellow] the non-private run's bound "
            f"{np_.epsilon_lower_bound:.2f} does not exceed {dp.epsilon_accounted:.2f}, so this "
            "audit could not have caught a leak of that size; use more --canaries or --steps",
            highlight=False)
    if pair.ok:
        console.print(f"[green]audit passed[/green]: DP bound {dp.epsilon_lower_bound:.2f} <= "
                      f"accounted epsilon {dp.epsilon_accounted:.2f}", highlight=False)
    else:
        console.print(f"[red]audit FAILED[/red]: DP bound {dp.epsilon_lower_bound:.2f} > "
                      f"accounted epsilon {dp.epsilon_accounted:.2f}", highlight=False)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``fedrg audit`` to ``app``."""
    app.command("audit")(audit)
