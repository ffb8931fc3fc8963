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
from rich.text import Text

from fedrg.commands.output import fail
from fedrg.config import (
    ExperimentConfig,
    SiteConfig,
    apply_overrides,
    build_config,
    read_experiment_toml,
    read_toml,
)
from fedrg.errors import FedrgError, PolicyViolationError
from fedrg.federated.checkpoint import completed_rounds
from fedrg.paths import cache_dir
from fedrg.policy import SitePolicy, parse_policy
from fedrg.policy import policy_table as policy_table_of

console = Console()

DEFAULT_SIMULATED_BUDGET = 100.0


def synthetic_cohort_root(cfg: ExperimentConfig) -> Path:
    """Where :func:`synthetic_cohorts` keeps ``cfg``'s cohorts: ``data.synthetic_dir``, else a
    cache folder named by the recipe (hospitals, patients, seed, data settings, generator
    version and, for a world other than the public one, the world and its version)."""
    from fedrg.data.synth import GENERATOR_VERSION
    from fedrg.data.worlds import PUBLIC_WORLD, SHIFTED_WORLD_VERSION

    if cfg.data.synthetic_dir:
        return Path(cfg.data.synthetic_dir)
    recipe: dict[str, Any] = {
        "hospitals": cfg.federation.hospitals, "patients": cfg.data.synthetic_patients,
        "seed": cfg.federation.seed, "data": cfg.data.model_dump(mode="json", exclude={"world"}),
        "version": GENERATOR_VERSION}
    if cfg.data.world != PUBLIC_WORLD:  # the public world keeps its cache key from before worlds
        recipe["world"] = {"name": cfg.data.world, "version": SHIFTED_WORLD_VERSION}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "synthetic" / digest


def synthetic_cohorts(cfg: ExperimentConfig) -> list[Path]:
    """Synthetic cohorts for ``cfg`` in the world ``cfg.data.world`` (cached by their recipe,
    :func:`synthetic_cohort_root`; built once, atomically)."""
    from fedrg.data.synth import synthesize

    root = synthetic_cohort_root(cfg)
    dirs = [root / f"hospital-{i}" for i in range(1, cfg.federation.hospitals + 1)]
    if all((d / "manifest.csv").is_file() for d in dirs):
        return dirs
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=root.parent))
    try:
        synthesize(tmp, hospitals=cfg.federation.hospitals, patients=cfg.data.synthetic_patients,
                   seed=cfg.federation.seed, data_cfg=cfg.data, world=cfg.data.world)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dirs


def simulated_sites(cohorts: list[Path], state_root: Path,
                    policy: SitePolicy | None = None) -> list[SiteConfig]:
    """One site config per cohort; each hospital's ledger lives in ``state_root/<name>``.

    Every simulated hospital holds ``policy`` (default: :func:`simulated_policy` of nothing),
    gets its long-term key and pins one roster listing them all (``state_root/roster.toml``),
    so secure aggregation runs the same checks as deployed.
    """
    from fedrg.federated.secure import ROSTER_FILE, provision_roster

    policy = policy or simulated_policy(None)
    sites = []
    for cohort in cohorts:
        if not (cohort / "manifest.csv").is_file():
            raise FedrgError(f"cohort {cohort} has no manifest.csv; point --cohorts at cohort "
                             "directories (see docs/cohort-format.md) or omit it to use synthetic data")
        sites.append(SiteConfig(name=cohort.name, cohort=str(cohort),
                                state_dir=str(state_root / cohort.name), policy=policy))
    return provision_roster(sites, state_root / ROSTER_FILE)


def simulated_policy(table: dict[str, Any] | None, *, source: str = "[site_policy]",
                     budget: float | None = None) -> SitePolicy:
    """The simulated hospitals' policy: the ``[site_policy]`` table (or a policy file).

    Unset ``epsilon_budget`` defaults to :data:`DEFAULT_SIMULATED_BUDGET` (simulations reuse
    their synthetic hospitals' ledgers across runs); ``budget`` (``--budget``) overrides it.
    Unset ``evaluation.release`` defaults to ``'exact'``: synthetic cohorts are public, so
    their metrics leave without noise (still once per trained round, and ledgered as a
    non-private release); a real hospital's default is ``'dp'``.
    """
    data = dict(table or {})
    if budget is not None:
        data["epsilon_budget"] = budget
    data.setdefault("epsilon_budget", DEFAULT_SIMULATED_BUDGET)
    # synthetic cohorts are public: their metrics leave exactly (an explicit, ledgered opt-out;
    # set [site_policy.evaluation] release = "dp" to see what a real hospital would release)
    evaluation = dict(data.get("evaluation") or {})
    evaluation.setdefault("release", "exact")
    data["evaluation"] = evaluation
    if "epsilon_per_run" not in data:  # a small --budget also caps the run
        data["epsilon_per_run"] = min(SitePolicy.model_fields["epsilon_per_run"].default,
                                      float(data["epsilon_budget"]))
    return parse_policy(data, source=f"simulated hospitals, {source}")


def hospitals_per_round(cfg: ExperimentConfig) -> int:
    """How many hospitals the server samples per round (as :mod:`fedrg.federated.server`)."""
    from fedrg.federated.server import sample_size

    fed = cfg.federation
    return sample_size(fed.hospitals, fed.fraction_train, fed.min_hospitals)


def check_simulation_policy(cfg: ExperimentConfig, policy: SitePolicy) -> None:
    """Fail up front when every simulated hospital would refuse the request (nothing spent).

    Raises
    ------
    FedrgError
        Naming the refused setting, the allowed range and how to change either side.
    """
    from fedrg.hospital.request import check_request

    per_round = hospitals_per_round(cfg)
    try:
        check_request(cfg, policy, round_=1, hospitals_in_round=per_round)
    except PolicyViolationError as err:
        raise FedrgError(
            f"no simulated hospital would accept this experiment, so nothing was trained: "
            f"{err.setting}={err.requested!r} is outside their policy (allowed: {err.allowed}). "
            f"{cfg.federation.hospitals} hospital(s), {per_round} per round. Change the "
            "experiment (--set / --hospitals) or the simulated sites' own policy ([site_policy] "
            "in the simulation TOML or --site-policy FILE; see configs/non-private.toml)") from None


def _fix_hint(cfg: ExperimentConfig, policy: SitePolicy, err: PolicyViolationError,
              n_train: int) -> str:
    """How to make a request that :func:`~fedrg.hospital.plan.plan_schedule` refuses for
    ``n_train`` training patients fit: the largest batch it accepts, or the fewest patients."""
    from fedrg.hospital.plan import plan_schedule

    def fits(batch: int, n: int) -> bool:
        try:
            plan_schedule(cfg.model_copy(update={"training": cfg.training.model_copy(
                update={"batch_size": batch})}), policy, n_train=n)
        except PolicyViolationError:
            return False
        return True

    if err.setting != "training.batch_size":
        return ""
    batch = next((b for b in range(cfg.training.batch_size - 1, 0, -1) if fits(b, n_train)), None)
    need = next((n for n in range(n_train + 1, 100 * n_train + 2) if fits(cfg.training.batch_size, n)),
                None)
    hints = []
    if batch is not None:
        hints.append(f"ask for a smaller batch (--set training.batch_size={batch})")
    if need is not None:
        patients = -(-need // (1.0 - policy.val_fraction))  # the site holds out val_fraction
        hints.append(f"use cohorts of at least {need} training patients (about {patients:.0f} "
                     f"patients: fedrg synth --patients {patients:.0f})")
    return "; fix: " + " or ".join(hints) if hints else ""


def check_sites_would_train(cfg: ExperimentConfig, sites: list[SiteConfig], policy: SitePolicy) -> None:
    """Ask every simulated hospital, before Ray starts, whether it would train round 1.

    Each site answers with its own checks and plan
    (:meth:`fedrg.hospital.site.HospitalSite.would_refuse`: the request, its cohort's size
    against ``training.batch_size`` and ``local_epochs``, its budget), so a cohort too small
    for the request is found here, once, not by every hospital after Ray has started.

    Raises
    ------
    FedrgError
        When fewer hospitals would train than a round needs; one line per distinct reason,
        with the hospitals it concerns and the fix.
    """
    from fedrg.hospital.site import HospitalSite

    per_round = hospitals_per_round(cfg)
    refusals: dict[str, list[str]] = {}
    smallest: dict[str, tuple[int, PolicyViolationError]] = {}  # reason -> fewest patients
    for site in sites:
        hospital = HospitalSite(site)
        err = hospital.would_refuse(cfg, round_=1, hospitals_in_round=per_round, run_id="preflight")
        if err is None:
            continue
        reason = err.public_message()
        refusals.setdefault(reason, []).append(site.name)
        if isinstance(err, PolicyViolationError):
            n_train = hospital.train_size(cfg)
            if reason not in smallest or n_train < smallest[reason][0]:
                smallest[reason] = (n_train, err)
    # the fix must fit the smallest cohort that gave the reason
    hints = {reason: _fix_hint(cfg, policy, err, n) for reason, (n, err) in smallest.items()}
    accepting = len(sites) - sum(len(v) for v in refusals.values())
    needed = max(cfg.federation.min_hospitals,
                 policy.min_secure_sum_size if cfg.secagg.enabled else 1)
    if refusals and accepting < needed:
        lines = [f"{', '.join(names)}: {reason}{hints.get(reason, '')}"
                 for reason, names in refusals.items()]
        raise FedrgError(
            f"only {accepting} of {len(sites)} simulated hospital(s) would train round 1 "
            f"({needed} needed), so nothing was started:\n  " + "\n  ".join(lines))
    for reason, names in refusals.items():
        # the reason is plain text (it may hold "[policy]"): never read as markup
        console.print(Text.assemble(("note:", "yellow"), f" {', '.join(names)} will decline: "
                                    f"{reason}{hints.get(reason, '')}"), highlight=False)


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


def _print_round(row: dict[str, Any], markers: list[str],
                 entries: list[dict[str, Any]] | None = None) -> None:
    """One line per round; ``entries`` are the hospitals' training entries of the round
    (:func:`fedrg.commands.progress.last_train_entries`): a hospital that trained without
    DP has no epsilon, so it is named, never shown as epsilon 0."""
    from rich.markup import escape

    from fedrg.commands.progress import entry_is_dp
    from fedrg.federated.report import metric_interval, metric_text, release_text

    auroc = row.get("auroc") or {}
    entries = entries or []
    plain = sorted(str(e.get("hospital")) for e in entries if not entry_is_dp(e))
    eps = {h: v for h, v in (row.get("epsilon") or {}).items() if h not in plain}
    steps = [int(e["mechanism"]["steps"]) for e in entries if entry_is_dp(e)]
    plain_steps = [int(e["mechanism"]["steps"]) for e in entries if not entry_is_dp(e)]
    parts = [f"[bold]round {row['round']}{' (start)' if row['round'] == 0 else ''}[/bold]",
             f"hospitals {row.get('participants', 0)}",
             f"loss {metric_text(row, 'loss')}" if row.get("loss") is not None else "loss -",
             *(f"AUROC {m} {metric_text(row, 'auroc', m)}" for m in markers
               if auroc.get(m) is not None or metric_interval(row, "auroc", m)),
             f"findings F1 {metric_text(row, 'findings_f1')}" if row.get("findings_f1") is not None else "",
             f"max eps {max(eps.values()):.2f}" if eps else "",
             _steps_text("DP-SGD steps", steps),
             (f"no DP, {_steps_text('steps', plain_steps)}" if plain and not eps
              else f"[yellow]no DP at {', '.join(plain)}[/yellow]" if plain else ""),
             f"{row.get('seconds', 0):.1f}s"]
    if row.get("declined"):
        parts.append(f"[yellow]declined: {', '.join(row['declined'])}[/yellow]")
    if release_text(row):
        parts.append(f"[dim]{escape(release_text(row))}[/dim]")
    if row.get("reason"):
        parts.append(f"[red]{row['reason']}[/red]")
    console.print("  ".join(p for p in parts if p))


def _steps_text(what: str, steps: list[int]) -> str:
    """``DP-SGD steps 7`` or ``DP-SGD steps 7-9``; empty without steps."""
    if not steps:
        return ""
    return f"{what} {min(steps)}" + (f"-{max(steps)}" if min(steps) != max(steps) else "")


def _run_epsilon_line(rounds_rows: list[dict[str, Any]], coverage: dict[str, Any],
                      *, dp_requested: bool, target_epsilon: float) -> str | None:
    """The end-of-run epsilon line: per hospital its epsilon of this run, or ``no DP`` for
    a hospital that used no DP in this run (never 0.000); exact metric releases named."""
    eps = dict(rounds_rows[-1].get("epsilon") or {}) if rounds_rows else {}
    names = sorted(set(eps) | set(coverage))
    if not names:
        return None

    def one(h: str) -> str:
        cov = coverage.get(h)
        if cov is None:  # ledger not readable here: fall back on what was requested
            return f"{h} {eps[h]:.3f}" if dp_requested and h in eps else f"{h} no DP"
        if not cov.has_dp:
            return f"{h} no DP"
        text = f"{h} {eps[h]:.3f}" if h in eps else f"{h} -"
        if cov.plain_rounds:
            text += f" (its DP entries only; {cov.plain_rounds} round(s) WITHOUT DP)"
        return text

    parts = [one(h) for h in names]
    if all(p.endswith(" no DP") for p in parts):
        line = ("epsilon spent this run: no DP at any hospital (trained without DP-SGD: no "
                "epsilon applies)")
    else:
        line = "epsilon spent this run: " + ", ".join(parts)
        if dp_requested:
            line += f" (target {target_epsilon})"
    exact = sorted(h for h, c in coverage.items() if c.exact_releases)
    if exact:
        line += (f"; metrics released exactly, WITHOUT DP, by {', '.join(exact)} (no epsilon "
                 "covers them)")
    return line


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
        budget: float | None = typer.Option(None, help="lifetime epsilon budget of each simulated "
                                            f"hospital (default: the site policy's, else {DEFAULT_SIMULATED_BUDGET:g})"),
        site_policy: Path | None = typer.Option(
            None, "--site-policy", help="the simulated hospitals' own policy (TOML with a \\[policy] "
            "table); default: \\[site_policy] of --config, else the safe defaults"),
        set_: list[str] | None = typer.Option(None, "--set", help="override: section.key=value"),
        ray_address: str | None = typer.Option(
            None, "--ray-address", help="run the hospitals on this existing Ray cluster "
            "(e.g. 127.0.0.1:6379 from 'ray start --head'); default: a private local Ray"),
    ) -> None:
        """Run a simulated federation of hospitals (synthetic cohorts by default)."""
        from fedrg.commands.progress import (
            RoundProgress,
            last_train_entries,
            phase,
            rounds_without_dp,
            run_coverage,
        )
        from fedrg.federated.report import gain_line, round_table
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
                policy_table: dict[str, Any] | None = None
                policy_source = "defaults"
                if resume is not None:
                    if not (resume / "config.json").is_file():
                        raise FedrgError(f"--resume {resume}: no config.json there; pass a run directory "
                                         "written by fedrg simulate")
                    cfg = build_config(apply_overrides(read_toml(resume / "config.json"), overrides),
                                       source=str(resume / "config.json"))
                    run_dir = resume
                    if (resume / "site_policy.json").is_file():
                        policy_table = read_toml(resume / "site_policy.json")
                        policy_source = str(resume / "site_policy.json")
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
                    # the sites' policy is theirs, not part of the experiment request
                    data, policy_table = read_experiment_toml(config)
                    if policy_table is not None:
                        policy_source = f"{config} [site_policy]"
                    cfg = build_config(apply_overrides(data, overrides),
                                       source=str(config) if config else "defaults + overrides")
                    run_dir = out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
                    if (run_dir / "checkpoint").exists():
                        raise FedrgError(f"run directory {run_dir} already holds a run; use --resume "
                                         f"{run_dir} to continue it or choose another --out")
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
                if site_policy is not None:
                    policy_table, policy_source = policy_table_of(read_toml(site_policy)), str(site_policy)
                policy = simulated_policy(policy_table, source=policy_source, budget=budget)
                for cohort in cohorts or []:  # named cohorts must exist before anything else
                    if not (cohort / "manifest.csv").is_file():
                        raise FedrgError(f"cohort {cohort} has no manifest.csv; point --cohort at "
                                         "cohort directories (see docs/cohort-format.md)")
                check_simulation_policy(cfg, policy)
                # output directories next (the policy check above needs no file): nothing is
                # prepared for a run that cannot be written
                ensure_writable(run_dir, setting="--resume" if resume is not None else "--out")
                if state_dir is not None:
                    ensure_writable(state_dir, setting="--state-dir")
                if cohorts:
                    cohort_dirs = list(cohorts)
                else:
                    with phase(console, "preparing the synthetic hospital cohorts (cached after the "
                               "first run)"):
                        cohort_dirs = synthetic_cohorts(cfg)
                state_root = state_dir or cache_dir() / "sites" / hashlib.sha256(
                    str(sorted(map(str, cohort_dirs))).encode()).hexdigest()[:16]
                sites = simulated_sites(cohort_dirs, state_root, policy)
                ensure_writable(state_root, setting="--state-dir")
                if resume is None:  # before Ray starts: would each hospital train round 1?
                    with phase(console, "checking each hospital's cohort against the request"):
                        check_sites_would_train(cfg, sites, policy)
                where["run_dir"] = run_dir
                write_sites_record(run_dir, cohort_dirs, state_root, policy.epsilon_budget)
                (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
                # the simulated sites' policy, for --resume (never sent to the hospitals' server)
                (run_dir / "site_policy.json").write_text(policy.model_dump_json(indent=2))
                with phase(console, "preparing the base model (built once, then cached)"):
                    from fedrg.model.base import load_base

                    load_base(cfg.model.base)
                if cfg.model.public_init == "synthetic" and not resume:
                    with phase(console, "preparing the public initial adapter (pre-trained on "
                               "public synthetic data; built once, then cached)") as step:
                        from fedrg.train.public_init import ensure_public_init

                        ensure_public_init(cfg.model, cfg.data, cfg.training, progress=step)
                console.print(f"[bold]fedrg simulate[/bold]: {cfg.federation.hospitals} hospitals, "
                              f"{cfg.federation.rounds} rounds, "
                              + (f"DP on (target epsilon {cfg.privacy.target_epsilon})"
                                 if cfg.privacy.enabled else "DP OFF")
                              + ", secure aggregation "
                              f"{'on' if cfg.secagg.enabled else 'OFF'}; site policy from "
                              f"{policy_source} (metrics released: {policy.evaluation.release}); "
                              f"run directory {run_dir}")
                training = (f"DP-SGD, {cfg.training.local_epochs:g} local epoch(s)"
                            if cfg.privacy.enabled else
                            f"no DP, {cfg.training.local_epochs:g} local epoch(s)")
                state_dirs = [Path(s.state_dir) for s in sites]
                with RoundProgress(console, rounds=cfg.federation.rounds,
                                   start_round=(completed_rounds(run_dir) or 0) + 1,
                                   training=training) as progress:

                    def on_round(row: dict[str, Any]) -> None:
                        _print_round(row, cfg.data.markers,
                                     last_train_entries(state_dirs, row["round"]))
                        progress.round_done()

                    result = run_simulated_federation(
                        cfg, run_dir, sites, resume=resume is not None, on_round=on_round,
                        on_phase=progress.on_phase, ray_address=ray_address)
                export_ledgers(sites, run_dir)
            except FedrgError as err:
                fail(err)
            except Interrupted:
                exit_interrupted("fedrg simulate", how_to_go_on(), cleanup=stop_own_ray)
        rounds_rows = result.metrics["rounds"]
        run_id = str(result.metrics.get("run_id", ""))
        console.print(round_table(rounds_rows, cfg.data.markers,
                                  no_dp=rounds_without_dp(state_dirs, run_id)))
        eps_line = _run_epsilon_line(rounds_rows, run_coverage(state_dirs, run_id),
                                     dp_requested=cfg.privacy.enabled,
                                     target_epsilon=cfg.privacy.target_epsilon)
        if eps_line and rounds_rows:
            console.print(eps_line, highlight=False)
        added = gain_line(rounds_rows, list(cfg.data.markers))
        if added:
            console.print(added, highlight=False)
        if result.stopped_early:
            console.print(f"[yellow]stopped early:[/yellow] {result.stopped_early}")
            if not any(r.get("aggregated") for r in rounds_rows):
                console.print("[red]error:[/red] no round was aggregated: no hospital (or too "
                              "few) accepted the request; the reasons are above and in "
                              f"{run_dir}/metrics.json ('declined')")
                raise typer.Exit(3)
        console.print(f"done in {time.perf_counter() - t0:.0f}s: {run_dir}/metrics.json, "
                      f"{run_dir}/adapter (fedrg predict --adapter {run_dir}/adapter ...), "
                      f"{run_dir}/plots/*.png; hospital ledgers in {state_root} "
                      f"(copies for auditors: fedrg audit {run_dir})")
