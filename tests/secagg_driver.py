"""One-process driver: runs every client and the server of one round in turn.

For tests and benchmarks. Each client's session is serialised between messages (as the
Flower glue keeps it in ``context.state``), and dropouts are injected by withholding replies.
Every simulated client gets its own Ed25519 identity, all listed in one roster
(:func:`simulated_trusts`), so the full active-server checks run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedrg.errors import SecAggError
from fedrg.secagg.client import ClientSession, ClientTrust
from fedrg.secagg.crypto import Entropy, seeded_entropy
from fedrg.secagg.params import AUTO_NEIGHBOURS
from fedrg.secagg.roster import Roster, SigningIdentity
from fedrg.secagg.server import AggregateResult, ServerAggregator
from fedrg.secagg.stages import SecAggStage

DROP_STAGES = tuple(s.value for s in SecAggStage)  # the drop_at keys, in protocol order


def simulated_trusts(n: int, *, seed: int | None = None, min_peers: int = 1,
                     min_threshold_fraction: float = 0.5, prefix: str = "client") -> list[ClientTrust]:
    """Identities ``{prefix}-{i}`` for ``n`` simulated clients, all in one roster.

    Parameters
    ----------
    n : int
        Number of clients.
    seed : int, optional
        Deterministic keys (**tests only**); default OS randomness.
    min_peers, min_threshold_fraction
        Each client's policy minimums.

    Returns
    -------
    list of ClientTrust
        One per client, sharing the roster.
    """
    rand = seeded_entropy(f"{seed}/identities".encode()) if seed is not None else os.urandom
    ids = [SigningIdentity(f"{prefix}-{i}", Ed25519PrivateKey.from_private_bytes(rand(32)))
           for i in range(n)]
    roster = Roster([i.entry() for i in ids], source="simulated roster")
    return [ClientTrust(i, roster, min_peers=min_peers,
                        min_threshold_fraction=min_threshold_fraction) for i in ids]


def message_nbytes(msg: Mapping[str, Any]) -> int:
    """Payload size of a message: bytes and arrays at their length, numbers at 8 bytes."""

    def size(v: Any) -> int:
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        if isinstance(v, np.ndarray):
            return int(v.nbytes)
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        return 8

    return sum(size(v) for v in msg.values())


def run_secure_aggregation(
    updates: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    threshold: int | None = None,
    neighbours: int = AUTO_NEIGHBOURS,
    drop_at: Mapping[str, Iterable[int]] | None = None,
    clip_range: float = 8.0,
    quantization_bits: int = 24,
    max_weight: float | None = None,
    rounding: str = "nearest",
    seed: int | None = None,
    serialize_state: bool = True,
    traffic: dict[str, dict[int, int]] | None = None,
    trusts: Sequence[ClientTrust] | None = None,
) -> AggregateResult:
    """Run one secure-aggregation round in this process.

    Parameters
    ----------
    updates : sequence of numpy.ndarray
        One update per client (same size); client ``i`` has id ``i``.
    weights : sequence of float
        One weight per client.
    threshold, neighbours
        Shamir threshold (default from a fraction of 0.66) and neighbours per client
        (default -1: chosen from the number of clients).
    drop_at : mapping, optional
        ``{stage: client ids}`` with stage in :data:`DROP_STAGES`:
        those clients send no reply to that stage's request (and none afterwards).
    clip_range, quantization_bits, rounding
        Encoding settings.
    max_weight : float, optional
        Public weight bound (default ``max(weights)``, or 1 if all are zero).
    seed : int, optional
        Deterministic randomness for every party (**tests only**); default OS randomness.
    serialize_state : bool
        Round-trip each client session through ``to_bytes``/``from_bytes`` between stages.
    traffic : dict, optional
        If given, filled with ``{"up": {id: bytes}, "down": {id: bytes}}``.
    trusts : sequence of ClientTrust, optional
        Each client's identity, roster and policy (default :func:`simulated_trusts`).

    Returns
    -------
    AggregateResult
        The weighted mean of the included clients and the round's bookkeeping.

    Raises
    ------
    SecAggError
        When the round aborts (fewer than ``threshold`` survivors at some stage). A client
        that refuses a request (its checks fail) counts as dropped, as over the network; the
        reason is in the result's ``notes``.
    """
    n = len(updates)
    if len(weights) != n:
        raise SecAggError(f"{n} updates but {len(weights)} weights")
    drops = {stage: set(ids) for stage, ids in (drop_at or {}).items()}
    unknown = set(drops) - set(DROP_STAGES)
    if unknown:
        raise SecAggError(f"drop_at stages {sorted(unknown)} are not among {DROP_STAGES}")
    if max_weight is None:
        max_weight = float(max(weights)) or 1.0
    length = int(np.asarray(updates[0]).size)

    def entropy(i: int) -> Entropy | None:
        return None if seed is None else seeded_entropy(f"{seed}/{i}".encode())

    if trusts is None:
        trusts = simulated_trusts(n, seed=seed)
    if len(trusts) != n:
        raise SecAggError(f"{n} updates but {len(trusts)} client identities")
    server_entropy = entropy(-1)
    agg = ServerAggregator(
        list(range(n)), vector_length=length, threshold=threshold, neighbours=neighbours,
        clip_range=clip_range, quantization_bits=quantization_bits, max_weight=max_weight,
        rounding=rounding, round_id=None if server_entropy is None else server_entropy(16),
    )
    up = dict.fromkeys(range(n), 0)
    down = dict.fromkeys(range(n), 0)
    state: dict[int, Any] = {i: ClientSession(trusts[i], entropy(i)) for i in range(n)}
    gone: set[int] = set()

    def step(stage: SecAggStage, requests: dict[Any, dict[str, Any]], act: Any) -> dict[Any, dict[str, Any]]:
        gone.update(drops.get(stage.value, ()))
        replies = {}
        for cid, req in requests.items():
            if traffic is not None:
                down[cid] += message_nbytes(req)
            if cid in gone:
                continue
            sess = state[cid]
            if serialize_state and isinstance(sess, bytes):
                sess = ClientSession.from_bytes(sess, trusts[cid], entropy(cid))
            try:
                reply = act(cid, sess, req)
            except SecAggError as err:
                # a refusing client answers with an error: to the server it dropped out
                agg.notes.append(f"{stage}: client {cid!r} refused: {err}")
                gone.add(cid)
                continue
            if traffic is not None:
                up[cid] += message_nbytes(reply)
            state[cid] = sess.to_bytes() if serialize_state else sess
            replies[cid] = reply
        return replies

    try:
        req = agg.setup_requests()
        req = agg.receive_setup(step(SecAggStage.SETUP, req, lambda c, s, r: s.setup(r)))
        req = agg.receive_shares(step(SecAggStage.SHARE, req, lambda c, s, r: s.share(r)))
        req = agg.receive_masked(step(
            SecAggStage.MASKED, req, lambda c, s, r: s.masked_input(r, updates[c], float(weights[c]))
        ))
        req = agg.receive_consistency(step(SecAggStage.CONSISTENCY, req, lambda c, s, r: s.consistency(r)))
        return agg.receive_unmask(step(SecAggStage.UNMASK, req, lambda c, s, r: s.unmask(r)))
    finally:
        if traffic is not None:
            traffic["up"], traffic["down"] = up, down
