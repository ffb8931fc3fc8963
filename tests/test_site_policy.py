"""The site policy at the hospital: accepted rounds use the site's own parameters, the
hospital re-plans a run that already spent part of its cap, non-private rounds are ledgered,
and `fedrg simulate` refuses up front what no simulated hospital would accept.
(Hostile requests: tests/adversary/.)"""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.config import load_config
from fedrg.errors import PolicyViolationError
from fedrg.hospital.plan import Spent, plan_training
from fedrg.hospital.request import check_request
from fedrg.policy import BUILTIN_BASE, EvaluationPolicy, SitePolicy
from fedrg.privacy.accounting import PrivacyHistory


def _plan(cfg, policy, *, n_train, round_, run_history=()):
    """The hospital's plan for a run that already spent ``run_history`` (and nothing else)."""
    run = PrivacyHistory(run_history)
    return plan_training(cfg, policy, n_train=n_train, spent=Spent(lifetime=run, run=run),
                         run_id="r", round_=round_)

SETTINGS_REFUSED = {"privacy.enabled", "secagg.enabled", "secagg.threshold_fraction",
                    "hospitals in the round", "federation.rounds", "round",
                    "privacy.noise_multiplier"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dp=st.booleans(), secagg=st.booleans(), thr=st.floats(0.05, 1.0),
       rounds=st.integers(1, 80), rnd=st.integers(0, 90), peers=st.one_of(st.none(), st.integers(0, 6)),
       sigma=st.one_of(st.none(), st.floats(0.0, 3.0)), clip=st.floats(0.01, 100.0),
       eps=st.floats(0.1, 1e4), val=st.floats(0.01, 0.99),
       require_dp=st.booleans(), require_secagg=st.booleans())
def test_check_request_never_returns_a_config_outside_the_policy(
        dp, secagg, thr, rounds, rnd, peers, sigma, clip, eps, val, require_dp, require_secagg):
    policy = SitePolicy(require_dp=require_dp, require_secagg=require_secagg, accountant="rdp",
                        allowed_base_models=[BUILTIN_BASE])
    cfg = load_config(None, [f"privacy.enabled={str(dp).lower()}", f"secagg.enabled={str(secagg).lower()}",
                             f"secagg.threshold_fraction={thr}", f"federation.rounds={rounds}",
                             f"privacy.max_grad_norm={clip}", f"privacy.target_epsilon={eps}",
                             f"data.val_fraction={val}",
                             *([f"privacy.noise_multiplier={sigma}"] if sigma is not None else [])])
    try:
        eff = check_request(cfg, policy, round_=rnd, hospitals_in_round=peers)
    except PolicyViolationError as err:
        assert err.setting in SETTINGS_REFUSED and err.allowed
        return
    assert eff.privacy.enabled or not policy.require_dp
    assert eff.secagg.enabled or not policy.require_secagg
    if eff.secagg.enabled:
        assert eff.secagg.threshold_fraction >= policy.min_threshold_fraction
        assert peers is not None and peers - 1 >= policy.min_secagg_peers
    assert 1 <= rnd <= eff.federation.rounds <= policy.max_rounds_per_run
    assert eff.privacy.max_grad_norm <= policy.max_grad_norm_cap
    assert eff.privacy.target_epsilon <= policy.epsilon_per_run
    assert (eff.data.val_fraction, eff.data.split_seed) == (policy.val_fraction, policy.split_seed)
    if eff.privacy.enabled and eff.privacy.noise_multiplier is not None:
        assert eff.privacy.noise_multiplier >= policy.min_noise_multiplier


def test_honest_plan_is_the_federation_wide_calibration():
    """Differential: with no history the hospital's sigma is the one calibration of the run."""
    from fedrg.privacy.accounting import calibrate_noise_multiplier
    from fedrg.train.schedule import local_steps, poisson_sample_rate

    policy = SitePolicy(evaluation=EvaluationPolicy(release="none"))  # no release reserve
    cfg = check_request(load_config(None, ["federation.rounds=3"]), policy, round_=1, hospitals_in_round=3)
    n = 120
    plan = _plan(cfg, policy, n_train=n, round_=1)
    q = poisson_sample_rate(batch_size=32, n_records=n)
    steps = local_steps(local_epochs=2.0, batch_size=32, n_records=n)
    want = calibrate_noise_multiplier(target_epsilon=8.0, target_delta=policy.delta_for(n),
                                      sample_rate=q, steps=3 * steps, accountant="rdp")
    assert plan.private and not plan.replanned
    assert (plan.noise_multiplier, plan.sample_rate, plan.steps) == (want, q, steps)
    assert plan.target_delta == 1e-5 and plan.accountant == "rdp"


def test_repeated_round_is_replanned_within_the_run_cap():
    """A resumed run re-sends a round the hospital already trained: sigma goes up so the run
    still ends within its cap (it used to end at 9.17 against 8.0)."""
    from fedrg.privacy.accounting import epsilon_of

    policy = SitePolicy(evaluation=EvaluationPolicy(release="none"))  # no release reserve
    cfg = check_request(load_config(None, ["federation.rounds=3"]), policy, round_=1, hospitals_in_round=3)
    first = _plan(cfg, policy, n_train=120, round_=1)
    seg = (first.noise_multiplier, first.sample_rate, first.steps)
    # round 1 was trained, the server crashed before its checkpoint and sends round 1 again
    again = _plan(cfg, policy, n_train=120, round_=1, run_history=[seg])
    assert again.replanned and again.noise_multiplier > first.noise_multiplier
    run = [seg] + [(again.noise_multiplier, again.sample_rate, again.steps)] * 3
    assert epsilon_of(run, target_delta=1e-5, accountant="rdp") <= 8.0 * (1 + 1e-6)
    # the honest continuation (round 2 after round 1) is not re-planned
    nxt = _plan(cfg, policy, n_train=120, round_=2, run_history=[seg])
    assert not nxt.replanned and nxt.noise_multiplier == first.noise_multiplier
    # a run that has spent its whole cap is refused
    with pytest.raises(PolicyViolationError, match="target_epsilon"):
        _plan(cfg, policy, n_train=120, round_=3, run_history=[(0.3, 0.5, 400)])


def test_fixed_sigma_beyond_the_run_cap_is_refused():
    # a lifetime budget this run cannot reach: the per-run cap is what refuses
    policy = SitePolicy(epsilon_budget=1000.0, evaluation=EvaluationPolicy(release="none"))
    cfg = check_request(load_config(None, ["privacy.noise_multiplier=0.6", "federation.rounds=50"]),
                        policy, round_=1, hospitals_in_round=3)
    with pytest.raises(PolicyViolationError, match="privacy.noise_multiplier"):
        _plan(cfg, policy, n_train=120, round_=40, run_history=[(0.6, 0.27, 8)] * 39)


def test_the_release_reserve_comes_from_the_policy_not_the_request():
    """A request that asks for no evaluation still gets a sigma that leaves room for the
    releases the policy allows (a later evaluate message is checked against the same cap)."""
    from fedrg.privacy.accounting import epsilon_of

    policy = SitePolicy(evaluation=EvaluationPolicy(release="dp", max_releases_per_run=2))
    plans = [_plan(check_request(load_config(None, ["federation.rounds=3", f"federation.fraction_evaluate={f}"]),
                                 policy, round_=1, hospitals_in_round=3), policy, n_train=120, round_=1)
             for f in (0.0, 1.0)]
    assert plans[0].noise_multiplier == plans[1].noise_multiplier
    plan = plans[0]
    assert plan.releases_reserved == 2 and plan.release_noise_multiplier is not None
    run = PrivacyHistory([(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps),
                          (plan.release_noise_multiplier, 1.0, 2)])
    assert epsilon_of(run, target_delta=plan.target_delta) <= 8.0 * (1 + 1e-6)
    none = SitePolicy(evaluation=EvaluationPolicy(release="none"))
    cfg = check_request(load_config(None, ["federation.rounds=3"]), none, round_=1, hospitals_in_round=3)
    assert _plan(cfg, none, n_train=120, round_=1).noise_multiplier < plan.noise_multiplier


def test_a_run_is_planned_within_the_lifetime_budget_left():
    """A hospital whose lifetime budget cannot hold the whole run at its cap plans the run
    within what is left (higher sigma, every round fits) instead of spending and then failing."""
    from fedrg.privacy.accounting import epsilon_of

    policy = SitePolicy(epsilon_budget=10.0, evaluation=EvaluationPolicy(release="none"))
    cfg = check_request(load_config(None, ["federation.rounds=3"]), policy, round_=1, hospitals_in_round=3)
    fresh = _plan(cfg, policy, n_train=120, round_=1)
    earlier = PrivacyHistory([(fresh.noise_multiplier, fresh.sample_rate, 3 * fresh.steps)])  # eps ~8
    spent = Spent(lifetime=earlier, run=PrivacyHistory())
    plans = []
    lifetime = earlier
    for rnd in (1, 2, 3):
        p = plan_training(cfg, policy, n_train=120, spent=Spent(lifetime=lifetime, run=PrivacyHistory(
            [s for s in lifetime][1:])), run_id="r2", round_=rnd)
        plans.append(p)
        lifetime = lifetime.extended(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate,
                                     steps=p.steps)
    assert all(p.budget_limited for p in plans) and plans[0].noise_multiplier > fresh.noise_multiplier
    assert epsilon_of(lifetime, target_delta=fresh.target_delta) <= 10.0 + 1e-6
    assert spent.releases_this_run == 0


def test_a_run_the_budget_left_cannot_hold_above_the_floor_is_refused_up_front():
    policy = SitePolicy(epsilon_budget=8.05, evaluation=EvaluationPolicy(release="none"))
    cfg = check_request(load_config(None, ["federation.rounds=3"]), policy, round_=1, hospitals_in_round=3)
    fresh = _plan(cfg, policy, n_train=120, round_=1)
    earlier = PrivacyHistory([(fresh.noise_multiplier, fresh.sample_rate, 3 * fresh.steps)])  # eps ~8
    # 0.05 left for three more rounds needs sigma ~10 (measured), far above the fresh ~1.2
    floor = policy.model_copy(update={"min_noise_multiplier": 12.0})
    with pytest.raises(PolicyViolationError, match="lifetime budget left"):
        plan_training(cfg, floor, n_train=120, spent=Spent(lifetime=earlier), run_id="r2", round_=1)


# ------------------------------------------------------------------ fedrg simulate up front

def _simulate(tmp_path, *args):
    return CliRunner().invoke(app, ["simulate", "--state-dir", str(tmp_path / "st"),
                                    "--out", str(tmp_path / "run"), *args])


def test_simulate_with_one_hospital_fails_before_training(tmp_path):
    res = _simulate(tmp_path, "--hospitals", "1")
    assert res.exit_code != 0
    assert "no simulated hospital would accept" in res.output and "min_secagg_peers" in res.output
    assert not (tmp_path / "st").exists() and not (tmp_path / "run").exists()


def test_simulate_dp_off_alone_is_refused_by_the_default_policy(tmp_path):
    res = _simulate(tmp_path, "--set", "privacy.enabled=false")
    assert res.exit_code != 0 and "privacy.enabled=False" in res.output
    assert "configs/non-private.toml" in res.output
    # the experiment request cannot set the sites' policy
    res = _simulate(tmp_path, "--set", "site_policy.require_dp=false")
    assert res.exit_code != 0 and "site_policy" in res.output


def test_non_private_config_opts_the_simulated_sites_out_explicitly():
    from pathlib import Path

    from fedrg.commands.federation import check_simulation_policy, simulated_policy
    from fedrg.config import read_experiment_toml

    path = Path(__file__).resolve().parents[1] / "configs" / "non-private.toml"
    cfg = load_config(path)
    _, table = read_experiment_toml(path)
    policy = simulated_policy(table)
    assert not cfg.privacy.enabled and not policy.require_dp and policy.require_secagg
    check_simulation_policy(cfg, policy)  # accepted
    with pytest.raises(Exception, match="privacy.enabled"):
        check_simulation_policy(cfg, simulated_policy(None))


def test_site_policy_file_unknown_key(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("[policy]\nrequire_dp = false\nmin_peers = 1\n")
    res = _simulate(tmp_path, "--site-policy", str(f))
    assert res.exit_code != 0 and "unknown key 'min_peers'" in res.output


# ------------------------------------------------------------------ real rounds (tiny model)

@pytest.fixture
def tiny_site(tmp_path, base_dir, fx_root):
    from model_fixtures import tiny_cohort

    from fedrg.config import SiteConfig
    from fedrg.hospital.site import HospitalSite
    from fedrg.model.fingerprint import model_content_hash

    def make(**policy):
        pol = SitePolicy(allowed_base_models=[model_content_hash(base_dir)], **policy)
        return HospitalSite(SiteConfig(name="h1", cohort=str(tiny_cohort(fx_root, patients=24, seed=21)),
                                       state_dir=str(tmp_path / "state"), policy=pol))
    return make


def _cfg(base_dir, *extra):
    return load_config(None, [
        f"model.base={base_dir}", "model.encoder_width=16", "model.lora_rank=4",
        "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]", "training.local_epochs=0.5",
        "training.batch_size=8", "federation.rounds=2", *extra])


def _request(cfg, rnd=1, run_id="r1"):
    from fedrg.config import to_run_config
    from fedrg.hospital.site import _model_for
    from fedrg.model.payload import get_adapter_arrays
    from fedrg.payload import Payload

    p = Payload(meta={"config": to_run_config(cfg), "round": rnd, "run_id": run_id,
                      "hospitals_in_round": 3})
    p.put_array_list("global", get_adapter_arrays(_model_for(cfg)))
    return p


def test_accepted_round_uses_the_sites_parameters_and_keeps_the_update(tiny_site, base_dir):
    from fedrg.audit.verify import LedgerLocation, audit_ledger
    from fedrg.payload import Payload
    from fedrg.privacy.ledger import Ledger

    site = tiny_site()
    state = Payload()
    reply = site.handle("train", _request(_cfg(base_dir)), state)
    assert reply.meta["status"] == "ok" and reply.meta["private"] is True
    assert not reply.arrays and state.array_list("pending")  # leaves only in the secure sum
    (entry,) = Ledger.open(site.site.state_dir, hospital="h1").read()
    assert entry.accountant == "rdp" and entry.delta == 1e-5 and entry.max_grad_norm == 1.0
    assert entry.noise_multiplier >= site.site.policy.min_noise_multiplier
    assert 0 < reply.meta["epsilon"] < 8.0
    led = Ledger.open(site.site.state_dir, hospital="h1")
    assert audit_ledger(LedgerLocation(led.path, led.path.parent / "ledger_ed25519.pub", "h1")).ok


def test_non_private_round_is_ledgered_when_the_site_opted_out(tiny_site, base_dir, caplog):
    from fedrg.audit.verify import LedgerLocation, audit_ledger
    from fedrg.payload import Payload
    from fedrg.privacy.ledger import NON_PRIVATE, Ledger

    site = tiny_site(require_dp=False, require_secagg=False)
    caplog.set_level(logging.WARNING, logger="fedrg.site")
    reply = site.handle("train", _request(_cfg(base_dir, "privacy.enabled=false", "secagg.enabled=false")),
                        Payload())
    assert reply.meta["status"] == "ok" and reply.meta["private"] is False
    assert reply.array_list("update")  # the site allowed clear updates
    led = Ledger.open(site.site.state_dir, hospital="h1")
    (entry,) = led.read()
    assert entry.accountant == NON_PRIVATE and entry.noise_multiplier == 0.0 and entry.epsilon == 0.0
    assert entry.steps > 0 and led.history() == []
    assert any("WITHOUT DP-SGD" in r.getMessage() for r in caplog.records)
    audit = audit_ledger(LedgerLocation(led.path, led.path.parent / "ledger_ed25519.pub", "h1"))
    # the ledger verifies, but a round without DP is never reported as protected (issue 24)
    assert audit.integrity_ok and not audit.ok and audit.status == "NOT PRIVATE"
    assert "1 training round(s) WITHOUT DP-SGD" in audit.verdict


def test_evaluation_uses_the_sites_split(tiny_site, base_dir):
    """The split evaluation runs on is the site's (policy.val_fraction / split_seed), whatever
    the request asks; and no metric leaves before this hospital trained in the run."""
    from fedrg.payload import Payload

    site = tiny_site()
    greedy_cfg = _cfg(base_dir, "data.val_fraction=0.99", "data.split_seed=7")
    reply = site.handle("evaluate", _request(greedy_cfg), Payload())
    assert reply.meta["status"] == "declined" and "release" not in reply.meta
    honest = site.cohort(_cfg(base_dir)).data.val
    greedy = site.cohort(greedy_cfg).data.val
    assert greedy.indices == honest.indices and 0 < len(honest.indices) < 12
