"""Privacy against utility, from three starting points: what DP keeps of what the federation learns.

For each *start* (the federation's initial adapter and the hospitals' world):

* ``random``: a randomly initialised adapter (``model.public_init=none``), shifted hospitals;
* ``shifted``: the public adapter (pre-trained on the public synthetic world, no hospital data),
  hospitals from the shifted world (other scanners, expression platforms, case mix, and an
  association the public world lacks: ``data.world=shifted``, docs/cohort-format.md);
* ``same``: the public adapter on hospitals from its own world (``data.world=public``): a start
  that already knows the test world, shown to say so, never to credit DP with its figures;

the benchmark scores the start alone, the federation without DP and with DP at each epsilon,
over several seeds. Every federation runs in-process (``LocalTransport``: the same hospital and
server code and payloads as the Flower apps, without Ray) with the settings the simulated
hospitals' policy allows. Each (start, setting, seed) sets ``training.seed`` and
``federation.seed``; DP noise comes from ``use_seeded_noise_for_tests(seed)`` so a run can be
repeated (``--os-noise``: OS entropy, as in production).

The final adapter is scored by each hospital on its own held-out patients (the federated
evaluation, exact releases: the synthetic cohorts are public) and pooled by the server: per
marker image-only and multimodal AUROC, findings F1 and ROUGE-L.

``share_kept`` is, per start, marker and seed, ``(DP - start) / (no DP - start)`` of the
multimodal AUROC: the part of the non-private gain over the start that DP keeps. It is only
meaningful where the non-private run gains something: a gain below ``MIN_GAIN`` is reported
as ``null``. ``acceptance`` checks issue 22's goal on the random and shifted starts (mean over
seeds at least 0.9 at epsilon 8 and 0.8 at epsilon 2; no seed below 0.8 / 0.7).

Prints one JSON object (``runs``, ``summary``, ``share_kept``, ``acceptance``) and writes a
PNG (``--png``). ``--json`` writes the JSON after every run; ``--resume`` continues from it.

    .venv/bin/python benchmarks/privacy_utility.py [--starts random,shifted,same]
        [--epsilons 1,2,4,8] [--seeds 0,1,2] [--json OUT.json] [--png OUT.png] [--resume]
        [--set section.key=value ...] [--policy key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

NON_PRIVATE = "non-private"
START = "start"  # the initial adapter alone, no federated training
MARKERS = ("idh_mutant", "codeletion_1p19q", "mgmt_methylated")
#: each start: the overrides that make it (on top of --set)
STARTS: dict[str, list[str]] = {
    "random": ["model.public_init=none", "data.world=shifted"],
    "shifted": ["model.public_init=synthetic", "data.world=shifted"],
    "same": ["model.public_init=synthetic", "data.world=public"],
}
#: the goal of issue 22, on these starts: (epsilon, mean share at least, every seed at least)
GOALS = {"8.0": (0.9, 0.8), "2.0": (0.8, 0.7)}
GOAL_STARTS = ("random", "shifted")
#: a non-private gain over the start below this is noise: no share is computed from it
MIN_GAIN = 0.02


def _load(args: argparse.Namespace, start: str, setting: str, seed: int) -> Any:
    from fedrg.config import load_config

    sets = [*STARTS[start], *args.overrides, f"training.seed={seed}", f"federation.seed={seed}",
            "federation.fraction_evaluate=0"]  # evaluated once, below
    if setting == NON_PRIVATE:
        return load_config(args.non_private_config, [*sets, "privacy.enabled=false"])
    if setting == START:
        return load_config(args.config, sets)
    return load_config(args.config, [*sets, "privacy.enabled=true",
                                      f"privacy.target_epsilon={float(setting)}"])


def _policy(args: argparse.Namespace, cfg: Any, setting: str) -> Any:
    """The simulated hospitals' own policy: what this run needs, plus ``--policy``."""
    from fedrg.commands.federation import simulated_policy
    from fedrg.config import _parse_scalar

    table: dict[str, Any] = {"require_dp": setting != NON_PRIVATE,
                             "require_secagg": cfg.secagg.enabled}
    for item in args.policy:
        key, _, value = item.partition("=")
        table[key.strip()] = _parse_scalar(value.strip())
    if setting == NON_PRIVATE:
        table.pop("noise", None)  # nothing to share out without noise
        table.pop("distributed_honest_peers", None)
    return simulated_policy(table, budget=1e9)


def _score(cfg: Any, sites: list[Any], arrays: list[Any], run_id: str, rnd: int) -> dict[str, Any]:
    """The hospitals' exact releases of ``arrays`` on their held-out patients, pooled."""
    from fedrg.config import to_run_config
    from fedrg.federated.server import aggregate_evaluation
    from fedrg.hospital.site import HospitalSite
    from fedrg.payload import Payload

    payload = Payload(meta={"config": to_run_config(cfg), "round": rnd, "run_id": run_id})
    payload.put_array_list("global", arrays)
    replies = [HospitalSite(site).evaluate(payload).meta for site in sites]
    ev = aggregate_evaluation(replies)
    if not ev:  # every hospital declined: a benchmark row without metrics is a bug, not a zero
        reasons = {r.get("site"): r.get("reason") for r in replies}
        raise SystemExit(f"no hospital released metrics of {run_id} round {rnd}: {reasons}")
    row = {"auroc_image": ev.get("auroc", {}), "auroc_multimodal": ev.get("auroc_multimodal", {}),
           "findings_f1": ev.get("findings_f1"), "rouge_l": ev.get("rouge_l"),
           "held_out": held_out_counts(replies)}
    add_sampling_se(row)
    return row


def held_out_counts(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out patients and, per marker, labelled positives and negatives, from the
    hospitals' exact releases (their histograms count each labelled patient once)."""
    from fedrg.privacy.release import sum_releases

    summed = sum_releases([r["release"] for r in replies if isinstance(r.get("release"), dict)])
    markers = list(replies[0].get("markers") or MARKERS)
    key = "hist/auroc_multimodal/{m}/{k}"
    return {"patients": round(float(summed["count"].sum())),
            "positives": {m: round(float(summed[key.format(m=m, k="pos")].sum())) for m in markers
                          if key.format(m=m, k="pos") in summed},
            "negatives": {m: round(float(summed[key.format(m=m, k="neg")].sum())) for m in markers
                          if key.format(m=m, k="neg") in summed}}


def hanley_mcneil_se(auroc: float, positives: int, negatives: int) -> float | None:
    """Standard error of an AUROC from ``positives`` and ``negatives`` patients (Hanley &
    McNeil 1982): the sampling noise of one figure on a held-out set of this size."""
    if positives < 1 or negatives < 1:
        return None
    q1, q2 = auroc / (2 - auroc), 2 * auroc ** 2 / (1 + auroc)
    var = (auroc * (1 - auroc) + (positives - 1) * (q1 - auroc ** 2)
           + (negatives - 1) * (q2 - auroc ** 2)) / (positives * negatives)
    return math.sqrt(max(var, 0.0))


def add_sampling_se(row: dict[str, Any]) -> None:
    """Give ``row`` the sampling standard error of each AUROC (``auroc_se_image``,
    ``auroc_se_multimodal``) from its held-out counts."""
    counts = row.get("held_out")
    if not counts:
        return
    for kind in ("image", "multimodal"):
        row[f"auroc_se_{kind}"] = {
            m: (None if a is None or m not in counts["positives"] else
                round(hanley_mcneil_se(a, counts["positives"][m], counts["negatives"][m]) or 0.0, 4))
            for m, a in row[f"auroc_{kind}"].items()}


def backfill_held_out(runs: list[dict[str, Any]]) -> None:
    """Rows from an older JSON without held-out counts take them from a row of the same
    hospitals' world and seed (the same cohorts, so the same held-out patients)."""
    world = {start: next(o.split("=", 1)[1] for o in overrides if o.startswith("data.world="))
             for start, overrides in STARTS.items()}
    known = {(world[r["start"]], r["seed"]): r["held_out"] for r in runs if r.get("held_out")}
    for r in runs:
        if not r.get("held_out") and (world[r["start"]], r["seed"]) in known:
            r["held_out"] = known[(world[r["start"]], r["seed"])]
            add_sampling_se(r)


def run_one(start: str, setting: str, seed: int, args: argparse.Namespace, work: Path
            ) -> dict[str, Any]:
    """The start alone, or one federation and its final adapter, scored at every hospital."""
    from fedrg.commands.federation import simulated_sites, synthetic_cohorts
    from fedrg.federated.local import LocalTransport
    from fedrg.federated.runner import run_federation
    from fedrg.model.adapter import build_model
    from fedrg.model.payload import get_adapter_arrays
    from fedrg.privacy.dpsgd import use_seeded_noise_for_tests
    from fedrg.train.public_init import apply_public_init

    cfg = _load(args, start, setting, seed)
    name = f"{start}-{setting}-seed{seed}"
    sites = simulated_sites(synthetic_cohorts(cfg), work / name / "sites", _policy(args, cfg, setting))
    t0 = time.perf_counter()
    row: dict[str, Any] = {"start": start, "setting": setting, "seed": seed}
    if setting == START:
        model = build_model(cfg.model, cfg.data, seed=cfg.federation.seed)
        row["initial_adapter"] = apply_public_init(model, cfg.model, cfg.data, cfg.training)
        # the hospitals release only after training in a run: score the start as round 0
        row.update(_score(cfg, sites, get_adapter_arrays(model), f"{name}-score", 0))
        row["epsilon_recorded"] = None
    else:
        noise = nullcontext() if args.os_noise else use_seeded_noise_for_tests(seed)
        with noise:
            result = run_federation(LocalTransport(sites), cfg, work / name / "run")
        row.update(_score(cfg, sites, result.global_arrays, str(result.metrics["run_id"]),
                          cfg.federation.rounds))
        eps = result.metrics["rounds"][-1].get("epsilon") or {}
        row["epsilon_recorded"] = max(eps.values()) if eps and setting != NON_PRIVATE else None
        row["stopped_early"] = result.metrics.get("stopped_early") or None
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _stats(values: list[float | None]) -> dict[str, float | None]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": round(statistics.fmean(xs), 4),
            "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "min": round(min(xs), 4), "max": round(max(xs), 4), "n": len(xs)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per start and setting: mean/std/min/max over seeds of every metric."""
    out: dict[str, Any] = {}
    for start in dict.fromkeys(r["start"] for r in runs):
        for setting in dict.fromkeys(r["setting"] for r in runs if r["start"] == start):
            rs = [r for r in runs if r["start"] == start and r["setting"] == setting]
            markers = sorted({m for r in rs for m in r["auroc_image"]})
            out.setdefault(start, {})[setting] = {
                "seeds": [r["seed"] for r in rs],
                "auroc_image": {m: _stats([r["auroc_image"].get(m) for r in rs]) for m in markers},
                "auroc_multimodal": {m: _stats([r["auroc_multimodal"].get(m) for r in rs])
                                     for m in markers},
                "findings_f1": _stats([r["findings_f1"] for r in rs]),
                "rouge_l": _stats([r["rouge_l"] for r in rs]),
                "epsilon_recorded": _stats([r.get("epsilon_recorded") for r in rs]),
                "sampling_se_multimodal": {
                    m: _stats([(r.get("auroc_se_multimodal") or {}).get(m) for r in rs])
                    for m in markers},
            }
    return out


def share_kept(runs: list[dict[str, Any]], kind: str = "auroc_multimodal") -> dict[str, Any]:
    """Per start, DP setting and marker: ``(DP - start) / (no DP - start)`` per seed (the same
    seed's start and non-private run), with its mean and minimum over seeds.

    A seed whose non-private gain is below :data:`MIN_GAIN` gives ``None`` (no gain to keep).
    """
    index = {(r["start"], r["setting"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {}
    for (start, setting, seed), r in sorted(index.items()):
        if setting in (START, NON_PRIVATE):
            continue
        base, full = index.get((start, START, seed)), index.get((start, NON_PRIVATE, seed))
        if base is None or full is None:
            continue
        for m, dp in r[kind].items():
            s, n = base[kind].get(m), full[kind].get(m)
            if dp is None or s is None or n is None:
                continue
            share = (dp - s) / (n - s) if n - s >= MIN_GAIN else None
            cell = out.setdefault(start, {}).setdefault(setting, {}).setdefault(
                m, {"per_seed": {}, "gain_no_dp": {}})
            cell["per_seed"][seed] = None if share is None else round(share, 4)
            cell["gain_no_dp"][seed] = round(n - s, 4)
    for settings in out.values():
        for markers in settings.values():
            for cell in markers.values():
                xs = [v for v in cell["per_seed"].values() if v is not None]
                cell["mean"] = round(statistics.fmean(xs), 4) if xs else None
                cell["min"] = round(min(xs), 4) if xs else None
    return out


def acceptance(shares: dict[str, Any]) -> dict[str, Any]:
    """Issue 22's goal on :data:`GOAL_STARTS`: at each epsilon of :data:`GOALS`, every
    multimodal marker keeps at least the mean share, and no seed falls below the minimum."""
    checks: dict[str, Any] = {}
    for start in GOAL_STARTS:
        for setting, (mean_goal, min_goal) in GOALS.items():
            for m in MARKERS:
                cell = shares.get(start, {}).get(setting, {}).get(m)
                key = f"{start}/eps{float(setting):g}/{m}"
                if cell is None or cell["mean"] is None:
                    checks[key] = {"ok": False, "why": "not measured"}
                    continue
                ok = cell["mean"] >= mean_goal and cell["min"] >= min_goal
                checks[key] = {"mean": cell["mean"], "min": cell["min"], "goal_mean": mean_goal,
                               "goal_min": min_goal, "ok": ok}
    checks["all_ok"] = bool(checks) and all(c["ok"] for c in checks.values())
    return checks


SHORT = {"idh_mutant": "IDH", "codeletion_1p19q": "1p/19q", "mgmt_methylated": "MGMT"}


def _cell(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats["n"] > 1 else f"{stats['mean']:.3f}"


def _share(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    return f"{100 * cell['mean']:.0f} % ({100 * cell['min']:.0f})"


def markdown_table(out: dict[str, Any]) -> str:
    """The README table: per start, the start alone, each epsilon and no DP (multimodal and
    image-only AUROC, mean ± std over seeds) and the share of the non-private multimodal
    gain each epsilon keeps (mean over seeds, worst seed in brackets)."""
    summary, shares = out["summary"], out["share_kept"]
    head = ("| start | setting | seeds | " + " | ".join(f"multimodal {SHORT[m]}" for m in MARKERS)
            + " | " + " | ".join(f"share kept {SHORT[m]}" for m in MARKERS) + " | "
            + " | ".join(f"image-only {SHORT[m]}" for m in MARKERS) + " |")
    lines = [head, "|" + "---|" * (3 + 3 * len(MARKERS))]
    for start, by_setting in summary.items():
        eps = sorted((s for s in by_setting if s not in (START, NON_PRIVATE)), key=float,
                     reverse=True)
        for setting in [START, *eps, NON_PRIVATE]:
            if setting not in by_setting:
                continue
            row = by_setting[setting]
            label = ({START: "the start alone", NON_PRIVATE: "no DP"}[setting]
                     if setting in (START, NON_PRIVATE) else f"epsilon {float(setting):g}")
            kept = [_share(shares.get(start, {}).get(setting, {}).get(m))
                    if setting not in (START, NON_PRIVATE) else "" for m in MARKERS]
            seeds = ", ".join(str(x) for x in row["seeds"])
            lines.append(f"| {start} | {label} | {seeds} | "
                         + " | ".join(_cell(row["auroc_multimodal"].get(m)) for m in MARKERS)
                         + " | " + " | ".join(kept) + " | "
                         + " | ".join(_cell(row["auroc_image"].get(m)) for m in MARKERS) + " |")
    notes = held_out_notes(out.get("runs", []))
    if notes:
        lines.extend(["", *notes])
    return "\n".join(lines) + "\n"


def held_out_notes(runs: list[dict[str, Any]]) -> list[str]:
    """One line per start: its held-out patients and the sampling standard error of one
    multimodal AUROC (mean over its rows), so a reader can tell noise from an effect."""
    notes = []
    for start in dict.fromkeys(r["start"] for r in runs):
        rs = [r for r in runs if r["start"] == start and r.get("held_out")]
        if not rs:
            continue
        patients = sorted({r["held_out"]["patients"] for r in rs})
        pos = {m: sorted({p for r in rs if (p := r["held_out"]["positives"].get(m)) is not None})
               for m in MARKERS}
        se = {m: [x for r in rs if (x := (r.get("auroc_se_multimodal") or {}).get(m)) is not None]
              for m in MARKERS}
        span = (f"{patients[0]}" if len(patients) == 1 else f"{patients[0]}-{patients[-1]}")
        notes.append(
            f"- {start}: {span} held-out patients per seed (positives "
            + ", ".join(f"{SHORT[m]} {min(pos[m])}-{max(pos[m])}" for m in MARKERS if pos[m])
            + "); sampling standard error of one multimodal AUROC (Hanley-McNeil, mean over "
            "rows): " + ", ".join(f"{SHORT[m]} {statistics.fmean(se[m]):.3f}" for m in MARKERS
                                  if se[m]))
    return notes


def plot(summary: dict[str, Any], path: Path) -> None:
    """Multimodal and image-only AUROC (mean +- std over seeds) against epsilon, one panel
    pair per start; no DP at the right, the start alone as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = list(summary)
    fig, axes = plt.subplots(len(starts), 2, figsize=(10, 3.6 * len(starts)), sharey=True,
                             squeeze=False)
    for row, start in enumerate(starts):
        s_sum = summary[start]
        eps = sorted(float(s) for s in s_sum if s not in (NON_PRIVATE, START))
        settings = [f"{e}" for e in eps] + ([NON_PRIVATE] if NON_PRIVATE in s_sum else [])
        xs = list(range(len(eps))) + ([len(eps) + 0.5] if NON_PRIVATE in s_sum else [])
        labels = [f"{e:g}" for e in eps] + (["no DP"] if NON_PRIVATE in s_sum else [])
        for col, (kind, title) in enumerate((("auroc_multimodal", "image + genomics"),
                                             ("auroc_image", "image only"))):
            ax = axes[row][col]
            for m in sorted({m for s in settings for m in s_sum[s][kind]}):
                mean = [s_sum[s][kind][m]["mean"] for s in settings]
                std = [s_sum[s][kind][m]["std"] for s in settings]
                line = ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=m)
                base = s_sum.get(START, {}).get(kind, {}).get(m, {}).get("mean")
                if base is not None:
                    ax.axhline(base, color=line[0].get_color(), lw=0.8, ls="--")
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
            ax.set_xticks(xs, labels)
            ax.set_title(f"start: {start} — AUROC, {title} (dashed: the start alone)", fontsize=9)
            ax.set_ylim(0.3, 1.0)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("pooled AUROC (held-out)")
    for ax in axes[-1]:
        ax.set_xlabel("epsilon per hospital")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--starts", default="random,shifted,same",
                    help=f"comma-separated starts among {', '.join(STARTS)}")
    ap.add_argument("--epsilons", default="1,2,4,8", help="comma-separated target epsilons")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds")
    ap.add_argument("--skip-non-private", action="store_true")
    ap.add_argument("--config", default=None, help="TOML config of the DP runs (default: defaults)")
    ap.add_argument("--non-private-config", default="configs/non-private.toml")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="section.key=value for every run")
    ap.add_argument("--policy", action="append", default=[],
                    help="key=value of the simulated hospitals' policy, e.g. noise=distributed")
    ap.add_argument("--os-noise", action="store_true", help="DP noise from OS entropy (not seeded)")
    ap.add_argument("--json", default="", help="also write the JSON here (after every run)")
    ap.add_argument("--png", default="privacy_utility.png", help="where the plot goes")
    ap.add_argument("--resume", action="store_true", help="reuse the runs already in --json")
    ap.add_argument("--markdown", default="", help="also write the README table here")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        settings = [str(float(e)) for e in args.epsilons.split(",") if e.strip()]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r} / --epsilons {args.epsilons!r}: give comma-separated "
                 "numbers, e.g. --seeds 0,1,2 --epsilons 1,2,4,8")
    starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    unknown = [s for s in starts if s not in STARTS]
    if unknown:
        ap.error(f"--starts: unknown {unknown}; choose among {', '.join(STARTS)}")
    settings = [START, *([] if args.skip_non_private else [NON_PRIVATE]), *settings]
    if args.resume and not args.json:
        ap.error("--resume needs --json FILE (the runs to continue from)")
    runs: list[dict[str, Any]] = []
    if args.resume and Path(args.json).is_file():
        runs = json.loads(Path(args.json).read_text()).get("runs", [])
        backfill_held_out(runs)
    work = Path(tempfile.mkdtemp(prefix="fedrg-privacy-utility-"))
    out: dict[str, Any] = {"benchmark": "privacy_utility", "starts": starts, "settings": settings,
                           "seeds": seeds, "overrides": args.overrides, "policy": args.policy,
                           "seeded_noise": not args.os_noise}

    def emit() -> str:
        out["runs"] = runs
        out["summary"] = summarise(runs)
        out["share_kept"] = share_kept(runs)
        out["acceptance"] = acceptance(out["share_kept"])
        text = json.dumps(out, indent=2)
        if args.json:
            Path(args.json).write_text(text + "\n")
        return text

    for start in starts:
        for setting in settings:
            for seed in seeds:
                if any((r["start"], r["setting"], r["seed"]) == (start, setting, seed) for r in runs):
                    continue
                runs.append(run_one(start, setting, seed, args, work))
                print(f"{start} {setting} seed {seed}: done", file=sys.stderr)
                emit()
    text = emit()
    plot(out["summary"], Path(args.png))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(out))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
