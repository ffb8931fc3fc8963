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
from fedrg.federated.checkpoint import completed_rounds
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


SITES_RECORD = "sites.json"


def write_sites_record(run_dir: Path, cohorts: list[Path], state_root: Path,
                       budget: float) -> None:
    """Remember where the run's hospitals keep their ledgers, so ``--resume`` reuses them."""
    record = {"cohorts": [str(Path(c).resolve()) for c in cohorts],
              "state_root": str(Path(state_root).resolve()), "budget": budget}
    (run_dir / SITES_RECORD).write_text(json.dumps(record, indent=2))


def read_sites_record(run_dir: Path) -> dict[str, Any] | None:
    """The record :func:`write_sites_record` left in ``run_dir`` (None for older runs)."""
    path = run_dir / SITES_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return {"cohorts": [Path(c) for c in data["cohorts"]],
                "state_root": Path(data["state_root"]), "budget": float(data["budget"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FedrgError(f"{path} is unreadable ({err}); it records where the run's "
                         "hospitals keep their ledgers. Restore it or start a new run") from None


def _print_round(row: dict[str, Any], markers: list[str], steps: list[int] | None = None
                 ) -> None:
    auroc = row.get("auroc") or {}
    eps = row.get("epsilon") or {}
    parts = [f"[bold]round {row['round']}[/bold]",
             f"hospitals {row.get('participants', 0)}",
             f"loss {row['loss']:.3f}" if row.get("loss") is not None else "loss -",
             *(f"AUROC {m} {auroc[m]:.3f}" for m in markers if auroc.get(m) is not None),
             f"findings F1 {row['findings_f1']:.3f}" if row.get("findings_f1") is not None else "",
             f"max eps {max(eps.values()):.2f}" if eps else "",
             (f"DP-SGD steps {min(steps)}-{max(steps)}" if steps and min(steps) != max(steps)
              else f"DP-SGD steps {steps[0]}" if steps else ""),
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
    ) -> None:
        """Run a simulated federation of hospitals (synthetic cohorts by default)."""
        from fedrg.commands.progress import RoundProgress, last_entry_steps, phase
        from fedrg.federated.report import round_table
        from fedrg.flower.simulation import run_simulated_federation
        from fedrg.interrupt import (
            Interrupted,
            exit_interrupted,
            graceful_interrupt,
            silence_flower,
            stop_own_ray,
        )
        from fedrg.paths import ensure_writable

        t0 = time.perf_counter()  # "done in" counts cohorts, base model and every round
        where: dict[str, Path | None] = {"run_dir": None}

        def how_to_go_on() -> str:
            rd = where["run_dir"]
            if rd is None:
                return "Nothing was written; run the same command again."
            if (rd / "checkpoint" / "state.json").is_file() or (
                    rd / "checkpoint.old" / "state.json").is_file():
                return (f"Ledgers and the last checkpoint are intact; resume with: "
                        f"fedrg simulate --resume {rd}")
            return ("No round had finished, so there is nothing to resume; run the same "
                    "command again (ledgers are intact).")

        with graceful_interrupt("fedrg simulate", hint=how_to_go_on, cleanup=stop_own_ray,
                                on_signal=silence_flower):
            try:
                overrides = list(set_ or [])
                if resume is not None:
                    if not (resume / "config.json").is_file():
                        raise FedrgError(f"--resume {resume}: no config.json there; pass a run directory "
                                         "written by fedrg simulate")
                    cfg = load_config(resume / "config.json", overrides)
                    run_dir = resume
                    done = completed_rounds(run_dir)
                    if done is not None and done >= cfg.federation.rounds:
                        console.print(f"run {run_dir} is already complete ({done} of "
                                      f"{cfg.federation.rounds} rounds); nothing to resume. "
                                      f"Audit it with: fedrg audit {run_dir}", highlight=False)
                        return
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
                # output directories first: nothing is prepared for a run that cannot be written
                ensure_writable(run_dir, setting="--resume" if resume is not None else "--out")
                if state_dir is not None:
                    ensure_writable(state_dir, setting="--state-dir")
                previous = read_sites_record(run_dir) if resume is not None else None
                if previous is not None:  # the same hospitals, ledgers and budget as before
                    if state_dir is not None and Path(state_dir).resolve() != previous["state_root"]:
                        raise FedrgError(
                            f"--state-dir {state_dir} differs from the one run {run_dir} used "
                            f"({previous['state_root']}); a resumed run must keep its "
                            "hospitals' ledgers: drop --state-dir")
                    cohorts = cohorts or previous["cohorts"]
                    state_dir = previous["state_root"]
                    budget = previous["budget"]
                if cohorts:
                    cohort_dirs = list(cohorts)
                else:
                    with phase(console, "preparing synthetic cohorts (cached after the first run)"):
                        cohort_dirs = synthetic_cohorts(cfg)
                state_root = state_dir or cache_dir() / "sites" / hashlib.sha256(
                    str(sorted(map(str, cohort_dirs))).encode()).hexdigest()[:16]
                sites = simulated_sites(cohort_dirs, state_root, budget)
                ensure_writable(state_root, setting="--state-dir")
                where["run_dir"] = run_dir
                write_sites_record(run_dir, cohort_dirs, state_root, budget)
                (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
                with phase(console, "preparing the base model (built once, then cached)"):
                    from fedrg.model.base import load_base

                    load_base(cfg.model.base)
                console.print(f"[bold]fedrg simulate[/bold]: {cfg.federation.hospitals} hospitals, "
                              f"{cfg.federation.rounds} rounds, "
                              + (f"DP on (target epsilon {cfg.privacy.target_epsilon})"
                                 if cfg.privacy.enabled else "DP OFF")
                              + ", secure aggregation "
                              f"{'on' if cfg.secagg.enabled else 'OFF'}; run directory {run_dir}")
                training = (f"DP-SGD, {cfg.training.local_epochs:g} local epoch(s)"
                            if cfg.privacy.enabled else
                            f"no DP, {cfg.training.local_epochs:g} local epoch(s)")
                state_dirs = [Path(s.state_dir) for s in sites]
                with RoundProgress(console, rounds=cfg.federation.rounds,
                                   start_round=(completed_rounds(run_dir) or 0) + 1,
                                   training=training) as progress:

                    def on_round(row: dict[str, Any]) -> None:
                        steps = last_entry_steps(state_dirs, row["round"])
                        _print_round(row, cfg.data.markers, steps)
                        progress.round_done()

                    result = run_simulated_federation(
                        cfg, run_dir, sites, resume=resume is not None, on_round=on_round,
                        on_phase=progress.on_phase)
                export_ledgers(sites, run_dir)
            except FedrgError as err:
                console.print(f"[red]error:[/red] {err}")
                raise typer.Exit(2) from None
            except Interrupted:
                exit_interrupted("fedrg simulate", how_to_go_on(), cleanup=stop_own_ray)
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
