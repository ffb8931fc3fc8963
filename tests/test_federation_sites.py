"""Real hospital sites (tiny model, real DP-SGD, ledgers, secure aggregation) in one process.

The Flower engine carries exactly these payloads (tests/test_simulation_e2e.py runs them on
Ray); here the round logic of the hospitals is checked quickly and directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_fixtures import tiny_cohort

from fedrg.config import SiteConfig, load_config
from fedrg.federated.local import LocalTransport
from fedrg.federated.runner import run_federation
from fedrg.federated.secure import provision_roster
from fedrg.hospital.plan import Spent, plan_training
from fedrg.hospital.request import check_request
from fedrg.hospital.site import HospitalSite
from fedrg.policy import EvaluationPolicy, SitePolicy
from fedrg.privacy.accounting import PrivacyHistory, epsilon_of
from fedrg.privacy.ledger import Ledger

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohorts(fx_root):
    return [tiny_cohort(fx_root, patients=24, seed=s) for s in (11, 12, 13, 14)]


def _cfg(base_dir, *extra):
    return load_config(None, [
        f"model.base={base_dir}", "model.encoder_width=16", "model.lora_rank=4",
        "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]", "training.local_epochs=0.5",
        "training.batch_size=6", "federation.rounds=2", "federation.min_hospitals=2", *extra])


def _policy(base_dir, **kw):
    from fedrg.model.fingerprint import model_content_hash

    return SitePolicy(allowed_base_models=[model_content_hash(base_dir)], **kw)


def test_nearly_spent_hospital_plans_the_run_within_what_is_left(tmp_path, base_dir, cohorts):
    """A hospital whose lifetime budget cannot hold the whole run at its cap does not train
    round 1 and then decline round 2 (spent, and no model): it plans both rounds within what
    is left, with more noise, and its ledger ends within the budget."""
    cfg = _cfg(base_dir)
    policy = _policy(base_dir)
    probe = HospitalSite(SiteConfig(name="probe", cohort=str(cohorts[2]), state_dir=str(tmp_path / "p"),
                                    policy=policy))
    eff = check_request(cfg, policy, round_=1, hospitals_in_round=3)
    n_train = probe.cohort(eff).n_train
    plan = plan_training(eff, policy, n_train=n_train, spent=Spent(), run_id="probe", round_=1)
    seg = (plan.noise_multiplier, plan.sample_rate, plan.steps)

    def eps(segs):
        return epsilon_of(PrivacyHistory(segs), target_delta=plan.target_delta)

    # h3 already spent an earlier run of two such rounds; its budget fits one more round only
    prior = [seg, seg]
    eps_round1 = eps([*prior, seg])
    budget = (eps_round1 + eps([*prior, seg, seg])) / 2
    # four hospitals: after h3 declines, each of the three left still has two other peers
    sites = provision_roster(
        [SiteConfig(name=f"h{i}", cohort=str(c), state_dir=str(tmp_path / f"s{i}"),
                    # metrics stay on site here, so the ledger holds training rounds only
                    # (DP releases of metrics: tests/test_privacy_release.py, adversary tests)
                    policy=_policy(base_dir, epsilon_budget=budget if i == 3 else 100.0,
                                   evaluation=EvaluationPolicy(release="none")))
         for i, c in enumerate(cohorts, 1)], tmp_path / "roster.toml")
    earlier = Ledger.open(sites[2].state_dir, hospital="h3")
    for rnd, _ in enumerate(prior, 1):
        earlier.append(run_id="earlier", round=rnd, noise_multiplier=seg[0], sample_rate=seg[1],
                       steps=seg[2], max_grad_norm=1.0, accountant="rdp",
                       target_delta=plan.target_delta, epsilon=eps(prior[:rnd]), budget=budget,
                       config_hash="x", dataset_fingerprint="y")
    result = run_federation(LocalTransport(sites), cfg, tmp_path / "run")
    _, r1, r2 = result.metrics["rounds"]
    assert r1["participants"] == 4 and not r1["declined"]
    assert r2["participants"] == 4 and not r2["declined"]
    assert not result.stopped_early
    # each hospital's per-run epsilon stays within the target; the ledgers within the budgets
    assert all(0 < e <= cfg.privacy.target_epsilon + 1e-6 for e in r2["epsilon"].values())
    for site in sites:
        entries = Ledger.open(site.state_dir, hospital=site.name).read()
        assert entries[-1].epsilon <= site.policy.epsilon_budget + 1e-9
    h3 = Ledger.open(sites[2].state_dir, hospital="h3").read()
    h1 = Ledger.open(sites[0].state_dir, hospital="h1").read()
    assert [e.run_id for e in h3].count("earlier") == 2 and len(h3) == 4
    # more noise than the others' plan; both rounds spent something and fit the budget
    assert h3[-1].noise_multiplier > h1[-1].noise_multiplier
    assert eps(prior) < h3[2].epsilon < h3[3].epsilon <= budget + 1e-9
    assert json.loads((tmp_path / "s3" / "train_size.json").read_text())  # known before reading data


def test_updates_leave_masked_and_adapter_changes_by_bounded_amount(tmp_path, base_dir, cohorts):
    cfg = _cfg(base_dir, "federation.rounds=1")
    sites = provision_roster([SiteConfig(name=f"h{i}", cohort=str(c), state_dir=str(tmp_path / f"s{i}"),
                                         policy=_policy(base_dir))
                              for i, c in enumerate(cohorts[:3], 1)], tmp_path / "roster.toml")
    transport = LocalTransport(sites)
    sent = []
    original = transport.send

    def spy(action, messages, **kw):
        replies = original(action, messages, **kw)
        sent.extend((action, r.payload) for r in replies.values() if r.payload is not None)
        return replies

    transport.send = spy
    from fedrg.model.adapter import build_model
    from fedrg.model.payload import get_adapter_arrays

    before = get_adapter_arrays(build_model(cfg.model, cfg.data, seed=cfg.federation.seed))
    result = run_federation(transport, cfg, tmp_path / "run")
    train_replies = [p for a, p in sent if a == "train"]
    assert train_replies and all(not p.arrays and "weight" not in p.meta for p in train_replies)
    masked = [p.arrays["sa.masked"] for a, p in sent if a == "secagg_masked"]
    assert len(masked) == 3 and all(m.dtype == np.uint32 for m in masked)
    change = np.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(result.global_arrays, before, strict=True)))
    assert 0 < change < 10.0


def test_hospital_level_dp_end_to_end_accounts_every_round_in_full(tmp_path, base_dir,
                                                                    cohorts):
    """Hospital-level DP through the real sites and server: updates clipped to C at the
    hospitals, noise on the aggregate, and the server's epsilon at q = 1 even though only
    two of three hospitals are drawn per round (a public fixed-size sample)."""
    from fedrg.privacy.hospital_dp import hospital_level_epsilon

    cfg = _cfg(base_dir, "privacy.hospital_level=true", "privacy.hospital_clip=0.5",
               "privacy.hospital_noise_multiplier=2.0", "federation.fraction_train=0.5",
               "secagg.enabled=false", "privacy.hospital_target_delta=1e-4")
    # sites that allow clear (hospital-clipped) updates: the server adds the noise here
    sites = [SiteConfig(name=f"h{i}", cohort=str(c), state_dir=str(tmp_path / f"s{i}"),
                        policy=_policy(base_dir, require_secagg=False, min_secagg_peers=1))
             for i, c in enumerate(cohorts[:3], 1)]
    result = run_federation(LocalTransport(sites), cfg, tmp_path / "run")
    rows = result.metrics["rounds"][1:]  # after round 0 (the start: nobody trains)
    assert [r["participants"] for r in rows] == [2, 2]
    for rnd, row in enumerate(rows, start=1):
        expected = hospital_level_epsilon(hospital_noise_multiplier=2.0, sample_rate=1.0,
                                          rounds=rnd, target_delta=1e-4)
        assert row["epsilon_hospital_level"] == pytest.approx(expected, rel=1e-9)
    amplified = hospital_level_epsilon(hospital_noise_multiplier=2.0, sample_rate=2 / 3,
                                       rounds=2, target_delta=1e-4)
    assert rows[-1]["epsilon_hospital_level"] > amplified  # no credit for sampling


def test_evaluation_rides_on_the_next_train_message_at_real_hospitals(tmp_path, base_dir, cohorts):
    """Real sites with DP-SGD, DP metric releases and secure aggregation: one `evaluate`
    exchange in the whole run (after the last round); round 1's evaluation comes back inside
    round 2's train replies, and each ledger reads train 1, evaluation 1, train 2, evaluation 2."""
    cfg = _cfg(base_dir)
    sites = provision_roster([SiteConfig(name=f"h{i}", cohort=str(c), state_dir=str(tmp_path / f"s{i}"),
                                         policy=_policy(base_dir))
                              for i, c in enumerate(cohorts[:3], 1)], tmp_path / "roster.toml")
    transport = LocalTransport(sites)
    for node, site in transport.sites.items():
        site._release_seed = 100 + node  # tests only: seeded release noise
    exchanges = []
    original = transport.send

    def spy(action, messages, **kw):
        exchanges.append((action, kw["round_"], {n: dict(p.meta) for n, p in messages.items()}))
        return original(action, messages, **kw)

    transport.send = spy
    result = run_federation(transport, cfg, tmp_path / "run")
    actions = [(a, r) for a, r, _ in exchanges]
    assert actions.count(("evaluate", 2)) == 1 and ("evaluate", 1) not in actions
    train2 = next(m for a, r, m in exchanges if (a, r) == ("train", 2))
    assert all(meta["evaluate_round"] == 1 for meta in train2.values()) and len(train2) == 3
    # round 1's train message carries the starting adapter's evaluation (round 0)
    assert all(meta["evaluate_round"] == 0 for a, r, m in exchanges if (a, r) == ("train", 1)
               for meta in m.values())
    rows = result.metrics["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:  # every round's row holds its evaluation (three DP releases summed;
        # on 24-patient cohorts a noisy count can fall below 1, leaving loss None)
        assert set(row["auroc"]) == set(cfg.data.markers) == set(row["auroc_multimodal"])
        assert "loss" in row and "findings_f1" in row and row["participants"] == 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"] == rows
    for site in sites:
        entries = Ledger.open(site.state_dir, hospital=site.name).read()
        assert [(e.kind, e.round) for e in entries] == [("evaluation", 0), ("train", 1),
                                                         ("evaluation", 1), ("train", 2),
                                                         ("evaluation", 2)]
        # each entry was planned after the one before: the lifetime epsilon includes it
        assert entries[3].epsilon > entries[2].epsilon > entries[1].epsilon > entries[0].epsilon
