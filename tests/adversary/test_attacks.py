"""Each test: one attack by a hostile server on the real hospital code. The attack is refused
(typed reply naming the setting, no data, nothing spent, no patient file read) or has no
effect (the hospital trains with its own parameters, and its ledger shows them)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from fedrg.audit.verify import LedgerLocation, audit_ledger
from fedrg.errors import ConfigError
from fedrg.payload import Payload
from fedrg.privacy.accounting import epsilon_of
from fedrg.privacy.ledger import Ledger

from .conftest import ledger_bytes
from .hostile import HONEST_RUN, assert_refused, honest_request, request, tiny_config


def _entries(site):
    return Ledger.open(site.site.state_dir, hospital=site.site.name).read()


def _run_epsilon(site, run_id):
    e = [x for x in _entries(site) if x.run_id == run_id]
    return epsilon_of([x.segment for x in e], target_delta=e[-1].delta, accountant="rdp")


def test_attack_dp_off(hospital, base_dir, no_patient_reads, caplog):
    """DP and secure aggregation off, round after round: every round refused, nothing spent."""
    before = ledger_bytes(hospital)
    caplog.set_level(logging.WARNING, logger="fedrg.site")
    for rnd in (1, 2):
        state = Payload()
        reply = hospital.handle("train", honest_request(
            base_dir, "privacy.enabled=false", "secagg.enabled=false", round_=rnd,
            run_id="run-evil"), state)
        assert_refused(reply, "privacy.enabled", state)
    # DP off alone (secure aggregation on) is refused just the same
    reply = hospital.handle("train", honest_request(base_dir, "privacy.enabled=false"), Payload())
    assert_refused(reply, "privacy.enabled")
    assert ledger_bytes(hospital) == before
    assert sum("refuses round" in r.getMessage() and "privacy.enabled" in r.getMessage()
               for r in caplog.records) == 3


def test_attack_low_sigma(hospital, base_dir, caplog):
    """A tiny fixed sigma is refused; a huge target epsilon is capped by the site's own cap."""
    before = ledger_bytes(hospital)
    with pytest.MonkeyPatch.context() as mp:
        import fedrg.data.cohort as cohort_mod

        mp.setattr(cohort_mod, "load_cohort", lambda *a, **k: pytest.fail("patient data read"))
        for sigma in (0.0, 0.01, 0.49):
            reply = hospital.handle("train", honest_request(
                base_dir, f"privacy.noise_multiplier={sigma}", run_id="run-evil"), Payload())
            assert_refused(reply, "privacy.noise_multiplier")
    assert ledger_bytes(hospital) == before
    # target_epsilon 1000 would make sigma tiny: the hospital calibrates to its per-run cap
    state = Payload()
    reply = hospital.handle("train", honest_request(
        base_dir, "privacy.target_epsilon=1000", "federation.rounds=1", run_id="run-greedy"), state)
    assert reply.meta["status"] == "ok" and not reply.arrays  # the update waits for the secure sum
    last = _entries(hospital)[-1]
    assert last.run_id == "run-greedy" and last.noise_multiplier >= hospital.site.policy.min_noise_multiplier
    cap = hospital.site.policy.epsilon_per_run
    assert reply.meta["epsilon"] <= cap * (1 + 1e-6)
    assert _run_epsilon(hospital, "run-greedy") <= cap * (1 + 1e-6)
    assert _run_epsilon(hospital, "run-greedy") > 0.9 * cap  # the cap, not the request, decided


def test_attack_delta_accountant(hospital, base_dir):
    """A request naming a delta or an accountant is refused before anything is read or spent
    (they are the site's to fix, not the server's to ask); a huge clipping norm is capped, and
    the ledger holds the site's own delta and accountant."""
    n_before = len(_entries(hospital))
    for key, value in (("privacy.target_delta", 0.008264), ("privacy.accountant", "gdp")):
        hostile = honest_request(base_dir, round_=2, run_id=HONEST_RUN)
        hostile.meta["config"][key] = value
        with pytest.raises(ConfigError, match=key):
            hospital.handle("train", hostile, Payload())
        assert len(_entries(hospital)) == n_before
    state = Payload()
    reply = hospital.handle("train", honest_request(
        base_dir, "privacy.max_grad_norm=1000", round_=2, run_id=HONEST_RUN), state)
    assert reply.meta["status"] == "ok", reply.meta
    entries = _entries(hospital)
    assert len(entries) == n_before + 1
    new = entries[-1]
    policy = hospital.site.policy
    n_train = hospital._known_train_size(tiny_config(base_dir).model_copy(update={
        "data": tiny_config(base_dir).data.model_copy(update={"val_fraction": policy.val_fraction})}))
    assert new.delta == policy.delta_for(n_train) <= 1e-5
    assert new.accountant == policy.accountant == "rdp"
    assert new.max_grad_norm == policy.max_grad_norm_cap
    # the recorded epsilon is the site's accounting, and an independent audit agrees
    audit = audit_ledger(LedgerLocation(hospital_hint="h1",
                                        ledger=hospital._ledger().path,
                                        public_key=hospital._ledger().path.parent / "ledger_ed25519.pub"))
    assert audit.ok, audit.problems


def test_attack_inflated_sampling(hospital, base_dir, no_patient_reads):
    """A batch as large as the cohort (q = 1) or a flood of local epochs is refused up front."""
    before = ledger_bytes(hospital)
    reply = hospital.handle("train", honest_request(base_dir, "training.batch_size=1000"), Payload())
    assert_refused(reply, "training.batch_size")
    assert "max_sample_rate" in reply.meta["allowed"]
    reply = hospital.handle("train", honest_request(base_dir, "training.local_epochs=99"), Payload())
    assert_refused(reply, "training.local_epochs")
    assert ledger_bytes(hospital) == before


def test_attack_secagg_off(hospital, base_dir, no_patient_reads):
    """Clear updates, a weak threshold, too few peers (or none said): refused, nothing sent."""
    before = ledger_bytes(hospital)
    for overrides, setting, peers in [
        (["secagg.enabled=false"], "secagg.enabled", 3),
        (["secagg.threshold_fraction=0.2"], "secagg.threshold_fraction", 3),
        ([], "hospitals in the round", 2),        # only one other hospital
        ([], "hospitals in the round", None),     # the server does not say
    ]:
        state = Payload()
        reply = hospital.handle("train", honest_request(base_dir, *overrides,
                                                         hospitals_in_round=peers), state)
        assert_refused(reply, setting, state)
    assert ledger_bytes(hospital) == before


def test_attack_secagg_setup_below_policy(hospital, base_dir):
    """After training, a secure sum of two clients (one peer) is refused and the update dropped."""
    from fedrg.errors import PolicyViolationError
    from fedrg.secagg.server import ServerAggregator
    from fedrg.secagg.wire import to_payload

    cfg = tiny_config(base_dir)
    state = Payload(meta={"pending_weight": 18.0, "pending_round": 1})
    state.put_array_list("pending", [np.ones(4, dtype=np.float32)])
    agg = ServerAggregator.from_config(cfg.secagg, [1, 2], vector_length=4)
    setup = agg.setup_requests()[1]
    with pytest.raises(PolicyViolationError, match="secure-sum clients"):
        hospital.handle("secagg_setup", to_payload(setup), state)
    assert not state.arrays and "pending_weight" not in state.meta


def _setup_for(cfg, clients, *, vector_length=4):
    from fedrg.secagg.server import ServerAggregator

    agg = ServerAggregator.from_config(cfg.secagg, clients, vector_length=vector_length)
    return agg, agg.setup_requests()[clients[0]]


def test_attack_secagg_setup_in_train_below_policy(hospital, base_dir, no_patient_reads):
    """The setup that rides on the train request: a two-client sum is refused before training,
    with nothing spent, no patient file read and nothing pending."""
    from fedrg.secagg.wire import SETUP_FIELD

    before = ledger_bytes(hospital)
    req = honest_request(base_dir, hospitals_in_round=3)
    req.meta[SETUP_FIELD] = _setup_for(tiny_config(base_dir), [1, 2])[1]
    state = Payload()
    assert_refused(hospital.handle("train", req, state), "secure-sum clients", state)
    assert ledger_bytes(hospital) == before


def test_attack_replayed_secagg_round_id_in_train(hospital, base_dir, no_patient_reads):
    """A train request whose setup reuses a round id the hospital answered: refused before
    training (a replay cannot make the hospital spend budget), nothing pending."""
    from fedrg.errors import SecAggError
    from fedrg.secagg.wire import SEEN_ROUNDS_KEY, SETUP_FIELD

    before = ledger_bytes(hospital)
    _, setup = _setup_for(tiny_config(base_dir), [1, 2, 3])
    req = honest_request(base_dir, hospitals_in_round=3)
    req.meta[SETUP_FIELD] = setup
    state = Payload(meta={SEEN_ROUNDS_KEY: [bytes(setup["round_id"]).hex()]})
    with pytest.raises(SecAggError, match="replay"):
        hospital.handle("train", req, state)
    assert ledger_bytes(hospital) == before
    assert not state.arrays and "pending_weight" not in state.meta


def test_secagg_setup_in_train_reply_carries_only_signed_keys(hospital, base_dir, tmp_path):
    """The honest folded setup: the train reply carries the hospital's signed round keys (and
    no update); the update waits in the node's state for the masked upload."""
    from fedrg.config import SiteConfig
    from fedrg.federated.secure import provision_roster
    from fedrg.hospital.site import HospitalSite
    from fedrg.secagg.client import key_message
    from fedrg.secagg.roster import load_roster
    from fedrg.secagg.wire import KEYS_FIELD, SETUP_FIELD

    peers = [SiteConfig(name=f"p{i}", cohort=str(tmp_path / "none"), state_dir=str(tmp_path / f"p{i}"))
             for i in (2, 3)]
    site = provision_roster([hospital.site, *peers], tmp_path / "roster.toml")[0]
    h = HospitalSite(site)
    cfg = tiny_config(base_dir)
    agg, setup = _setup_for(cfg, [1, 2, 3], vector_length=sum(a.size for a in
                                                               honest_request(base_dir).array_list("global")))
    req = honest_request(base_dir, round_=2, run_id=HONEST_RUN, hospitals_in_round=3)
    req.meta[SETUP_FIELD] = setup
    state = Payload()
    reply = h.handle("train", req, state)
    assert reply.meta["status"] == "ok", reply.meta
    keys = reply.meta[KEYS_FIELD]
    assert not reply.arrays and "weight" not in reply.meta
    assert set(keys) == {"index", "enc_pk", "mask_pk", "name", "key_signature"}
    roster = load_roster(site.roster)
    assert roster.verify("h1", key_message(agg.context, 1, "h1", keys["enc_pk"], keys["mask_pk"]),
                         keys["key_signature"])
    assert state.array_list("pending") and state.meta["pending_weight"] > 0


def test_attack_rounds_inflated(hospital, base_dir, no_patient_reads):
    """Too many rounds, a round past the schedule: refused up front."""
    before = ledger_bytes(hospital)
    reply = hospital.handle("train", honest_request(base_dir, "federation.rounds=51"), Payload())
    assert_refused(reply, "federation.rounds")
    reply = hospital.handle("train", honest_request(base_dir, round_=3, run_id=HONEST_RUN), Payload())
    assert_refused(reply, "round")
    assert ledger_bytes(hospital) == before


@pytest.mark.slow
def test_attack_rounds_inflated_schedule_stretched(hospital, base_dir):
    """Sigma was planned for 2 rounds; the server keeps adding rounds: the run stays in its cap."""
    cap = hospital.site.policy.epsilon_per_run
    for rnd in (2, 3, 4):
        reply = hospital.handle("train", honest_request(
            base_dir, f"federation.rounds={rnd + 1}", round_=rnd, run_id=HONEST_RUN), Payload())
        assert reply.meta["status"] in ("ok", "declined")
        assert _run_epsilon(hospital, HONEST_RUN) <= cap * (1 + 1e-6)
    assert all(e.noise_multiplier >= hospital.site.policy.min_noise_multiplier
               for e in _entries(hospital))


def test_attack_unlisted_base_model(hospital, base_dir, tmp_path, no_patient_reads):
    """A tampered copy of the allowed base, a missing directory, an unlisted built-in."""
    before = ledger_bytes(hospital)
    evil = tmp_path / "evil-base"
    shutil.copytree(base_dir, evil)
    cfg_file = evil / "config.json"
    cfg_file.write_text(cfg_file.read_text() + "\n")
    for base in (str(evil), str(tmp_path / "missing"), "builtin:tiny"):
        reply = hospital.handle("train", honest_request(base_dir, f"model.base='{base}'"), Payload())
        assert_refused(reply, "model.base")
        assert "allowed_base_models" in reply.meta["allowed"]
    # the listed base, under another path, is accepted by content (no name trust either way)
    from fedrg.hospital.request import check_base_model

    same = tmp_path / "same-base"
    shutil.copytree(base_dir, same)
    check_base_model(str(same), hospital.site.policy)
    assert ledger_bytes(hospital) == before


def test_attack_malformed_global_adapter(hospital, base_dir, no_patient_reads):
    """NaN/Inf, wrong shapes or a wrong number of arrays: refused before any ledger entry."""
    from .hostile import global_arrays

    before = ledger_bytes(hospital)
    cfg = tiny_config(base_dir)
    good = global_arrays(cfg)
    nan = [a.copy() for a in good]
    nan[0].flat[0] = np.nan
    inf = [a.copy() for a in good]
    inf[-1].flat[-1] = np.inf
    shapes = [a.copy() for a in good]
    shapes[1] = np.zeros((shapes[1].size + 1,), dtype=np.float32)
    for arrays in (nan, inf, shapes, good[:-1]):
        reply = hospital.handle("train", request(cfg, arrays=arrays), Payload())
        assert reply.meta["status"] == "declined" and "global adapter" in reply.meta["setting"]
        assert not reply.arrays
    # sizes a message may ask to allocate are bounded
    reply = hospital.handle("train", honest_request(base_dir, "data.image_shape=[4096, 4096]"), Payload())
    assert_refused(reply, "data.image_shape")
    reply = hospital.handle("train", honest_request(base_dir, "model.encoder_width=100000"), Payload())
    assert_refused(reply, "model.encoder_width")
    assert ledger_bytes(hospital) == before


def test_attack_hospital_noise_share_shrunk(hospital, base_dir):
    """Hospital-level DP in a secure sum: each hospital adds sigma*C/sqrt(k) of noise, k the
    hospitals in the sum. A server claiming a huge federation.min_hospitals would shrink every
    share; the site uses its own guarantee (policy.min_secagg_peers + 1) instead."""
    common = ["privacy.hospital_level=true", "privacy.hospital_clip=1.0",
              "privacy.hospital_noise_multiplier=1.0"]
    stds = []
    for min_hospitals in ("3", "1000"):
        state = Payload()
        reply = hospital.handle("train", honest_request(
            base_dir, *common, "federation.hospitals=1000",
            f"federation.min_hospitals={min_hospitals}"), state)
        assert reply.meta["status"] == "ok", reply.meta
        stds.append(float(np.concatenate([a.ravel() for a in state.array_list("pending")]).std()))
    k = hospital.site.policy.min_secagg_peers + 1
    # the clipped update has norm <= 1 over ~10^5 coordinates: the noise dominates the std
    assert stds[0] == pytest.approx(1.0 / np.sqrt(k), rel=0.05)
    assert stds[1] == pytest.approx(stds[0], rel=0.05)
