"""Public parameters of one secure-aggregation round, the neighbour graph and thresholds."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from fedrg.errors import SecAggError
from fedrg.policy import required_threshold
from fedrg.secagg.quantize import Rounding, as_rounding, check_ring, ring_bits

AUTO_NEIGHBOURS = -1
"""``neighbours = -1``: choose the graph from the number of clients (:func:`auto_neighbours`)."""
COMPLETE_GRAPH_UP_TO = 32
"""With ``neighbours = -1``, rounds of at most this many clients use the complete graph."""


def auto_neighbours(num_clients: int) -> int:
    """Neighbours per client for ``neighbours = -1``: everyone up to 32 clients, else SecAgg+.

    Above :data:`COMPLETE_GRAPH_UP_TO` clients each client gets ``4 * ceil(log2 n)``
    neighbours (Bell et al. 2020: ``k = O(log n)`` keeps the sum private and dropout-robust
    with high probability), so per-client cost (key agreements, shares, mask expansions)
    grows with ``log n`` instead of ``n``.

    Returns
    -------
    int
        ``0`` (complete graph) or an even ``k``.
    """
    if num_clients <= COMPLETE_GRAPH_UP_TO:
        return 0
    k = 4 * math.ceil(math.log2(num_clients))
    return 0 if k >= num_clients - 1 else k


def resolve_neighbours(neighbours: int, num_clients: int) -> int:
    """``neighbours`` itself, or :func:`auto_neighbours` for ``-1``.

    Raises
    ------
    SecAggError
        For values below -1.
    """
    if neighbours == AUTO_NEIGHBOURS:
        return auto_neighbours(num_clients)
    if neighbours < 0:
        raise SecAggError(f"secagg.neighbours={neighbours} must be -1 (auto), 0 (everyone) or k > 0")
    return neighbours


def holders_count(num_members: int, neighbours: int) -> int:
    """Shareholders per client: its neighbours plus itself.

    ``neighbours = 0`` (or ``>= num_members - 1``) means everyone; an odd ``neighbours`` is
    rounded up to the next even number (the graph is a circulant with ``k/2`` neighbours on
    each side of a client).
    """
    if neighbours <= 0 or neighbours >= num_members - 1:
        return num_members
    k = neighbours + (neighbours % 2)
    return min(k, num_members - 1) + 1


def default_threshold(num_clients: int, *, neighbours: int = 0, threshold_fraction: float = 0.66) -> int:
    """Shamir threshold for ``secagg.threshold_fraction`` of a client's shareholders.

    ``neighbours = -1`` is resolved with :func:`auto_neighbours`.

    The result is at least 2 and strictly more than half of the shareholders (so a server
    cannot obtain both kinds of share for one client by telling two halves different
    stories), and at most the number of shareholders.
    """
    holders = holders_count(num_clients, resolve_neighbours(neighbours, num_clients))
    t = max(required_threshold(fraction=threshold_fraction, holders=holders), holders // 2 + 1, 2)
    return min(t, holders)


def validate_threshold(threshold: int, holders: int) -> None:
    """Raise :class:`SecAggError` unless ``holders/2 < threshold <= holders`` and ``>= 2``."""
    if threshold < 2 or 2 * threshold <= holders or threshold > holders:
        raise SecAggError(
            f"secagg threshold={threshold} is invalid for {holders} shareholders per client: "
            f"it must be at least 2, more than half of them and at most all of them "
            f"(e.g. {max(holders // 2 + 1, 2)}..{holders}); adjust secagg.threshold_fraction "
            f"or secagg.neighbours"
        )


@functools.lru_cache(maxsize=16)
def _ring_order(members: tuple[int, ...], seed: bytes) -> list[int]:
    """Members ordered by ``SHA-256(seed || index)``: the public random ring of the graph."""
    return sorted(members, key=lambda m: hashlib.sha256(seed + m.to_bytes(8, "big")).digest())


def neighbour_graph(members: list[int], neighbours: int, seed: bytes) -> dict[int, list[int]]:
    """A symmetric k-regular neighbour graph over ``members`` (SecAgg+ style).

    Members are ordered by ``SHA-256(seed || index)`` (a public random permutation) and each
    is linked to the ``k/2`` members on either side of it on that ring; ``neighbours = 0`` or
    ``>= len(members) - 1`` gives the complete graph.

    Returns
    -------
    dict
        ``{index: sorted neighbour indices (self excluded)}``.
    """
    n = len(members)
    if neighbours <= 0 or neighbours >= n - 1:
        return {m: sorted(x for x in members if x != m) for m in members}
    half = (neighbours + 1) // 2
    ring = _ring_order(tuple(members), seed)
    graph: dict[int, set[int]] = {m: set() for m in members}
    for pos, m in enumerate(ring):
        for j in range(1, half + 1):
            other = ring[(pos + j) % n]
            if other != m:
                graph[m].add(other)
                graph[other].add(m)
    return {m: sorted(v) for m, v in graph.items()}


def neighbours_of(member: int, members: list[int], neighbours: int, seed: bytes) -> list[int]:
    """``neighbour_graph(members, neighbours, seed)[member]``, without building the whole graph.

    A client needs only its own neighbours: one sort of the members (``O(n log n)``) and
    ``O(k)`` work, instead of ``O(n k)`` for the graph.
    """
    n = len(members)
    if member not in members:
        raise SecAggError(f"client {member} is not among the round's members")
    if neighbours <= 0 or neighbours >= n - 1:
        return sorted(x for x in members if x != member)
    half = (neighbours + 1) // 2
    ring = _ring_order(tuple(members), seed)
    pos = ring.index(member)
    out = {ring[(pos + j) % n] for j in range(1, half + 1)} | {ring[(pos - j) % n]
                                                              for j in range(1, half + 1)}
    out.discard(member)
    return sorted(out)


@dataclass(frozen=True)
class RoundParams:
    """Everything public about one round; every client derives the same ``context`` hash.

    Attributes
    ----------
    round_id : bytes
        Fresh random bytes naming the round (also seeds the neighbour graph).
    num_clients : int
        Clients invited at setup; they hold indices ``1..num_clients``.
    threshold : int
        Shamir threshold t (shares needed to recover a client's secrets).
    neighbours : int
        k neighbours per client (0 = everyone).
    vector_length : int
        Number of update coordinates (the weight word is extra).
    clip_range : float
        Update values are clipped to ``+-clip_range``.
    quantization_bits : int
        Bits per coordinate (``bits + ceil(log2 num_clients) <= 32``).
    max_weight : float
        Public upper bound on a client's weight.
    rounding : str
        ``"nearest"`` or ``"stochastic"``.
    """

    round_id: bytes
    num_clients: int
    threshold: int
    neighbours: int
    vector_length: int
    clip_range: float
    quantization_bits: int
    max_weight: float
    rounding: Rounding = "nearest"

    def validate(self) -> None:
        """Check the parameters are consistent; raise :class:`SecAggError` if not."""
        if len(self.round_id) < 16:
            raise SecAggError("secagg round_id must hold at least 16 random bytes")
        if self.num_clients < 2:
            raise SecAggError(
                f"secure aggregation needs at least 2 clients, got {self.num_clients}"
            )
        if self.vector_length < 1:
            raise SecAggError(f"secagg vector_length={self.vector_length} must be >= 1")
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise SecAggError(f"secagg.clip_range={self.clip_range} must be a positive number")
        if not (self.max_weight > 0 and math.isfinite(self.max_weight)):
            raise SecAggError(f"secagg.max_weight={self.max_weight} must be a positive number")
        if self.rounding not in ("nearest", "stochastic"):
            raise SecAggError(f"secagg rounding={self.rounding!r} must be 'nearest' or 'stochastic'")
        if self.neighbours < 0:
            raise SecAggError(f"secagg.neighbours={self.neighbours} must be >= 0")
        check_ring(self.num_clients, self.quantization_bits)
        validate_threshold(self.threshold, holders_count(self.num_clients, self.neighbours))

    @property
    def ring_bits(self) -> int:
        """Bits of the ring (32 or 64), from the client count and quantisation bits."""
        return ring_bits(self.num_clients, self.quantization_bits)

    def context(self) -> bytes:
        """SHA-256 of the canonical parameters (bound into every key and ciphertext)."""
        data = asdict(self)
        data["round_id"] = self.round_id.hex()
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"fedrg-secagg-v1" + blob).digest()

    def to_message(self) -> dict[str, Any]:
        """Flat dict of scalars/bytes (fits a Flower ``ConfigRecord``)."""
        return asdict(self)

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> RoundParams:
        """Inverse of :meth:`to_message` (extra keys ignored); validates."""
        try:
            params = cls(
                round_id=bytes(msg["round_id"]),
                num_clients=int(msg["num_clients"]),
                threshold=int(msg["threshold"]),
                neighbours=int(msg["neighbours"]),
                vector_length=int(msg["vector_length"]),
                clip_range=float(msg["clip_range"]),
                quantization_bits=int(msg["quantization_bits"]),
                max_weight=float(msg["max_weight"]),
                rounding=as_rounding(str(msg.get("rounding", "nearest"))),
            )
        except KeyError as err:
            raise SecAggError(f"secagg setup message lacks the field {err}") from None
        params.validate()
        return params
