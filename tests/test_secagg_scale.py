"""Secure aggregation at scale, protocol level (no training): issue 16 item 4.

Above 32 clients the default graph is SecAgg+ (``4 ceil(log2 n)`` neighbours) and the ring
is widened to 64 bits when ``bits + ceil(log2 n) > 32``. Every simulated client has its own
Ed25519 identity in one roster and runs the full active-server checks.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg_driver import run_secure_aggregation

from fedrg.secagg import error_bound
from fedrg.secagg.params import auto_neighbours
from fedrg.secagg.quantize import ring_bits


def _round(n, *, bits, drops, seed):
    rng = np.random.default_rng(seed)
    updates = [rng.normal(scale=0.3, size=24).astype(np.float32) for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 100, n)]
    result = run_secure_aggregation(updates, weights, quantization_bits=bits, max_weight=100.0,
                                    drop_at=drops, seed=seed)
    gone = {c for stage in ("setup", "share", "masked") for c in drops.get(stage, [])}
    survivors = [i for i in range(n) if i not in gone]
    assert result.included == survivors
    w = np.array([weights[i] for i in survivors])
    expected = sum(weights[i] * np.clip(updates[i].astype(np.float64), -8, 8) for i in survivors) / w.sum()
    bound = error_bound(list(w), clip_range=8.0, quantization_bits=bits, max_weight=100.0,
                        num_clients=n)
    assert np.max(np.abs(result.mean - expected)) <= bound
    assert result.total_weight == pytest.approx(w.sum(), rel=1e-6)
    return result


def test_hundred_clients_secagg_plus_wide_ring_dropouts_at_every_stage():
    n = 100
    assert auto_neighbours(n) == 28 and ring_bits(n, 26) == 64
    drops = {"setup": [5], "share": [17, 60], "masked": [33], "consistency": [2], "unmask": [71]}
    _round(n, bits=26, drops=drops, seed=3)


@pytest.mark.slow
def test_thousand_clients_complete_at_protocol_level():
    n = 1000
    assert auto_neighbours(n) == 40 and ring_bits(n, 24) == 64  # 24 bits used to refuse > 256
    drops = {"setup": [1], "share": [500], "masked": [7, 999], "consistency": [42], "unmask": [300]}
    _round(n, bits=24, drops=drops, seed=5)
