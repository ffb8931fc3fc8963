"""Federated (non-private and DP) vs centralised training on the default synthetic federation.

All three models are evaluated on the same held-out patients, two ways: ``auroc`` pools the
hospitals' validation splits into one AUROC; ``auroc_hospital_mean`` is the mean of each
hospital's own AUROC weighted by its validation size, which is what federated evaluation
reports each round (hospitals never pool per-patient predictions). The
federation runs in-process (``LocalTransport``: the same hospital code and payloads as the
Flower apps, without Ray), so the comparison is about learning, not the engine.

    .venv/bin/python benchmarks/federated_vs_centralised.py [--rounds R] [--set k=v ...]

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
    from fedrg.commands.federation import simulated_sites, synthetic_cohorts
    from fedrg.config import load_config
    from fedrg.data.dataset import CohortDataset
    from fedrg.federated.local import LocalTransport
    from fedrg.federated.runner import run_federation
    from fedrg.federated.site import HospitalSite
    from fedrg.model.adapter import build_model
    from fedrg.model.payload import set_adapter_arrays
    from fedrg.train.evaluate import evaluate
    from fedrg.train.loop import train_local

    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--skip-dp", action="store_true")
    args = ap.parse_args()
    base = load_config(None, [*args.overrides, "secagg.enabled=true"])
    cohorts = synthetic_cohorts(base)
    out: dict = {"config": {"hospitals": base.federation.hospitals, "rounds": base.federation.rounds,
                            "local_epochs": base.training.local_epochs,
                            "patients_per_hospital": base.data.synthetic_patients}}
    work = Path(tempfile.mkdtemp(prefix="fedrg-bench-"))

    def pooled_sets(cfg):
        train, val, per_site = [], [], {}
        for site in simulated_sites(cohorts, work / "unused", 1e9):
            cache = HospitalSite(site).cohort(cfg)
            train.append(CohortDataset(cache.cohort, cfg.data, cache.train_idx))
            v = CohortDataset(cache.cohort, cfg.data, cache.val_idx)
            val.append(v)
            per_site[site.name] = v
        return ConcatDataset(train), ConcatDataset(val), per_site

    def hospital_mean(model, per_site):
        """Validation-size-weighted mean of per-hospital image-only AUROCs (federated eval)."""
        got = {h: (len(ds), evaluate(model, ds, generate=False)["auroc"]) for h, ds in per_site.items()}
        markers = next(iter(got.values()))[1]
        return {m: sum(n * a[m] for n, a in got.values()) / sum(n for n, _ in got.values())
                for m in markers}, {h: a["idh_mutant"] for h, (_, a) in got.items()}

    def add_collate(ds):
        ds.empty_batch = ds.datasets[0].empty_batch  # ConcatDataset of CohortDatasets
        return ds

    # centralised: pooled training splits, comparable epochs (rounds x local_epochs), no DP
    cfg = base.model_copy(deep=True)
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
    out["centralised"] = {"epochs": epochs, "steps": steps, "seconds": seconds,
                          "auroc": ev["auroc"], "auroc_hospital_mean": mean,
                          "idh_auroc_by_hospital": by_site,
                          "auroc_multimodal": ev["auroc_multimodal"], "findings_f1": ev["findings_f1"]}

    runs = [("federated", ["privacy.enabled=false"])]
    if not args.skip_dp:
        runs.append(("federated_dp", ["privacy.enabled=true"]))
    for name, extra in runs:
        cfg = load_config(None, [*args.overrides, *extra])
        sites = simulated_sites(cohorts, work / name / "sites", 1e9)
        t0 = time.perf_counter()
        result = run_federation(LocalTransport(sites), cfg, work / name / "run")
        fed_model = build_model(cfg.model, cfg.data, seed=cfg.federation.seed)
        set_adapter_arrays(fed_model, result.global_arrays)
        ev = evaluate(fed_model, val)
        rows = result.metrics["rounds"]
        mean, by_site = hospital_mean(fed_model, per_site)
        entry = {"seconds": round(time.perf_counter() - t0, 1), "auroc": ev["auroc"],
                 "auroc_hospital_mean": mean, "idh_auroc_by_hospital": by_site,
                 "auroc_multimodal": ev["auroc_multimodal"], "findings_f1": ev["findings_f1"],
                 "idh_auroc_by_round": [r["auroc"].get("idh_mutant") for r in rows]}
        if cfg.privacy.enabled:
            entry["epsilon"] = rows[-1]["epsilon"]
        out[name] = entry
    cen, fed = out["centralised"], out["federated"]
    out["idh_gap_federated_vs_centralised"] = {
        key: round(cen[key]["idh_mutant"] - fed[key]["idh_mutant"], 4)
        for key in ("auroc", "auroc_hospital_mean")}
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
