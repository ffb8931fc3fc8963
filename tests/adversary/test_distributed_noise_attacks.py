"""Attacks on distributed noise, against real hospital sites and the real secure sum.

Three hospitals with ``policy.noise = 'distributed'`` (each assumes its two peers honest and
adds 1/sqrt(3) of the noise). A hostile server claims more peers, lets a peer drop after the
shares are fixed, or asks for a sum with fewer hospitals than assumed: each attack is either
refused or leaves every hospital within its epsilon, with the share its own policy fixed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from model_fixtures import tiny_cohort

from fedrg.audit.verify import LedgerLocation, audit_ledger
from fedrg.config import SiteConfig
from fedrg.federated.local import LocalTransport
from fedrg.federated.runner import run_federation
from fedrg.federated.secure import provision_roster
from fedrg.payload import Payload, Reply
from fedrg.policy import EvaluationPolicy
from fedrg.privacy.ledger import Ledger

from .hostile import global_arrays, site_policy, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture
def sites(tmp_path, base_dir, fx_root):
    cohorts = [tiny_cohort(fx_root, patients=24, seed=s) for s in (61, 62, 63)]
    policy = site_policy(base_dir, noise="distributed", distributed_honest_peers=2,
                         min_secagg_peers=2, evaluation=EvaluationPolicy(release="none"))
    return provision_roster([SiteConfig(name=f"h{i}", cohort=str(c), state_dir=str(tmp_path / f"s{i}"),
                                        policy=policy) for i, c in enumerate(cohorts, 1)],
                            tmp_path / "roster.toml")


def _cfg(base_dir, *extra):
    return tiny_config(base_dir, "federation.rounds=2", "federation.min_hospitals=2",
                       "federation.fraction_evaluate=0", "secagg.pipelined=false",
                       "training.batch_size=4", *extra)


def _entries(site):
    return [e for e in Ledger.open(site.state_dir, hospital=site.name).read() if e.kind == "train"]


class Hostile(LocalTransport):
    """Real sites behind a server that rewrites train requests and drops chosen replies."""

    def __init__(self, sites, *, claim_peers=None, drop=None):
        super().__init__(sites)
        self.claim_peers, self.drop = claim_peers, drop or {}

    def send(self, action, messages, *, round_, timeout=None):
        if action == "train" and self.claim_peers is not None:
            messages = {n: Payload(meta={**p.meta, "hospitals_in_round": self.claim_peers},
                                   arrays=p.arrays) for n, p in messages.items()}
        replies = super().send(action, messages, round_=round_, timeout=timeout)
        for node in self.drop.get((action, round_), ()):
            replies[node] = Reply(node, error="dropped by the attack")
        return replies


def test_honest_distributed_rounds_share_the_noise_and_audit_clean(tmp_path, base_dir, sites):
    result = run_federation(LocalTransport(sites), _cfg(base_dir), tmp_path / "run")
    assert [r["participants"] for r in result.metrics["rounds"]] == [3, 3]
    for site in sites:
        entries = _entries(site)
        assert [e.steps for e in entries] == [1, 1]
        for e in entries:
            assert e.details["noise"] == "distributed" and e.details["honest_peers"] == 2
            assert e.details["noise_multiplier_added"] == pytest.approx(e.noise_multiplier / math.sqrt(3))
        path = Ledger.open(site.state_dir, hospital=site.name).path
        audit = audit_ledger(LedgerLocation(hospital_hint=site.name, ledger=path,
                                            public_key=path.parent / "ledger_ed25519.pub"))
        assert not audit.problems, audit.problems
        assert entries[-1].epsilon <= 8.0 + 1e-6


def test_attack_server_claims_more_peers(tmp_path, base_dir, sites):
    """The server says 30 hospitals take part: each hospital still adds sigma / sqrt(3), the
    share its own policy fixes (a share taken from the request would be sigma / sqrt(30))."""
    result = run_federation(Hostile(sites, claim_peers=30), _cfg(base_dir), tmp_path / "run")
    assert result.metrics["rounds"][0]["participants"] == 3
    for site in sites:
        for e in _entries(site):
            assert e.details["noise_multiplier_added"] == pytest.approx(e.noise_multiplier / math.sqrt(3))


def test_attack_peer_drops_after_the_shares_are_fixed(tmp_path, base_dir, sites):
    """h3's masked update never reaches the sum: two contributors are fewer than the three
    each hospital assumed, so the survivors refuse to unmask; nothing is released and the
    global adapter stays as it was (the training is charged anyway: conservative)."""
    cfg = _cfg(base_dir, "federation.rounds=1")
    start = global_arrays(cfg)
    result = run_federation(Hostile(sites, drop={("secagg_masked", 1): [3]}), cfg, tmp_path / "run")
    assert "secure aggregation aborted" in result.metrics.get("stopped_early", "")
    for got, want in zip(result.global_arrays, start, strict=True):
        np.testing.assert_array_equal(got, want)
    assert all(len(_entries(site)) == 1 for site in sites)


def test_attack_sum_with_fewer_hospitals_than_assumed(tmp_path, base_dir, sites):
    """The server samples two of the three hospitals: each refuses before training (its
    policy needs three in every sum), so nothing is spent."""
    cfg = _cfg(base_dir, "federation.rounds=1", "federation.fraction_train=0.5")
    result = run_federation(LocalTransport(sites), cfg, tmp_path / "run")
    row = result.metrics["rounds"][0]
    assert row["participants"] == 0
    assert all("hospitals in the round" in why for why in row["declined"].values())
    assert all(not _entries(site) for site in sites)
