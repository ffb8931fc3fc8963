"""Secure aggregation through the server loop and the hospitals' stage handler (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest

from fedrg.config import SiteConfig, load_config
from fedrg.errors import FedrgError
from fedrg.federated.payload import Payload, Reply
from fedrg.federated.secure import SecureAggregationDriver, client_stage, provision_roster
from fedrg.federated.server import FederationServer


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

    def nodes(self):
        return sorted(self.updates)

    def send(self, action, messages, *, round_, timeout=None):
        out = {}
        for node, p in messages.items():
            if self.drop_at.get(node) == action:
                continue
            if action == "train":
                st = self.state[node]
                st.arrays = {}
                st.put_array_list("pending", [self.updates[node]])
                st.meta["pending_weight"] = float(self.weights[node])
                out[node] = Reply(node, Payload(meta={"site": f"h{node}", "status": "ok"}))
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
    assert result.metrics["rounds"][0]["bytes_up"] > 0
    for node, masked in hospitals.seen_masked.items():
        assert masked.dtype.kind == "u"  # ring elements, not the float update
        assert not np.allclose(masked[:5].astype(np.float64), updates[node], atol=1)


@pytest.mark.parametrize("stage", ["secagg_setup", "secagg_share", "secagg_masked",
                                   "secagg_consistency", "secagg_unmask"])
def test_dropout_at_each_stage_gives_fedavg_of_survivors(tmp_path, stage):
    updates, weights = _data(seed=1)
    result = _run(tmp_path, SecureHospitals(updates, weights, tmp_path, drop_at={2: stage}))
    included = [1, 3, 4] if stage in ("secagg_setup", "secagg_share", "secagg_masked") else [1, 2, 3, 4]
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
    # two hospitals: each one's default policy wants two other hospitals in the sum
    updates, weights = _data(n=2, seed=3)
    result = _run(tmp_path, SecureHospitals(updates, weights, tmp_path), n=2)
    assert "secure aggregation aborted" in result.stopped_early
    assert "min_secagg_peers" in result.stopped_early
    np.testing.assert_array_equal(result.global_arrays[0], 0)
