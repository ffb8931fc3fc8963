"""Masks expanded before the update exists (pipelined rounds: while the hospital trains).

:meth:`ClientSession.precompute_masks` must give, through :meth:`ClientSession.masked_input`,
bit for bit the masked upload the session makes when it expands its masks itself, and
masked_input must ignore masks made for another session or other partners (it expands its
own then), so a mix-up can never send an update under the wrong masks.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg_driver import simulated_trusts

from fedrg.secagg import ClientSession, ServerAggregator, crypto, parallel
from fedrg.secagg.quantize import _BLOCK

N = 4
LENGTH = 2 * _BLOCK + 11  # several encoding blocks: slices start past 0


def _sessions_at_masked(seed: int):
    """N sessions that have exchanged shares; their stage-3 requests; the trusts."""
    trusts = simulated_trusts(N, seed=seed)
    agg = ServerAggregator(list(range(N)), vector_length=LENGTH, neighbours=0, max_weight=100.0,
                           round_id=crypto.seeded_entropy(f"{seed}/round".encode())(16))
    sessions = [ClientSession(trusts[i], crypto.seeded_entropy(f"{seed}/{i}".encode()))
                for i in range(N)]
    req = agg.setup_requests()
    req = agg.receive_setup({i: sessions[i].setup(r) for i, r in req.items()})
    req = agg.receive_shares({i: sessions[i].share(r) for i, r in req.items()})
    return sessions, req, trusts


def _copy(session: ClientSession, trust, tag: str) -> ClientSession:
    return ClientSession.from_bytes(session.to_bytes(), trust, crypto.seeded_entropy(tag.encode()))


@pytest.mark.parametrize("threads", [1, 3])
def test_precomputed_masks_give_the_same_masked_upload(threads, monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", threads)
    sessions, req, trusts = _sessions_at_masked(seed=5)
    x = np.random.default_rng(5).normal(scale=2.0, size=LENGTH).astype(np.float32)
    for i, s in enumerate(sessions):
        masks = _copy(s, trusts[i], "p").precompute_masks(req[i])
        assert masks.partners == tuple(v for v in range(1, N + 1) if v != i + 1)
        assert masks.vector.shape == (LENGTH + 1,) and masks.vector.any()
        fresh, pre = _copy(s, trusts[i], "same"), _copy(s, trusts[i], "same")
        expected = fresh.masked_input(req[i], x, 40.0)["masked"]
        got = pre.masked_input(req[i], x, 40.0, masks=masks)["masked"]
        assert np.array_equal(got, expected)
        assert pre.to_bytes() == fresh.to_bytes()  # same state afterwards (secrets forgotten)


def test_masks_of_another_session_or_other_partners_are_not_used():
    sessions, req, trusts = _sessions_at_masked(seed=6)
    x = np.linspace(-1.0, 1.0, LENGTH)
    expected = _copy(sessions[0], trusts[0], "e").masked_input(req[0], x, 10.0)["masked"]
    other = _copy(sessions[1], trusts[1], "o").precompute_masks(req[1])  # client 2's masks
    fewer = {"senders": req[0]["senders"][:-1], "ciphertexts": req[0]["ciphertexts"][:-1]}
    partial = _copy(sessions[0], trusts[0], "f").precompute_masks(fewer)  # a partner missing
    for wrong in (other, partial):
        got = _copy(sessions[0], trusts[0], "e").masked_input(req[0], x, 10.0, masks=wrong)
        assert np.array_equal(got["masked"], expected)
