"""Federated (non-private and DP) vs centralised training on the default synthetic federation.

All three models are evaluated on the same held-out patients, two ways: ``auroc`` pools the
hospitals' validation splits into one AUROC; ``auroc_hospital_mean`` is the mean of each
hospital's own AUROC weighted by its validation size, which is what federated evaluation
reports each round (hospitals never pool per-patient predictions). The
federation runs in-process (``LocalTransport``: the same hospital code and payloads as the
Flower apps, without Ray), so the comparison is about learning, not the engine.

    .venv/bin/python benchmarks/federated_vs_centralised.py [--seeds 0,1,2] [--skip-dp] [--config F] [--set k=v ...]

With several ``--seeds`` (model initialisation and local shuffling; the cohorts stay the same,
and DP noise always comes from OS entropy) each seed is one entry of ``runs`` and ``idh_gap_federated_vs_centralised`` holds
the per-seed gaps with their mean: on ~150 held-out patients one AUROC moves by a few
hundredths from seed to seed, so a single seed says little about a 0.05 gap.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset


def main() -> None:
    from fedrg.commands.federation import simulated_policy, simulated_sites, synthetic_cohorts
    from fedrg.config import load_config
    from fedrg.data.dataset import CohortDataset
    from fedrg.federated.local import LocalTransport
    from fedrg.federated.runner import run_federation
    from fedrg.hospital.site import HospitalSite
    from fedrg.model.adapter import build_model
    from fedrg.model.payload import set_adapter_arrays
    from fedrg.train.evaluate import auroc, evaluate, predict_dataset
    from fedrg.train.loop import train_local

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=None, help="TOML config (e.g. configs/non-private.toml)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--seeds", default="0", help="comma-separated integer seeds, e.g. 0,1,2")
    args = ap.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2")
    base = load_config(args.config, [*args.overrides, "secagg.enabled=true"])
    cohorts = synthetic_cohorts(base)
    out: dict = {"config": {"hospitals": base.federation.hospitals, "rounds": base.federation.rounds,
                            "local_epochs": base.training.local_epochs,
                            "patients_per_hospital": base.data.synthetic_patients,
                            "seeds": seeds}}
    work = Path(tempfile.mkdtemp(prefix="fedrg-bench-"))

    def pooled_sets(cfg):
        train, val, per_site = [], [], {}
        for site in simulated_sites(cohorts, work / "unused"):
            cache = HospitalSite(site).cohort(cfg)
            train.append(CohortDataset(cache.cohort, cfg.data, cache.train_idx))
            v = CohortDataset(cache.cohort, cfg.data, cache.val_idx)
            val.append(v)
            per_site[site.name] = v
        return ConcatDataset(train), ConcatDataset(val), per_site

    def hospital_mean(model, per_site):
        """Validation-size-weighted mean of per-hospital image-only AUROCs (what federated
        evaluation reports), and per hospital: IDH AUROC, IDH prevalence and mean image-only
        IDH probability (how far the model's scores shift from one scanner to the next, which
        the pooled AUROC penalises and the per-hospital one does not)."""
        markers = list(model.data_cfg.markers)
        idh = markers.index("idh_mutant")
        model.eval()
        aurocs, sizes, by_site = {}, {}, {}
        for h, ds in per_site.items():
            p = predict_dataset(model, ds, generate=False)
            aurocs[h] = {m: auroc(p["markers"][:, j], p["probs_image"][:, j], p["marker_mask"][:, j])
                         for j, m in enumerate(markers)}
            sizes[h] = len(ds)
            known = p["marker_mask"][:, idh] > 0.5
            by_site[h] = {"idh_auroc": aurocs[h]["idh_mutant"],
                          "idh_prevalence": round(float(p["markers"][known, idh].mean()), 3),
                          "mean_idh_probability": round(float(p["probs_image"][:, idh].mean()), 3)}
        mean = {m: sum(sizes[h] * aurocs[h][m] for h in per_site) / sum(sizes.values())
                for m in markers}
        return mean, by_site

    def add_collate(ds):
        ds.empty_batch = ds.datasets[0].empty_batch  # ConcatDataset of CohortDatasets
        return ds

    def run_seed(seed: int) -> dict:
        seed_set = [f"training.seed={seed}", f"federation.seed={seed}"]
        res: dict = {"seed": seed}
        # centralised: pooled training splits, comparable epochs (rounds x local_epochs), no DP
        cfg = load_config(args.config, [*args.overrides, *seed_set])
        train, val, per_site = pooled_sets(cfg)
        add_collate(train)
        add_collate(val)
        torch.manual_seed(cfg.training.seed)
        model = build_model(cfg.model, cfg.data, seed=cfg.federation.seed)
        epochs = cfg.federation.rounds * cfg.training.local_epochs
        steps = max(1, round(epochs * len(train) / cfg.training.batch_size))
        t0 = time.perf_counter()
        train_local(model, train, cfg.training, steps=steps, seed=cfg.training.seed)
        ev = evaluate(model, val)
        seconds = round(time.perf_counter() - t0, 1)
        mean, by_site = hospital_mean(model, per_site)
        res["centralised"] = {"epochs": epochs, "steps": steps, "seconds": seconds,
                              "auroc": ev["auroc"], "auroc_hospital_mean": mean,
                              "by_hospital": by_site,
                              "auroc_multimodal": ev["auroc_multimodal"], "findings_f1": ev["findings_f1"]}

        runs = [("federated", ["privacy.enabled=false"])]
        if not args.skip_dp:
            runs.append(("federated_dp", ["privacy.enabled=true"]))
        for name, extra in runs:
            cfg = load_config(args.config, [*args.overrides, *seed_set, *extra])
            # the simulated sites opt out of DP explicitly for the non-private baseline
            policy = simulated_policy({"require_dp": cfg.privacy.enabled}, budget=1e9)
            sites = simulated_sites(cohorts, work / f"{name}-{seed}" / "sites", policy)
            t0 = time.perf_counter()
            result = run_federation(LocalTransport(sites), cfg, work / f"{name}-{seed}" / "run")
            fed_model = build_model(cfg.model, cfg.data, seed=cfg.federation.seed)
            set_adapter_arrays(fed_model, result.global_arrays)
            ev = evaluate(fed_model, val)
            rows = result.metrics["rounds"]
            mean, by_site = hospital_mean(fed_model, per_site)
            entry = {"seconds": round(time.perf_counter() - t0, 1), "auroc": ev["auroc"],
                     "auroc_hospital_mean": mean, "by_hospital": by_site,
                     "auroc_multimodal": ev["auroc_multimodal"], "findings_f1": ev["findings_f1"],
                     "idh_auroc_by_round": [r["auroc"].get("idh_mutant") for r in rows]}
            if cfg.privacy.enabled:
                entry["epsilon"] = rows[-1]["epsilon"]
            res[name] = entry
        cen, fed = res["centralised"], res["federated"]
        res["idh_gap_federated_vs_centralised"] = {
            key: round(cen[key]["idh_mutant"] - fed[key]["idh_mutant"], 4)
            for key in ("auroc", "auroc_hospital_mean")}
        return res

    out["runs"] = [run_seed(seed) for seed in seeds]
    gaps = {key: [r["idh_gap_federated_vs_centralised"][key] for r in out["runs"]]
            for key in ("auroc", "auroc_hospital_mean")}
    out["idh_gap_federated_vs_centralised"] = {
        key: {"per_seed": g, "mean": round(sum(g) / len(g), 4)} for key, g in gaps.items()}
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
