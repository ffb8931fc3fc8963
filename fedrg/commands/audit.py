"""``fedrg audit``: verify privacy ledgers and recompute epsilon independently."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedrg.errors import FedrgError

if TYPE_CHECKING:
    from fedrg.audit.verify import AuditResult


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if math.isfinite(x) else "inf"


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
    """Verify every privacy ledger under PATH: hash chain, signatures,
    independently recomputed epsilon (dp_accounting) and budget, and say what
    the DP guarantee covers.

    \b
    Status per hospital (a verification failure comes first):
      OK           verified; every entry differentially private (DP)
      PARTIAL      verified; some entries were not DP (rounds trained
                   without DP-SGD, exact metric releases): named
      NOT PRIVATE  verified; no entry is DP: there is no epsilon
      TAMPERED, UNVERIFIED, NOT EXTENDING, OVER BUDGET, OUTSIDE POLICY,
      MISMATCH     the audit failed

    \b
    Exit codes:
      0  every hospital OK
      1  a verification failure (or no ledger, or unreadable input)
      3  all verified, but some data was used without DP
         (PARTIAL or NOT PRIVATE)
      2  usage error

    With --empirical: audit the training code itself with canaries
    (Steinke, Nasr and Jagielski 2023). Exits 1 if the DP run's empirical
    lower bound exceeds its accounted epsilon."""
    from fedrg.audit.verify import EXIT_FAILED, audit_path

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
            from fedrg.policy import read_policy_file

            policy = read_policy_file(policy_file)
        result = audit_path(path, public_key=public_key, policy=policy, keys=keys, heads=heads)
    except FedrgError as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        if json_out:
            typer.echo(json.dumps({"ok": False, "hospitals": []}))
        raise typer.Exit(EXIT_FAILED) from None
    if html_out is not None:
        from fedrg.audit.report import write_html

        write_html(result, html_out)
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
        raise typer.Exit(result.exit_code)

    console = Console()  # plain text (no colour codes) when not a terminal
    console.print(_summary_table(result, title=f"Privacy audit of {path}"))
    console.print(_mechanism_table(result))
    for h in result.hospitals:  # one line each: the verdict in full, whatever the width
        style = _STYLE.get(h.status, "red")
        head, _, rest = h.verdict.partition(": ")
        console.print(f"{escape(h.hospital)}: [{style}]{escape(head)}[/{style}]: "
                      f"{escape(rest)}", highlight=False)
    for h in result.hospitals:
        for p in h.problems:
            console.print(f"[red]{escape(h.hospital)}:[/red] {escape(p)}", highlight=False)
        for w in h.warnings:
            console.print(f"[yellow]{escape(h.hospital)}:[/yellow] {escape(w)}",
                          highlight=False)
    console.print(
        "rounds: training rounds (with or without DP); releases: evaluation releases, "
        "counted apart. eps PLD: what dp_accounting's PLD accountant proves from the "
        "recorded mechanism parameters of the DP entries alone (DP-SGD rounds and DP "
        "releases); entries without DP are covered by no epsilon (\"no DP\": none at all). "
        "A ledger fails only if it records less than PLD proves (an understatement). "
        "eps RDP: dp_accounting's looser RDP bound, for information.",
        style="dim", highlight=False,
    )
    if html_out is not None:
        console.print(f"HTML report written to {html_out}", highlight=False)
    status = result.status
    if status == "OK":
        console.print("[green]audit passed[/green]: every ledger verified and every entry "
                      "differentially private", highlight=False)
    elif status == "FAILED":
        console.print("[red]audit FAILED[/red]", highlight=False)
    else:
        console.print(f"[yellow]audit {status}[/yellow]: every ledger verified, but "
                      + ("no hospital's data was protected by differential privacy"
                         if status == "NOT PRIVATE" else
                         "NOT all data was protected by differential privacy (entries "
                         "without DP are named above)"), highlight=False)
    raise typer.Exit(result.exit_code)


_STYLE = {"OK": "green", "PARTIAL": "yellow", "NOT PRIVATE": "yellow"}


def _summary_table(result: AuditResult, *, title: str) -> Table:
    """hospital, training rounds, releases, epsilon (recorded, PLD, RDP), budget, status."""
    table = Table(title=title, **_COMPACT)
    for col in ("hospital", "rounds", "releases", "eps\nrecorded", "eps\nPLD", "eps\nRDP",
                "budget", "status"):
        table.add_column(col, justify="left" if col == "hospital" else "right",
                         overflow="fold", min_width=10 if col == "hospital" else None,
                         no_wrap=col == "status")
    for h in result.hospitals:
        style = _STYLE.get(h.status, "red")
        table.add_row(
            escape(h.hospital), str(h.rounds), str(h.evaluation_releases),
            h.eps(h.epsilon_recorded), h.eps(h.epsilon_recomputed_pld),
            h.eps(h.epsilon_recomputed_rdp), _fmt(h.budget, 2),
            f"[{style}]{h.status}[/{style}]",
        )
    return table


def _mechanism_table(result: AuditResult) -> Table:
    """One row per distinct mechanism (kind, accountant, noise multiplier, sample rate,
    delta) of each hospital, with its rounds or releases and steps; each hospital's rows
    under a line with its name."""
    mech = Table(title="Recorded mechanisms (one row each, per hospital)", **_COMPACT)
    for col in ("mechanism", "rounds or\nreleases", "steps", "noise\nmultiplier",
                "sample\nrate", "delta"):
        mech.add_column(col, justify="left" if col == "mechanism" else "right",
                        overflow="fold")
    for h in result.hospitals:
        mech.add_row(f"[bold]{escape(h.hospital)}[/bold]", "", "", "", "", "")
        for m in h.coverage.mechanisms:
            label = (f"  {m.label} ({m.accountant})" if m.private
                     else f"  [yellow]{m.label}[/yellow]")
            mech.add_row(label, str(m.entries), f"{m.steps:,}", f"{m.noise_multiplier:.4g}",
                         f"{m.sample_rate:.4g}", f"{m.delta:.1e}")
        if not h.coverage.mechanisms:
            mech.add_row("  (nothing recorded)", "", "", "", "", "")
    return mech


_COMPACT: dict[str, Any] = {"box": box.SIMPLE_HEAD, "pad_edge": False, "collapse_padding": True,
                            "title_justify": "left"}


def _empirical(*, cohort: Path | None, epsilon: float, canaries: int, steps: int,
               json_out: bool) -> None:
    """``fedrg audit --empirical``: a DP run and a non-private run with canaries."""
    import tempfile

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
