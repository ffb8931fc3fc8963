"""Secure-aggregation protocol: correctness vs FedAvg, dropouts, aborts, uniform masked inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats
from secagg_driver import run_secure_aggregation, simulated_trusts

from fedrg.errors import SecAggError
from fedrg.secagg import (
    ClientSession,
    ServerAggregator,
    default_threshold,
    error_bound,
    neighbour_graph,
)
from fedrg.secagg.crypto import seeded_entropy
from fedrg.secagg.params import holders_count
from fedrg.secagg.quantize import check_ring, encode, weight_levels


def fedavg(updates, weights, clip_range, ids=None):
    ids = range(len(updates)) if ids is None else ids
    num = sum(weights[i] * np.clip(np.asarray(updates[i], np.float64), -clip_range, clip_range)
              for i in ids)
    return num / sum(weights[i] for i in ids)


# ---------------------------------------------------------------- correctness (hypothesis)

@st.composite
def rounds(draw):
    n = draw(st.integers(2, 7))
    neighbours = draw(st.sampled_from([0, 2, 4]))
    holders = holders_count(n, neighbours)
    t = draw(st.integers(max(2, holders // 2 + 1), holders))
    length = draw(st.integers(1, 40))
    clip = draw(st.sampled_from([0.5, 1.0, 8.0]))
    bits = draw(st.integers(8, 29))
    values = st.floats(-2 * clip, 2 * clip, allow_nan=False, width=32)
    updates = [np.array(draw(st.lists(values, min_size=length, max_size=length)), np.float32)
               for _ in range(n)]
    weights = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    rounding = draw(st.sampled_from(["nearest", "stochastic"]))
    seed = draw(st.integers(0, 2**31))
    return n, neighbours, t, clip, bits, updates, weights, rounding, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_secure_mean_equals_weighted_fedavg_within_quantisation_bound(case):
    n, neighbours, t, clip, bits, updates, weights, rounding, seed = case
    max_weight = 1000.0
    result = run_secure_aggregation(
        updates, weights, threshold=t, neighbours=neighbours, clip_range=clip,
        quantization_bits=bits, max_weight=max_weight, rounding=rounding, seed=seed,
    )
    bound = error_bound(weights, clip_range=clip, quantization_bits=bits,
                        max_weight=max_weight, rounding=rounding)
    expected = fedavg(updates, weights, clip)
    assert result.included == list(range(n))
    assert np.max(np.abs(result.mean - expected)) <= bound * (1 + 1e-9) + 1e-12
    assert abs(result.total_weight - sum(weights)) <= n * max_weight / (2 * weight_levels(n)) + 1e-9


def test_default_settings_are_precise_on_a_realistic_update():
    rng = np.random.default_rng(0)
    updates = [rng.normal(scale=0.05, size=5000).astype(np.float32) for _ in range(5)]
    weights = [120, 80, 200, 55, 150]
    result = run_secure_aggregation(updates, weights, max_weight=10_000.0, seed=3)
    err = np.max(np.abs(result.mean - fedavg(updates, weights, 8.0)))
    assert err <= error_bound(weights, clip_range=8.0, quantization_bits=24, max_weight=10_000.0)
    assert err < 1e-3
    assert result.mean.shape == (5000,)


def test_stochastic_rounding_is_unbiased():
    """Averaged over independent rounds, stochastic rounding error shrinks like 1/sqrt(R)."""
    step = 2.0 / 255  # 8 bits, clip 1
    x = np.full(2000, (128 + 0.3) * step - 1.0)  # 0.3 of a step above a grid point
    rng = np.random.default_rng(7)
    enc = [encode(x, 1.0, clip_range=1.0, quantization_bits=8, max_weight=1.0,
                  rounding="stochastic", rng=rng, num_clients=2)[:-1].astype(np.float64)
           for _ in range(50)]
    decoded = np.mean(enc) * step - 1.0
    nearest = encode(x, 1.0, clip_range=1.0, quantization_bits=8, max_weight=1.0,
                     num_clients=2)[:-1]
    assert abs(decoded - x[0]) < 0.02 * step          # unbiased
    assert abs(nearest[0] * step - 1.0 - x[0]) > 0.2 * step  # nearest is biased here


# ---------------------------------------------------------------- dropouts and aborts

def _updates(n, length=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=0.5, size=length) for _ in range(n)], list(rng.integers(1, 100, n))


@pytest.mark.parametrize("stage", ["setup", "share", "masked", "consistency", "unmask"])
def test_dropout_at_each_stage_gives_fedavg_of_survivors(stage):
    updates, weights = _updates(7)
    result = run_secure_aggregation(updates, weights, threshold=4, drop_at={stage: [1, 4]},
                                    max_weight=100.0, seed=11)
    survivors = list(range(7)) if stage in ("consistency", "unmask") else [0, 2, 3, 5, 6]
    assert result.included == survivors
    bound = error_bound([weights[i] for i in survivors], clip_range=8.0, quantization_bits=24,
                        max_weight=100.0, num_clients=7)
    assert np.max(np.abs(result.mean - fedavg(updates, weights, 8.0, survivors))) <= bound
    assert result.total_weight == pytest.approx(sum(weights[i] for i in survivors), abs=1e-3)


def test_dropouts_at_several_stages_with_neighbour_graph():
    updates, weights = _updates(12, seed=5)
    drop = {"setup": [0], "share": [5], "masked": [7, 9], "unmask": [3]}
    result = run_secure_aggregation(updates, weights, threshold=5, neighbours=8,
                                    drop_at=drop, max_weight=100.0, seed=2)
    survivors = [i for i in range(12) if i not in (0, 5, 7, 9)]
    assert result.included == survivors
    bound = error_bound([weights[i] for i in survivors], clip_range=8.0, quantization_bits=24,
                        max_weight=100.0, num_clients=12)
    assert np.max(np.abs(result.mean - fedavg(updates, weights, 8.0, survivors))) <= bound


@pytest.mark.parametrize("stage", ["setup", "share", "masked", "consistency", "unmask"])
def test_below_threshold_aborts_cleanly(stage):
    updates, weights = _updates(5)
    with pytest.raises(SecAggError, match="aborted") as info:
        run_secure_aggregation(updates, weights, threshold=4, drop_at={stage: [0, 1]},
                               max_weight=100.0, seed=1)
    # The reason reveals counts only, never values.
    assert "threshold" in str(info.value) or "shares" in str(info.value)
    assert "nan" not in str(info.value).lower()


def test_abort_when_a_survivors_shareholders_are_gone():
    # Ring of 3 holders per client (k=2), t=2: after two dropouts at the masked stage some
    # survivor's seed, or some dropped client's mask key, has fewer than t shareholders left.
    updates, weights = _updates(5)
    with pytest.raises(SecAggError, match=r"aborted: only 1 (self-mask|mask-key) shares"):
        run_secure_aggregation(updates, weights, threshold=2, neighbours=2, seed=4,
                               drop_at={"masked": [1, 3]}, max_weight=100.0)


# ---------------------------------------------------------------- manual protocol harness

class Round:
    """Drive clients and server by hand so tests can intercept messages."""

    def __init__(self, n=4, threshold=3, length=256, neighbours=0, seed=0, updates=None):
        self.n = n
        self.server = ServerAggregator(list(range(n)), vector_length=length, threshold=threshold,
                                       neighbours=neighbours, max_weight=10.0,
                                       round_id=seeded_entropy(f"r{seed}".encode())(16))
        self.trusts = simulated_trusts(n, seed=seed)
        self.clients = [ClientSession(self.trusts[i], seeded_entropy(f"{seed}/{i}".encode()))
                        for i in range(n)]
        self.updates = updates or [np.zeros(length) for _ in range(n)]

    def setup(self):
        req = self.server.setup_requests()
        return self.server.receive_setup({i: self.clients[i].setup(r) for i, r in req.items()})

    def share(self, req):
        return {i: self.clients[i].share(r) for i, r in req.items()}

    def masked(self, req):
        return {i: self.clients[i].masked_input(r, self.updates[i], 1.0) for i, r in req.items()}

    def consistency(self, req):
        return {i: self.clients[i].consistency(r) for i, r in req.items()}

    def unmask(self, req):
        return {i: self.clients[i].unmask(r) for i, r in req.items()}

    def to_unmask(self, req):
        """From the consistency request to the unmask request (all sign)."""
        return self.server.receive_consistency(self.consistency(req))

    def finish(self, req):
        """From the consistency request to the result."""
        return self.server.receive_unmask(self.unmask(self.to_unmask(req)))

    def restore(self):
        self.clients = [ClientSession.from_bytes(c.to_bytes(), t)
                        for c, t in zip(self.clients, self.trusts, strict=True)]


def test_masked_input_seen_by_server_is_uniform():
    """The words the server holds for one client pass uniformity tests; the plain encoding fails."""
    length = 1 << 16
    rnd = Round(n=3, threshold=2, length=length, seed=42)
    masked = rnd.masked(rnd.server.receive_shares(rnd.share(rnd.setup())))
    words = masked[0]["masked"]
    plain = encode(rnd.updates[0], 1.0, clip_range=8.0, quantization_bits=24, max_weight=10.0,
                   num_clients=3)
    for w, expect_uniform in ((words, True), (plain, False)):
        top = np.bincount(w >> np.uint32(24), minlength=256)
        low = np.bincount(w & np.uint32(0xFF), minlength=256)
        p_top = stats.chisquare(top).pvalue
        p_low = stats.chisquare(low).pvalue
        p_ks = stats.kstest(w / 2.0**32, "uniform").pvalue
        if expect_uniform:
            assert min(p_top, p_low, p_ks) > 1e-4, (p_top, p_low, p_ks)
        else:
            assert max(p_top, p_ks) < 1e-10
    # and the protocol still recovers the (zero) mean
    result = rnd.finish(rnd.server.receive_masked(masked))
    assert np.max(np.abs(result.mean)) < 1e-5


def test_tampered_ciphertext_is_rejected():
    rnd = Round()
    req = rnd.server.receive_shares(rnd.share(rnd.setup()))
    ct = bytearray(req[2]["ciphertexts"][0])
    ct[20] ^= 1
    req[2]["ciphertexts"][0] = bytes(ct)
    with pytest.raises(SecAggError, match="authentication"):
        rnd.clients[2].masked_input(req[2], rnd.updates[2], 1.0)


def test_misrouted_ciphertext_is_rejected():
    rnd = Round()
    req = rnd.server.receive_shares(rnd.share(rnd.setup()))
    # A share meant for client 1 from client 0, delivered to client 2 as if for it.
    for_1 = dict(zip(req[1]["senders"], req[1]["ciphertexts"], strict=True))
    idx0 = req[2]["senders"].index(1)  # senders are 1-based indices; index 1 is client 0
    req[2]["ciphertexts"][idx0] = for_1[1]
    with pytest.raises(SecAggError, match="authentication"):
        rnd.clients[2].masked_input(req[2], rnd.updates[2], 1.0)


def test_relabelled_sender_is_rejected():
    rnd = Round()
    req = rnd.server.receive_shares(rnd.share(rnd.setup()))
    req[0]["senders"] = list(reversed(req[0]["senders"]))
    with pytest.raises(SecAggError, match="authentication"):
        rnd.clients[0].masked_input(req[0], rnd.updates[0], 1.0)


def test_ciphertext_from_another_round_is_rejected():
    a, b = Round(seed=1), Round(seed=2)
    req_a = a.server.receive_shares(a.share(a.setup()))
    req_b = b.server.receive_shares(b.share(b.setup()))
    req_a[0]["ciphertexts"][0] = req_b[0]["ciphertexts"][0]
    with pytest.raises(SecAggError, match="authentication"):
        a.clients[0].masked_input(req_a[0], a.updates[0], 1.0)


def test_client_never_reveals_both_kinds_of_share():
    rnd = Round(n=4, threshold=3)
    masked = rnd.masked(rnd.server.receive_shares(rnd.share(rnd.setup())))
    req = rnd.to_unmask(rnd.server.receive_masked(masked))
    client = rnd.clients[0]
    first = client.unmask(req[0])
    assert first["seed_owners"] == [1, 2, 3, 4] and first["key_owners"] == []
    # A lying server now claims client index 4 dropped: refuse its key share.
    lie = {**req[0], "survivors": [1, 2, 3]}
    with pytest.raises(SecAggError, match="differs"):
        client.unmask(lie)
    # Even with valid signatures of the new set (all holders' keys stolen) and its own signed
    # set changed under it, the record of revealed kinds refuses the key share.
    from fedrg.secagg.client import consistency_message

    client.survivors = [1, 2, 3]
    lie["signers"] = [1, 2, 3, 4]
    lie["signatures"] = [rnd.trusts[i - 1].identity.sign(consistency_message(
        client.transcript, i, rnd.trusts[i - 1].identity.name, [1, 2, 3])) for i in lie["signers"]]
    with pytest.raises(SecAggError, match="revealed"):
        client.unmask(lie)


def test_client_refuses_to_sign_a_set_without_itself():
    rnd = Round(n=4, threshold=3)
    rnd.server.receive_masked(rnd.masked(rnd.server.receive_shares(rnd.share(rnd.setup()))))
    with pytest.raises(SecAggError, match="dropped"):
        rnd.clients[1].consistency({"survivors": [1, 3, 4]})


def test_forged_share_is_detected_by_the_server():
    rnd = Round(n=4, threshold=3)
    req = rnd.server.receive_masked(rnd.masked(rnd.server.receive_shares(rnd.share(rnd.setup()))))
    replies = rnd.unmask(rnd.to_unmask(req))
    share = bytearray(replies[1]["seed_shares"][0])
    share[-1] ^= 1
    replies[1]["seed_shares"][0] = bytes(share)
    with pytest.raises(SecAggError, match="aborted"):
        rnd.server.receive_unmask(replies)


def test_forged_share_detected_with_exactly_threshold_shares():
    rnd = Round(n=4, threshold=3)
    req = rnd.server.receive_masked(rnd.masked(rnd.server.receive_shares(rnd.share(rnd.setup()))))
    replies = rnd.unmask(rnd.to_unmask(req))
    del replies[3]
    share = bytearray(replies[0]["seed_shares"][1])
    share[-1] ^= 1
    replies[0]["seed_shares"][1] = bytes(share)
    with pytest.raises(SecAggError, match="commitment"):
        rnd.server.receive_unmask(replies)


def test_server_key_list_must_hold_own_keys_and_no_repeats():
    rnd = Round()
    req = rnd.setup()
    bad = dict(req[0])
    bad["enc_pks"] = [bad["enc_pks"][1], *bad["enc_pks"][1:]]
    with pytest.raises(SecAggError):
        rnd.clients[0].share(bad)


def test_out_of_order_messages_are_refused():
    c = ClientSession(simulated_trusts(3, seed=0)[0])
    with pytest.raises(SecAggError, match="stage"):
        c.unmask({"survivors": [1], "signers": [], "signatures": []})
    with pytest.raises(SecAggError, match="stage"):
        c.consistency({"survivors": [1]})


def test_session_state_roundtrip_mid_round():
    rnd = Round(n=3, threshold=2, length=16)
    req = rnd.server.receive_shares(rnd.share(rnd.setup()))
    rnd.restore()
    req = rnd.server.receive_masked(rnd.masked(req))
    rnd.restore()
    req = rnd.to_unmask(req)
    rnd.restore()
    result = rnd.server.receive_unmask(rnd.unmask(req))
    assert result.included == [0, 1, 2] and result.total_weight == pytest.approx(3.0, abs=1e-5)
    # Secrets are erased once used.
    assert rnd.clients[0].seed is None and rnd.clients[0].mask_sk is None
    with pytest.raises(SecAggError, match="state"):
        ClientSession.from_bytes(b"not json", rnd.trusts[0])
    with pytest.raises(SecAggError, match="another hospital"):
        ClientSession.from_bytes(rnd.clients[0].to_bytes(), rnd.trusts[1])


# ---------------------------------------------------------------- settings

def test_ring_is_widened_for_many_clients_and_refused_only_when_impossible():
    assert ServerAggregator(list(range(8)), vector_length=4, threshold=6,
                            quantization_bits=29).params.ring_bits == 32
    assert ServerAggregator(list(range(9)), vector_length=4, threshold=6,
                            quantization_bits=29).params.ring_bits == 64
    # 24 bits: 32-bit ring up to 256 clients, 64-bit above (issue 16: 257+ used to be refused)
    assert ServerAggregator(list(range(257)), vector_length=4,
                            quantization_bits=24).params.ring_bits == 64
    with pytest.raises(SecAggError, match="quantization_bits"):
        check_ring(2**34, 31)


def test_wide_ring_round_with_dropouts_equals_fedavg():
    # 29 bits with 9 clients needs the 64-bit ring; masks, sums and decoding run in it.
    updates, weights = _updates(9, length=33, seed=9)
    result = run_secure_aggregation(updates, weights, quantization_bits=29, max_weight=100.0,
                                    seed=6, drop_at={"masked": [2], "unmask": [5]})
    survivors = [i for i in range(9) if i != 2]
    bound = error_bound([weights[i] for i in survivors], clip_range=8.0, quantization_bits=29,
                        max_weight=100.0, num_clients=9)
    assert np.max(np.abs(result.mean - fedavg(updates, weights, 8.0, survivors))) <= bound


@pytest.mark.parametrize(("n", "t"), [(4, 2), (4, 5), (4, 1)])
def test_invalid_threshold_is_refused(n, t):
    with pytest.raises(SecAggError, match="threshold"):
        ServerAggregator(list(range(n)), vector_length=4, threshold=t)


def test_client_rejects_bad_update_and_weight():
    for update, weight, match in ((np.array([np.nan] * 16), 1.0, "NaN"),
                                  (np.zeros(16), 11.0, "max_weight"),
                                  (np.zeros(15), 1.0, "values")):
        rnd = Round(n=3, threshold=2, length=16)
        req = rnd.server.receive_shares(rnd.share(rnd.setup()))
        with pytest.raises(SecAggError, match=match):
            rnd.clients[0].masked_input(req[0], update, weight)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 40), st.integers(0, 40), st.binary(min_size=16, max_size=16))
def test_neighbour_graph_is_symmetric_and_regular(n, k, seed):
    members = list(range(1, n + 1))
    graph = neighbour_graph(members, k, seed)
    degree = holders_count(n, k) - 1
    for m, nbrs in graph.items():
        assert m not in nbrs and len(nbrs) == degree
        assert all(m in graph[v] for v in nbrs)


@given(st.integers(2, 200), st.integers(0, 50), st.floats(0.01, 1.0))
def test_default_threshold_is_valid(n, k, fraction):
    t = default_threshold(n, neighbours=k, threshold_fraction=fraction)
    holders = holders_count(n, k)
    assert 2 <= t <= holders and 2 * t > holders


def test_malformed_and_uninvited_replies_count_as_dropouts():
    rnd = Round(n=5, threshold=3, length=8)
    req = rnd.server.receive_shares(rnd.share(rnd.setup()))
    replies = rnd.masked(req)
    replies[1]["masked"] = replies[1]["masked"][:-1]           # wrong length
    replies[2]["masked"] = replies[2]["masked"].astype(np.int64)  # wrong dtype
    replies[99] = {"index": 1, "masked": replies[0]["masked"]}  # not invited
    req = rnd.server.receive_masked(replies)
    assert req[0]["survivors"] == [1, 4, 5]
    result = rnd.finish(req)
    assert result.included == [0, 3, 4] and result.dropped == [1, 2]
    assert any("malformed" in note for note in result.notes)
    assert any("uninvited" in note for note in result.notes)
    assert np.max(np.abs(result.mean)) < 1e-5


def test_server_from_config_uses_the_secagg_section():
    from fedrg.config import SecAggConfig

    cfg = SecAggConfig(threshold_fraction=0.8, neighbours=4, quantization_bits=20,
                       max_weight=500.0, rounding="stochastic")
    agg = ServerAggregator.from_config(cfg, list(range(10)), vector_length=3)
    p = agg.params
    assert (p.neighbours, p.quantization_bits, p.max_weight, p.rounding) == (4, 20, 500.0, "stochastic")
    assert p.threshold == 4  # ceil(0.8 * 5 shareholders)
