"""Distributed noise (``policy.noise = 'distributed'``): each hospital adds its share of one
noisy step per round, and the secure sum carries the full noise (docs/privacy.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrg.config import load_config
from fedrg.errors import PolicyViolationError
from fedrg.hospital.plan import Spent, plan_training
from fedrg.hospital.request import check_request
from fedrg.policy import EvaluationPolicy, SitePolicy, noise_share
from fedrg.privacy.accounting import calibrate_noise_multiplier


def _policy(**kw) -> SitePolicy:
    return SitePolicy(noise="distributed", evaluation=EvaluationPolicy(release="none"), **kw)


def test_the_plan_is_one_noisy_step_a_round_with_the_share_from_the_policy():
    policy = _policy(distributed_honest_peers=2)
    cfg = check_request(load_config(None, ["federation.rounds=20"]), policy, round_=1,
                        hospitals_in_round=3)
    plan = plan_training(cfg, policy, n_train=120, spent=Spent(), run_id="r", round_=1)
    assert plan.steps == 1 and plan.noise_mode == "distributed" and plan.honest_peers == 2
    # calibrated for one step per round, at the hospital's own sample rate
    want = calibrate_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=32 / 120,
                                      steps=20, accountant="rdp")
    assert plan.noise_multiplier == pytest.approx(want)
    assert plan.noise_multiplier_added == pytest.approx(plan.noise_multiplier / math.sqrt(3))
    # three honest shares add up to the noise the accountant charges
    assert 3 * plan.noise_multiplier_added ** 2 == pytest.approx(plan.noise_multiplier ** 2)
    assert plan.ledger_details() == {"noise": "distributed", "honest_peers": 2,
                                     "noise_multiplier_added": plan.noise_multiplier_added}
    local = SitePolicy(evaluation=EvaluationPolicy(release="none"))
    lp = plan_training(check_request(load_config(None, ["federation.rounds=20"]), local, round_=1,
                                     hospitals_in_round=3), local, n_train=120, spent=Spent(),
                       run_id="r", round_=1)
    assert lp.noise_multiplier_added == lp.noise_multiplier and lp.ledger_details() == {}


@pytest.mark.parametrize("claimed", [2, 3, 10, 1000])
def test_the_share_never_depends_on_the_peers_a_server_claims(claimed):
    """A server that claims more hospitals in the round cannot shrink a hospital's share."""
    policy = _policy(distributed_honest_peers=2, min_secagg_peers=2)
    try:
        cfg = check_request(load_config(None, ["federation.rounds=5"]), policy, round_=1,
                            hospitals_in_round=claimed)
    except PolicyViolationError:
        assert claimed < policy.min_secure_sum_size
        return
    plan = plan_training(cfg, policy, n_train=120, spent=Spent(), run_id="r", round_=1)
    assert plan.noise_multiplier_added == pytest.approx(plan.noise_multiplier * noise_share(
        noise="distributed", honest_peers=2))


def test_a_policy_cannot_assume_more_honest_peers_than_it_requires():
    with pytest.raises(ValueError, match="min_secagg_peers"):
        SitePolicy(noise="distributed", distributed_honest_peers=3, min_secagg_peers=2)
    with pytest.raises(ValueError, match="require_secagg"):
        SitePolicy(noise="distributed", require_secagg=False)
    assert noise_share(noise="local", honest_peers=0) == 1.0


def test_distributed_noise_refuses_hospital_level_dp():
    policy = _policy()
    with pytest.raises(PolicyViolationError, match="hospital_level"):
        check_request(load_config(None, ["privacy.hospital_level=true"]), policy, round_=1,
                      hospitals_in_round=3)


def test_honest_shares_sum_to_the_full_noise():
    """k Gaussian shares at sigma / sqrt(k) sum to sigma (what the secure sum releases)."""
    rng = np.random.default_rng(0)
    sigma, k, n = 1.3, 3, 400_000
    share = sigma * noise_share(noise="distributed", honest_peers=k - 1)
    total = sum(rng.normal(0.0, share, n) for _ in range(k))
    assert np.std(total) == pytest.approx(sigma, rel=0.01)
