"""Privacy-utility curve of the default federation: epsilon in {1, 2, 4, 8} and without DP.

Every run is the default simulated federation (3 synthetic hospitals, the default rounds,
secure aggregation on) trained in-process (``LocalTransport``: the same hospital and server
code and payloads as the Flower apps, without Ray, as in ``federated_vs_centralised.py``).
DP runs set ``privacy.target_epsilon`` (per hospital, ``privacy.target_delta`` as configured);
the non-private run uses ``--non-private-config`` (default ``configs/non-private.toml``).
Each (setting, seed) pair sets ``training.seed`` and ``federation.seed`` (model
initialisation, local shuffling, genomics withholding and augmentation); the hospitals are
always the default federation's synthetic cohorts. DP noise and Poisson sampling
come from ``fedrg.privacy.dpsgd.use_seeded_noise_for_tests(seed)`` so a run can be repeated
(``--os-noise``: OS entropy, as in production).

The final global adapter is evaluated once, by each hospital on its own held-out patients
(``HospitalSite.evaluate``, the federated evaluation), and the server computes the metrics
from the sum of the hospitals' released aggregates, as it does every round (one pooled AUROC
over all held-out patients): per marker the image-only AUROC (genomics withheld) and the
multimodal AUROC, findings F1 and ROUGE-L. ``by_hospital`` holds each hospital's own AUROCs.

Prints one JSON object: ``runs`` (one entry per setting and seed) and ``summary`` (per
setting and metric: mean, standard deviation, min, max over seeds), plus ``acceptance``
(epsilon 8 against non-private, the thresholds of issue 14). Writes a PNG of AUROC against
epsilon (``--png``). ``--json`` also writes the JSON after every run, and ``--resume`` reuses
the runs already in that file, so an interrupted benchmark continues where it stopped.

    .venv/bin/python benchmarks/privacy_utility.py [--epsilons 1,2,4,8] [--seeds 0,1,2]
        [--json OUT.json] [--png OUT.png] [--resume] [--set k=v ...]
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
PUBLIC_ONLY = "public-only"  # the initial adapter (model.public_init) with no federated training
TOLERANCE = {"idh_mutant": 0.05, "codeletion_1p19q": 0.05, "mgmt_methylated": 0.08}


def run_public_only(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The initial global adapter alone (``model.public_init``, no hospital data), scored on
    the same held-out patients with the same pooled computation: what the federation adds."""
    from fedrg.commands.federation import simulated_policy, simulated_sites, synthetic_cohorts
    from fedrg.config import load_config
    from fedrg.hospital.evaluation import release_aggregates
    from fedrg.hospital.site import HospitalSite
    from fedrg.model.adapter import build_model
    from fedrg.privacy.release import EXACT_BINS, metrics_from_release, noisy_release, sum_releases
    from fedrg.train.public_init import apply_public_init

    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model, cfg.data, seed=cfg.federation.seed)
    applied = apply_public_init(model, cfg.model, cfg.data, cfg.training)
    sites = simulated_sites(synthetic_cohorts(cfg), work / PUBLIC_ONLY / "sites",
                            simulated_policy({}, budget=1e9))
    k = len(cfg.data.markers)
    releases = {site.name: noisy_release(release_aggregates(model, HospitalSite(site).cohort(cfg).data.val,
                                                            bins=EXACT_BINS),
                                         noise_multiplier=0.0, n_markers=k)
                for site in sites}
    ev = metrics_from_release(sum_releases(list(releases.values())), list(cfg.data.markers))
    return {
        "setting": PUBLIC_ONLY, "seed": 0, "initial_adapter": applied,
        "auroc_image": ev.get("auroc", {}), "auroc_multimodal": ev.get("auroc_multimodal", {}),
        "findings_f1": ev.get("findings_f1"), "rouge_l": ev.get("rouge_l"),
        "epsilon_recorded": 0.0,
        "by_hospital": {name: {k2: metrics_from_release(r, list(cfg.data.markers)).get(k2)
                               for k2 in ("auroc", "auroc_multimodal")}
                        for name, r in releases.items()},
        "train_seconds": 0.0, "stopped_early": None,
    }


def run_one(setting: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train one federation and evaluate its final adapter at every hospital."""
    from fedrg.commands.federation import simulated_policy, simulated_sites, synthetic_cohorts
    from fedrg.config import load_config, to_run_config
    from fedrg.federated.local import LocalTransport
    from fedrg.federated.runner import run_federation
    from fedrg.federated.server import aggregate_evaluation
    from fedrg.hospital.site import HospitalSite
    from fedrg.payload import Payload
    from fedrg.privacy.dpsgd import use_seeded_noise_for_tests

    sets = [*args.overrides, f"training.seed={seed}", f"federation.seed={seed}",
            "federation.fraction_evaluate=0"]  # evaluated once, below
    if setting == NON_PRIVATE:
        cfg = load_config(args.non_private_config, [*sets, "privacy.enabled=false"])
    else:
        cfg = load_config(args.config, [*sets, "privacy.enabled=true",
                                        f"privacy.target_epsilon={float(setting)}"])
    # the default federation's hospitals for every seed (their recipe uses the unseeded config)
    cohorts = synthetic_cohorts(load_config(args.config, args.overrides))
    name = f"{setting}-seed{seed}"
    # the simulated sites' own policy: what this benchmark runs (no DP, no secure sum) allowed
    policy = simulated_policy({"require_dp": setting != NON_PRIVATE,
                               "require_secagg": cfg.secagg.enabled}, budget=1e9)
    sites = simulated_sites(cohorts, work / name / "sites", policy)
    t0 = time.perf_counter()
    noise = nullcontext() if args.os_noise else use_seeded_noise_for_tests(seed)
    with noise:
        result = run_federation(LocalTransport(sites), cfg, work / name / "run")
    train_s = time.perf_counter() - t0
    payload = Payload(meta={"config": to_run_config(cfg), "round": cfg.federation.rounds,
                            "run_id": result.metrics["run_id"]})  # the run the sites trained in
    payload.put_array_list("global", result.global_arrays)
    replies = [HospitalSite(site).evaluate(payload).meta for site in sites]
    ev = aggregate_evaluation(replies)
    if not ev:  # every hospital declined: a benchmark row without metrics is a bug, not a zero
        reasons = {r.get("site"): r.get("reason") for r in replies}
        raise SystemExit(f"{name}: no hospital released metrics of the final adapter: {reasons}")
    rows = result.metrics["rounds"]
    eps = rows[-1].get("epsilon") or {}
    return {
        "setting": setting, "seed": seed,
        "auroc_image": ev.get("auroc", {}), "auroc_multimodal": ev.get("auroc_multimodal", {}),
        "findings_f1": ev.get("findings_f1"), "rouge_l": ev.get("rouge_l"),
        "epsilon_recorded": max(eps.values()) if eps else None,
        "by_hospital": _by_hospital(replies),
        "train_seconds": round(train_s, 1),
        "stopped_early": result.metrics.get("stopped_early") or None,
    }


def _by_hospital(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """Each hospital's own AUROCs, computed from its (exact or noisy) release alone."""
    from fedrg.privacy.release import metrics_from_release

    out: dict[str, Any] = {}
    for r in replies:
        if isinstance(r.get("release"), dict):
            m = metrics_from_release(r["release"], list(r.get("markers") or []))
            out[str(r.get("site"))] = {"auroc": m.get("auroc"), "auroc_multimodal": m.get("auroc_multimodal")}
        else:
            out[str(r.get("site"))] = {"declined": r.get("reason") or r.get("status")}
    return out


def _stats(values: list[float | None]) -> dict[str, float | None]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": round(statistics.fmean(xs), 4),
            "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "min": round(min(xs), 4), "max": round(max(xs), 4), "n": len(xs)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: mean/std/min/max over seeds of every metric."""
    out: dict[str, Any] = {}
    for setting in dict.fromkeys(r["setting"] for r in runs):
        rs = [r for r in runs if r["setting"] == setting]
        markers = sorted({m for r in rs for m in r["auroc_image"]})
        out[setting] = {
            "seeds": [r["seed"] for r in rs],
            "auroc_image": {m: _stats([r["auroc_image"].get(m) for r in rs]) for m in markers},
            "auroc_multimodal": {m: _stats([r["auroc_multimodal"].get(m) for r in rs])
                                 for m in markers},
            "findings_f1": _stats([r["findings_f1"] for r in rs]),
            "rouge_l": _stats([r["rouge_l"] for r in rs]),
            "epsilon_recorded": _stats([r["epsilon_recorded"] for r in rs]),
        }
    return out


def acceptance(summary: dict[str, Any], runs: list[dict[str, Any]], setting: str = "8.0"
               ) -> dict[str, Any] | None:
    """Issue 14's acceptance at ``setting`` against the non-private runs (means over seeds)."""
    if setting not in summary or NON_PRIVATE not in summary:
        return None
    dp, npv = summary[setting], summary[NON_PRIVATE]
    checks: dict[str, Any] = {}
    for marker, tol in TOLERANCE.items():
        if marker in dp["auroc_multimodal"]:
            gap = npv["auroc_multimodal"][marker]["mean"] - dp["auroc_multimodal"][marker]["mean"]
            checks[f"multimodal_{marker}_gap"] = {"gap": round(gap, 4), "max": tol, "ok": gap <= tol}
    if "idh_mutant" in dp["auroc_image"]:
        gap = npv["auroc_image"]["idh_mutant"]["mean"] - dp["auroc_image"]["idh_mutant"]["mean"]
        checks["image_idh_mutant_gap"] = {"gap": round(gap, 4), "max": 0.05, "ok": gap <= 0.05}
    f1_gap = npv["findings_f1"]["mean"] - dp["findings_f1"]["mean"]
    checks["findings_f1_gap"] = {"gap": round(f1_gap, 4), "max": 0.05, "ok": f1_gap <= 0.05}
    lowest = min((v, r["setting"], r["seed"], kind, m)
                 for r in runs if r["setting"] in (setting, NON_PRIVATE)
                 for kind in ("auroc_image", "auroc_multimodal")
                 for m, v in r[kind].items() if v is not None)
    checks["no_auroc_below_0.5"] = {"lowest": {"auroc": round(lowest[0], 4), "setting": lowest[1],
                                               "seed": lowest[2], "kind": lowest[3],
                                               "marker": lowest[4]},
                                    "ok": lowest[0] >= 0.5}
    checks["all_ok"] = all(c["ok"] for c in checks.values())
    return checks


def plot(summary: dict[str, Any], path: Path) -> None:
    """AUROC (mean +- std over seeds) against epsilon; non-private drawn at the right, the
    public initial adapter alone as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted(float(s) for s in summary if s not in (NON_PRIVATE, PUBLIC_ONLY))
    xs = list(range(len(eps)))
    labels = [f"{e:g}" for e in eps]
    if NON_PRIVATE in summary:
        xs.append(len(eps) + 0.5)
        labels.append("no DP")
    settings = [f"{e}" for e in eps] + ([NON_PRIVATE] if NON_PRIVATE in summary else [])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind, title in ((axes[0], "auroc_image", "image only"),
                            (axes[1], "auroc_multimodal", "image + genomics")):
        markers = sorted({m for s in settings for m in summary[s][kind]})
        for m in markers:
            mean = [summary[s][kind][m]["mean"] for s in settings]
            std = [summary[s][kind][m]["std"] for s in settings]
            line = ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=m)
            if PUBLIC_ONLY in summary and summary[PUBLIC_ONLY][kind].get(m, {}).get("mean"):
                ax.axhline(summary[PUBLIC_ONLY][kind][m]["mean"], color=line[0].get_color(),
                           lw=0.8, ls="--")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(xs, labels)
        ax.set_xlabel("epsilon per hospital (delta as configured)")
        ax.set_title(f"AUROC, {title}")
        ax.set_ylim(0.3, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pooled AUROC (held-out patients)")
    if PUBLIC_ONLY in summary:
        axes[0].text(0.02, 0.02, "dashed: the public initial adapter alone", fontsize=8,
                     transform=axes[0].transAxes)
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilons", default="1,2,4,8", help="comma-separated target epsilons")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds")
    ap.add_argument("--skip-non-private", action="store_true")
    ap.add_argument("--skip-public-only", action="store_true",
                    help="leave out the initial adapter alone (no federated training)")
    ap.add_argument("--config", default=None, help="TOML config of the DP runs (default: defaults)")
    ap.add_argument("--non-private-config", default="configs/non-private.toml")
    ap.add_argument("--set", action="append", default=[], dest="overrides",
                    help="section.key=value for every run")
    ap.add_argument("--os-noise", action="store_true", help="DP noise from OS entropy (not seeded)")
    ap.add_argument("--json", default="", help="also write the JSON here (after every run)")
    ap.add_argument("--png", default="privacy_utility.png", help="where the plot goes")
    ap.add_argument("--resume", action="store_true", help="reuse the runs already in --json")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        settings = [str(float(e)) for e in args.epsilons.split(",") if e.strip()]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r} / --epsilons {args.epsilons!r}: give comma-separated "
                 "numbers, e.g. --seeds 0,1,2 --epsilons 1,2,4,8")
    if not args.skip_non_private:
        settings.append(NON_PRIVATE)
    if not args.skip_public_only:
        settings.append(PUBLIC_ONLY)
    if args.resume and not args.json:
        ap.error("--resume needs --json FILE (the runs to continue from)")
    runs: list[dict[str, Any]] = []
    if args.resume and Path(args.json).is_file():
        runs = json.loads(Path(args.json).read_text()).get("runs", [])
    work = Path(tempfile.mkdtemp(prefix="fedrg-privacy-utility-"))
    out: dict[str, Any] = {"benchmark": "privacy_utility", "settings": settings, "seeds": seeds,
                           "overrides": args.overrides, "seeded_noise": not args.os_noise}

    def emit() -> str:
        out["runs"] = runs
        out["summary"] = summarise(runs)
        out["acceptance_epsilon_8"] = acceptance(out["summary"], runs)
        text = json.dumps(out, indent=2)
        if args.json:
            Path(args.json).write_text(text + "\n")
        return text

    for setting in settings:
        for seed in seeds:
            if setting == PUBLIC_ONLY and seed != seeds[0]:
                continue  # deterministic: one row
            if any(r["setting"] == setting and r["seed"] in (seed, 0 if setting == PUBLIC_ONLY else seed)
                   for r in runs):
                continue
            runs.append(run_public_only(args, work) if setting == PUBLIC_ONLY
                        else run_one(setting, seed, args, work))
            print(f"{setting} seed {seed}: done", file=sys.stderr)
            emit()
    text = emit()
    plot(out["summary"], Path(args.png))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
