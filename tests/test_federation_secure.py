"""Secure aggregation through the server loop and the hospitals' stage handler (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrg.config import SiteConfig, load_config
from fedrg.errors import FedrgError, PolicyViolationError
from fedrg.federated.secure import SecureAggregationDriver, provision_roster
from fedrg.federated.server import FederationServer
from fedrg.hospital.replies import declined_reply
from fedrg.hospital.secure import (
    answer_masked_in_train,
    answer_setup_in_train,
    check_masked_in_train,
    check_setup_policy,
    client_stage,
)
from fedrg.payload import Payload, Reply
from fedrg.secagg.wire import MASKED_FIELD, SETUP_FIELD


class SecureHospitals:
    """In-process hospitals: fixed updates, real secure-aggregation client stages and state,
    each with its own long-term key and the roster pinned."""

    def __init__(self, updates, weights, root, drop_at=None):
        self.updates, self.weights = updates, weights
        self.sites = dict(zip(sorted(updates), provision_roster(
            [SiteConfig(name=f"h{n}", cohort=str(root / "no-cohort"), state_dir=str(root / f"h{n}"))
             for n in sorted(updates)], root / "roster.toml"), strict=True))
        self.state = {n: Payload() for n in updates}
        self.drop_at = drop_at or {}  # node -> action at which it stops answering
        self.seen_masked = {}
        self.trained = {}  # node -> train messages it trained on
        self.actions = []  # (round, action) of every message sent

    def nodes(self):
        return sorted(self.updates)

    def send(self, action, messages, *, round_, timeout=None):
        out = {}
        self.actions.append((round_, action))
        for node, p in messages.items():
            if self.drop_at.get(node) in (action, (round_, action)):
                continue
            if action == "train":
                reply = Payload(meta={"site": f"h{node}", "status": "ok"})
                setup, masked = p.meta.get(SETUP_FIELD), p.meta.get(MASKED_FIELD)
                st = self.state[node]
                try:  # the hospital's checks before training, as the site's
                    if setup is not None:
                        check_setup_policy(setup, self.sites[node].policy)
                    if masked is not None:
                        check_masked_in_train(masked, st, site=self.sites[node])
                except PolicyViolationError as err:
                    reply.meta.update(declined_reply(err))
                    out[node] = Reply(node, reply)
                    continue
                except FedrgError as err:
                    out[node] = Reply(node, error=str(err))
                    continue
                self.trained[node] = self.trained.get(node, 0) + 1
                st.arrays = {}
                st.put_array_list("pending", [self.updates[node]])
                st.meta["pending_weight"] = float(self.weights[node])
                if setup is not None:  # the real hospital code: round keys in the train reply
                    answer_setup_in_train(setup, reply, st, site=self.sites[node])
                if masked is not None:  # pipelined: the masked update in the train reply
                    answer_masked_in_train(masked, reply, st, site=self.sites[node])
                    if "sa.masked" in reply.arrays:
                        self.seen_masked[node] = reply.arrays["sa.masked"].copy()
                out[node] = Reply(node, reply)
            elif action == "evaluate":
                out[node] = Reply(node, Payload(meta={"site": f"h{node}", "n": 1, "metrics": {"loss": 0.0}}))
            else:
                try:
                    reply = client_stage(action, p, self.state[node], site=self.sites[node])
                except FedrgError as err:  # a refusal (secagg check or site policy) reaches the server as an error reply
                    out[node] = Reply(node, error=str(err))
                    continue
                if action == "secagg_masked":
                    self.seen_masked[node] = reply.arrays["sa.masked"].copy()
                out[node] = Reply(node, reply)
        return out


def _run(tmp_path, hospitals, n=4):
    cfg = load_config(None, ["federation.rounds=1", f"federation.hospitals={n}", "federation.min_hospitals=2",
                             "secagg.threshold_fraction=0.6"])
    server = FederationServer(cfg, tmp_path, [np.zeros(5, np.float32)],
                              secure_aggregate=SecureAggregationDriver(cfg))
    return server.run(hospitals)


def _data(n=4, seed=0):
    rng = np.random.default_rng(seed)
    updates = {i: rng.uniform(-1, 1, size=5).astype(np.float32) for i in range(1, n + 1)}
    weights = {i: float(10 * i) for i in updates}
    return updates, weights


def _bound(cfg_weights):
    from fedrg.config import SecAggConfig
    from fedrg.secagg.quantize import error_bound

    sa = SecAggConfig(threshold_fraction=0.6)
    return error_bound(cfg_weights, clip_range=sa.clip_range, quantization_bits=sa.quantization_bits,
                       max_weight=sa.max_weight, rounding=sa.rounding)


def _fedavg(updates, weights, nodes):
    w = np.array([weights[i] for i in nodes])
    return sum(weights[i] * updates[i].astype(np.float64) for i in nodes) / w.sum()


def test_secure_round_equals_plain_fedavg_and_server_sees_only_masked(tmp_path):
    updates, weights = _data()
    hospitals = SecureHospitals(updates, weights, tmp_path)
    result = _run(tmp_path, hospitals)
    np.testing.assert_allclose(result.global_arrays[0], _fedavg(updates, weights, [1, 2, 3, 4]),
                               atol=_bound(list(weights.values())))
    assert result.metrics["rounds"][-1]["bytes_up"] > 0
    for node, masked in hospitals.seen_masked.items():
        assert masked.dtype.kind == "u"  # ring elements, not the float update
        assert not np.allclose(masked[:5].astype(np.float64), updates[node], atol=1)


# the setup (stage 1) travels with the train message: a hospital that drops there sends no keys
@pytest.mark.parametrize("stage", ["train", "secagg_share", "secagg_masked",
                                   "secagg_consistency", "secagg_unmask"])
def test_dropout_at_each_stage_gives_fedavg_of_survivors(tmp_path, stage):
    updates, weights = _data(seed=1)
    result = _run(tmp_path, SecureHospitals(updates, weights, tmp_path, drop_at={2: stage}))
    included = [1, 3, 4] if stage in ("train", "secagg_share", "secagg_masked") else [1, 2, 3, 4]
    np.testing.assert_allclose(result.global_arrays[0], _fedavg(updates, weights, included),
                               atol=_bound([weights[i] for i in included]))


def test_below_threshold_aborts_cleanly_and_keeps_global(tmp_path):
    updates, weights = _data(seed=2)
    result = _run(tmp_path, SecureHospitals(updates, weights, tmp_path,
                                            drop_at={1: "secagg_masked", 2: "secagg_masked"}))
    assert "secure aggregation aborted" in result.stopped_early
    np.testing.assert_array_equal(result.global_arrays[0], 0)
    assert result.metrics["rounds"][0]["aggregated"] is False


def test_policy_refusals_are_named_when_the_round_aborts(tmp_path):
    # two hospitals: each one's default policy wants two other hospitals in the sum. The
    # setup comes with the train request, so each refuses before training (nothing spent)
    updates, weights = _data(n=2, seed=3)
    hospitals = SecureHospitals(updates, weights, tmp_path)
    result = _run(tmp_path, hospitals, n=2)
    assert "0 hospital(s) trained" in result.stopped_early
    assert "min_secagg_peers" in result.stopped_early
    assert all("pending_weight" not in st.meta for st in hospitals.state.values())
    np.testing.assert_array_equal(result.global_arrays[0], 0)


def test_standalone_setup_message_still_refused_by_policy_and_named(tmp_path):
    # the driver's five-message path (a setup message of its own) keeps naming the refusal
    updates, weights = _data(n=2, seed=3)
    hospitals = SecureHospitals(updates, weights, tmp_path)
    cfg = load_config(None, ["federation.hospitals=2", "federation.min_hospitals=2"])
    for node in hospitals.nodes():
        hospitals.send("train", {node: Payload()}, round_=1)
    with pytest.raises(FedrgError, match="min_secagg_peers"):
        SecureAggregationDriver(cfg)(hospitals, hospitals.nodes(), 1, 5)


def test_setup_in_the_train_reply_equals_the_five_message_protocol(tmp_path):
    # the same hospitals, the same updates: folded setup and standalone setup sum alike
    updates, weights = _data(seed=4)
    folded = _run(tmp_path / "a", SecureHospitals(updates, weights, tmp_path / "a"))
    hospitals = SecureHospitals(updates, weights, tmp_path / "b")
    cfg = load_config(None, ["federation.hospitals=4", "federation.min_hospitals=2",
                             "secagg.threshold_fraction=0.6"])
    for node in hospitals.nodes():
        hospitals.send("train", {node: Payload()}, round_=1)
    mean, total = SecureAggregationDriver(cfg)(hospitals, hospitals.nodes(), 1, 5)
    np.testing.assert_allclose(folded.global_arrays[0], mean, atol=_bound(list(weights.values())))
    assert total == pytest.approx(sum(weights.values()), rel=1e-6)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), dropped=st.sampled_from([None, 1, 2, 3, 4, 5]),
       stage=st.sampled_from(["train", "secagg_share", "secagg_masked", "secagg_consistency",
                              "secagg_unmask"]))
def test_setup_with_train_sums_like_fedavg_of_the_survivors(tmp_path_factory, seed, dropped, stage):
    """Property: with the setup in the train message, the secure mean equals the weighted
    FedAvg of the hospitals in the sum, whatever single hospital drops at whatever stage."""
    root = tmp_path_factory.mktemp("prop")
    rng = np.random.default_rng(seed)
    updates = {i: rng.uniform(-2, 2, size=5).astype(np.float32) for i in range(1, 6)}
    weights = {i: float(rng.integers(1, 50)) for i in updates}
    drop = {} if dropped is None else {dropped: stage}
    result = _run(root, SecureHospitals(updates, weights, root, drop_at=drop), n=5)
    late = stage in ("secagg_consistency", "secagg_unmask")  # its masked input is in the sum
    included = [i for i in updates if i != dropped or late]
    np.testing.assert_allclose(result.global_arrays[0], _fedavg(updates, weights, included),
                               atol=_bound([weights[i] for i in included]))


# ---------------------------------------------------------------- pipelined set-up
SECAGG_STAGES = ["secagg_share", "secagg_masked", "secagg_consistency", "secagg_unmask"]


def _run_rounds(root, hospitals, *, n=4, rounds=3, pipelined=True):
    cfg = load_config(None, [f"federation.rounds={rounds}", f"federation.hospitals={n}",
                             "federation.min_hospitals=2", "secagg.threshold_fraction=0.6",
                             "federation.fraction_evaluate=0", f"secagg.pipelined={str(pipelined).lower()}"])
    server = FederationServer(cfg, root, [np.zeros(5, np.float32)],
                              secure_aggregate=SecureAggregationDriver(cfg))
    return server.run(hospitals)


def _messages_per_round(hospitals, rounds):
    return [[a for r, a in hospitals.actions if r == rnd] for rnd in range(1, rounds + 1)]


def test_pipelined_rounds_take_three_messages_and_sum_like_fedavg(tmp_path):
    updates, weights = _data(seed=5)
    hospitals = SecureHospitals(updates, weights, tmp_path)
    result = _run_rounds(tmp_path, hospitals)
    # round 1 sets itself up (keys in the train reply) and the next round on its last two
    # messages; every later round is train -> consistency -> unmask
    assert _messages_per_round(hospitals, 3) == [
        ["train", *SECAGG_STAGES], ["train", "secagg_consistency", "secagg_unmask"],
        ["train", "secagg_consistency", "secagg_unmask"]]
    np.testing.assert_allclose(result.global_arrays[0], 3 * _fedavg(updates, weights, [1, 2, 3, 4]),
                               atol=3 * _bound(list(weights.values())))
    assert hospitals.trained == dict.fromkeys(updates, 3)
    for node, masked in hospitals.seen_masked.items():  # round 3's masked input, from the train reply
        assert masked.dtype.kind == "u"
        assert not np.allclose(masked[:5].astype(np.float64), updates[node] * weights[node], atol=1)
    assert all(r["aggregated"] for r in result.metrics["rounds"])


def test_pipelined_and_fresh_set_ups_sum_alike(tmp_path):
    updates, weights = _data(seed=6)
    fresh_hospitals = SecureHospitals(updates, weights, tmp_path / "b")
    piped = _run_rounds(tmp_path / "a", SecureHospitals(updates, weights, tmp_path / "a"))
    fresh = _run_rounds(tmp_path / "b", fresh_hospitals, pipelined=False)
    assert _messages_per_round(fresh_hospitals, 3) == [["train", *SECAGG_STAGES]] * 3
    np.testing.assert_allclose(piped.global_arrays[0], fresh.global_arrays[0],
                               atol=6 * _bound(list(weights.values())))


def test_each_pipelined_round_has_its_own_keys_and_round_id(tmp_path):
    updates, weights = _data(seed=7)
    hospitals = SecureHospitals(updates, weights, tmp_path)
    _run_rounds(tmp_path, hospitals)
    # every round's set-up was answered once, under a round id of its own
    for state in hospitals.state.values():
        seen = list(state.meta["secagg_seen_rounds"])
        assert len(seen) == 3 and len(set(seen)) == 3
        assert "secagg_next_session" not in state.meta  # the last round sets nothing up ahead


@pytest.mark.parametrize("stage", ["train", *SECAGG_STAGES])
def test_a_dropout_in_round_1_falls_back_to_a_fresh_set_up(tmp_path, stage):
    updates, weights = _data(seed=8)
    hospitals = SecureHospitals(updates, weights, tmp_path, drop_at={3: (1, stage)})
    result = _run_rounds(tmp_path, hospitals, rounds=2)
    late = stage in ("secagg_consistency", "secagg_unmask")
    first = [1, 2, 3, 4] if late else [1, 2, 4]
    expected = _fedavg(updates, weights, first) + _fedavg(updates, weights, [1, 2, 3, 4])
    np.testing.assert_allclose(result.global_arrays[0], expected, atol=2 * _bound(list(weights.values())))
    # hospital 3 missed a pipelined part: round 2 is set up afresh, with everyone
    assert _messages_per_round(hospitals, 2)[1] == ["train", *SECAGG_STAGES]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), dropped=st.sampled_from([None, 1, 2, 3, 4, 5]),
       rnd=st.integers(1, 3), stage=st.sampled_from(["train", *SECAGG_STAGES]))
def test_pipelined_rounds_sum_like_fedavg_of_the_survivors(tmp_path_factory, seed, dropped, rnd, stage):
    """Property: over three pipelined rounds, the global model is the sum of each round's
    weighted FedAvg of the hospitals in its sum, whichever hospital drops at whichever
    message of whichever round."""
    root = tmp_path_factory.mktemp("piped")
    rng = np.random.default_rng(seed)
    updates = {i: rng.uniform(-2, 2, size=5).astype(np.float32) for i in range(1, 6)}
    weights = {i: float(rng.integers(1, 50)) for i in updates}
    drop = {} if dropped is None else {dropped: (rnd, stage)}
    hospitals = SecureHospitals(updates, weights, root, drop_at=drop)
    result = _run_rounds(root, hospitals, n=5)
    messages = _messages_per_round(hospitals, 3)
    expected = np.zeros(5)
    for r in (1, 2, 3):
        # a pipelined round has no share or masked message: a drop there cannot happen
        missed = dropped is not None and r == rnd and stage in messages[r - 1]
        late = stage in ("secagg_consistency", "secagg_unmask")  # its masked input is in the sum
        expected += _fedavg(updates, weights, [i for i in updates if not (missed and i == dropped and not late)])
    np.testing.assert_allclose(result.global_arrays[0], expected,
                               atol=3 * _bound(list(weights.values())))
    assert all(r["aggregated"] for r in result.metrics["rounds"])
