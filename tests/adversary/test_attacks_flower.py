"""The DP-off attack through real Flower processes (simulation engine, Ray): every hospital
refuses in its own ClientApp, nothing is spent, the server records why, and the run ends
without an aggregate."""

from __future__ import annotations

import pytest
from model_fixtures import tiny_cohort

from fedrg.config import SiteConfig
from fedrg.privacy.ledger import Ledger

from .hostile import site_policy, tiny_config

pytestmark = pytest.mark.slow


def test_attack_dp_off_through_flower(tmp_path, base_dir, fx_root):
    from fedrg.flower.simulation import run_simulated_federation

    cohorts = [tiny_cohort(fx_root, patients=24, seed=s) for s in (31, 32, 33)]
    sites = [SiteConfig(name=f"h{i}", cohort=str(c), state_dir=str(tmp_path / f"s{i}"),
                        policy=site_policy(base_dir)) for i, c in enumerate(cohorts, 1)]
    cfg = tiny_config(base_dir, "privacy.enabled=false", "secagg.enabled=false")
    result = run_simulated_federation(cfg, tmp_path / "run", sites, num_cpus=1)
    start, row = result.metrics["rounds"]
    # round 0 (the starting adapter): no hospital releases metrics for a run it refuses
    assert start["round"] == 0 and not start["auroc"] and not start["epsilon"]
    assert not row["aggregated"] and row["participants"] == 0
    assert set(row["declined"]) == {"h1", "h2", "h3"}
    assert all(r.startswith("policy_violation: privacy.enabled=False") for r in row["declined"].values())
    assert "fewer than federation.min_hospitals" in result.stopped_early
    for site in sites:  # nothing spent, nothing written, no data read
        led = Ledger.open(site.state_dir, hospital=site.name)
        assert not led.path.exists() or led.read() == []
        assert not (tmp_path / f"s{site.name[1:]}" / "train_size.json").exists()
