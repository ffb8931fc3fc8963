"""Server side of the secure-aggregation protocol: a five-stage state machine.

The server never holds an unmasked individual update: it collects public keys, routes
encrypted shares it cannot read, sums masked vectors, and removes the masks only from the
*sum*, using Shamir shares revealed by the survivors. A client that misses a stage is
treated as dropped; while at least ``threshold`` clients remain (and each needed secret has
``threshold`` shares), the round completes with the survivors' weighted mean. Otherwise
every stage raises :class:`~fedrg.errors.SecAggError` with the reason, and nothing about
any update is revealed. The server is not trusted by the clients: it forwards their signed
keys and their signatures of the survivor set (consistency check) without being able to
forge them.

Usage (the messaging layer sends each request and passes back the replies it got; a client
missing from ``replies`` dropped)::

    agg = ServerAggregator(node_ids, vector_length=n, threshold=t)
    req = agg.setup_requests()            # -> stage 1 requests, per client id
    req = agg.receive_setup(replies)      # -> stage 2 requests
    req = agg.receive_shares(replies)     # -> stage 3 requests
    req = agg.receive_masked(replies)     # -> stage 4 requests (consistency check)
    req = agg.receive_consistency(replies)  # -> stage 5 requests (unmask)
    result = agg.receive_unmask(replies)  # -> AggregateResult
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedrg.errors import SecAggError
from fedrg.secagg import crypto, parallel, shamir
from fedrg.secagg.client import pairwise_seed, seed_commitment, transcript_hash
from fedrg.secagg.params import (
    AUTO_NEIGHBOURS,
    RoundParams,
    default_threshold,
    holders_count,
    neighbour_graph,
    resolve_neighbours,
)
from fedrg.secagg.quantize import as_rounding, decode_sum, ring_dtype
from fedrg.secagg.stages import SecAggStage

_SUM_BLOCK = 1 << 15


def ring_sum(vectors: Sequence[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Sum equal-length ring vectors (wrapping), block by block so each block of the total
    stays in the CPU cache while every vector is added to it."""
    total = np.zeros(vectors[0].size if vectors else 0, dtype=dtype)

    def sum_slice(lo: int, hi: int) -> None:
        for start in range(lo, hi, _SUM_BLOCK):
            part = total[start:min(start + _SUM_BLOCK, hi)]
            for y in vectors:
                np.add(part, y[start:start + part.size], out=part)

    parallel.run_slices(total.size, sum_slice, nbytes=total.nbytes, align=_SUM_BLOCK)
    return total


@dataclass
class AggregateResult:
    """Outcome of a completed round.

    Attributes
    ----------
    mean : numpy.ndarray
        ``sum(w_i x_i) / sum(w_i)`` over the included clients (float64, flat).
    total_weight : float
        ``sum(w_i)`` over the included clients.
    included : list
        Client ids whose updates are in the sum.
    dropped : list
        Client ids that were invited but are not in the sum.
    notes : list of str
        Why clients were dropped (missing or malformed replies).
    """

    mean: np.ndarray
    total_weight: float
    included: list[Hashable]
    dropped: list[Hashable]
    notes: list[str] = field(default_factory=list)


class ServerAggregator:
    """Server state machine for one secure-aggregation round.

    Parameters
    ----------
    client_ids : sequence of hashable
        The invited clients (e.g. Flower node ids); each gets an index ``1..n``.
    vector_length : int
        Number of update values per client.
    threshold : int, optional
        Shamir threshold t; default :func:`default_threshold` of ``threshold_fraction``.
    neighbours : int
        k neighbours per client (0 = everyone; SecAgg+ graph otherwise; -1 = chosen from
        the number of clients, see :func:`fedrg.secagg.params.auto_neighbours`).
    threshold_fraction : float
        Used when ``threshold`` is not given.
    clip_range, quantization_bits, max_weight, rounding
        Encoding settings (see :mod:`fedrg.secagg.quantize`).
    round_id : bytes, optional
        Fresh random round name (default 16 bytes from the OS).
    """

    def __init__(
        self,
        client_ids: Sequence[Hashable],
        *,
        vector_length: int,
        threshold: int | None = None,
        neighbours: int = AUTO_NEIGHBOURS,
        threshold_fraction: float = 0.66,
        clip_range: float = 8.0,
        quantization_bits: int = 24,
        max_weight: float = 10_000.0,
        rounding: str = "nearest",
        round_id: bytes | None = None,
    ) -> None:
        ids = list(client_ids)
        if len(set(ids)) != len(ids):
            raise SecAggError("secagg client ids must be distinct")
        n = len(ids)
        neighbours = resolve_neighbours(neighbours, n)
        if threshold is None:
            threshold = default_threshold(n, neighbours=neighbours,
                                          threshold_fraction=threshold_fraction)
        self.params = RoundParams(
            round_id=round_id if round_id is not None else os.urandom(16),
            num_clients=n, threshold=threshold, neighbours=neighbours,
            vector_length=vector_length, clip_range=clip_range,
            quantization_bits=quantization_bits, max_weight=max_weight,
            rounding=as_rounding(rounding),
        )
        self.params.validate()
        self.context = self.params.context()
        self.index_of = {cid: i + 1 for i, cid in enumerate(ids)}
        self.id_of = {i: cid for cid, i in self.index_of.items()}
        # the stage whose replies are awaited; "aborted" or "done" once the round is over
        self.stage: SecAggStage | str = SecAggStage.SETUP
        self.notes: list[str] = []
        self.aborted: str | None = None
        self.enc_pks: dict[int, bytes] = {}
        self.mask_pks: dict[int, bytes] = {}
        self.names: dict[int, str] = {}
        self.key_signatures: dict[int, bytes] = {}
        self.graph: dict[int, list[int]] = {}
        self.transcript = b""
        self.u1: list[int] = []
        self.u2: list[int] = []
        self.u3: list[int] = []
        self.u4: list[int] = []
        self.commitments: dict[int, bytes] = {}
        self.total: np.ndarray | None = None

    @classmethod
    def from_config(
        cls, secagg: Any, client_ids: Sequence[Hashable], *, vector_length: int,
        round_id: bytes | None = None,
    ) -> ServerAggregator:
        """Build from a :class:`fedrg.config.SecAggConfig` section."""
        return cls(
            client_ids, vector_length=vector_length, neighbours=secagg.neighbours,
            threshold_fraction=secagg.threshold_fraction, clip_range=secagg.clip_range,
            quantization_bits=secagg.quantization_bits, max_weight=secagg.max_weight,
            rounding=secagg.rounding, round_id=round_id,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def threshold(self) -> int:
        return self.params.threshold

    def _abort(self, reason: str) -> SecAggError:
        self.aborted = reason
        self.stage = "aborted"
        return SecAggError(f"secure aggregation aborted: {reason}; no update was revealed")

    def _expect(self, stage: SecAggStage) -> None:
        if self.stage != stage:
            raise SecAggError(f"secagg server is in stage '{self.stage}', not '{stage}'")

    def _valid_replies(self, replies: Mapping[Hashable, dict[str, Any]], allowed: list[int],
                       stage: SecAggStage) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        malformed: set[int] = set()
        for cid, reply in replies.items():
            idx = self.index_of.get(cid)
            if idx is None or idx not in allowed:
                self.notes.append(f"{stage}: ignored a reply from uninvited or dropped client {cid!r}")
                continue
            try:
                ok = isinstance(reply, Mapping) and int(reply.get("index", -1)) == idx
            except (TypeError, ValueError):
                ok = False
            if not ok:
                self.notes.append(f"{stage}: client {cid!r} sent a malformed reply; dropped")
                malformed.add(idx)
                continue
            out[idx] = dict(reply)
        for idx in allowed:
            if idx not in out and idx not in malformed:
                self.notes.append(f"{stage}: client {self.id_of[idx]!r} did not reply; dropped")
        return out

    def _need(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise self._abort(f"{count} clients {what}, fewer than threshold {self.threshold}")

    # ------------------------------------------------------------------ stage 1
    def setup_requests(self) -> dict[Hashable, dict[str, Any]]:
        """Stage 1 requests: the round parameters and each client's index."""
        self._expect(SecAggStage.SETUP)
        msg = self.params.to_message()
        return {cid: {**msg, "index": i} for cid, i in self.index_of.items()}

    def receive_setup(self, replies: Mapping[Hashable, dict[str, Any]]) -> dict[Hashable, dict[str, Any]]:
        """Collect public keys; return the stage 2 request (the key list) per client."""
        self._expect(SecAggStage.SETUP)
        got = self._valid_replies(replies, list(self.id_of), SecAggStage.SETUP)
        seen: set[bytes] = set()
        seen_names: set[str] = set()
        for idx in sorted(got):
            e, m = bytes(got[idx].get("enc_pk", b"")), bytes(got[idx].get("mask_pk", b""))
            name, sig = got[idx].get("name"), bytes(got[idx].get("key_signature", b""))
            if len(e) != 32 or len(m) != 32 or e == m or e in seen or m in seen:
                self.notes.append(f"setup: client {self.id_of[idx]!r} sent invalid keys; dropped")
                continue
            if not isinstance(name, str) or not name or name in seen_names or len(sig) != 64:
                self.notes.append(f"setup: client {self.id_of[idx]!r} sent no signature or a name "
                                  "already taken; dropped")
                continue
            seen.update((e, m))
            seen_names.add(name)
            self.enc_pks[idx], self.mask_pks[idx] = e, m
            self.names[idx], self.key_signatures[idx] = name, sig
        self.u1 = sorted(self.enc_pks)
        self._need(len(self.u1), "completed setup")
        holders = holders_count(len(self.u1), self.params.neighbours)
        if holders < self.threshold:
            raise self._abort(
                f"with {len(self.u1)} clients each has {holders} shareholders, "
                f"fewer than threshold {self.threshold}"
            )
        self.graph = neighbour_graph(self.u1, self.params.neighbours, self.params.round_id)
        enc = [self.enc_pks[i] for i in self.u1]
        mask = [self.mask_pks[i] for i in self.u1]
        names = [self.names[i] for i in self.u1]
        self.transcript = transcript_hash(self.context, self.u1, enc, mask, names)
        self.stage = SecAggStage.SHARE
        msg = {"indices": list(self.u1), "enc_pks": enc, "mask_pks": mask, "names": names,
               "key_signatures": [self.key_signatures[i] for i in self.u1]}
        return {self.id_of[i]: dict(msg) for i in self.u1}

    # ------------------------------------------------------------------ stage 2
    def receive_shares(self, replies: Mapping[Hashable, dict[str, Any]]) -> dict[Hashable, dict[str, Any]]:
        """Collect encrypted shares; return, per client, the ciphertexts addressed to it."""
        self._expect(SecAggStage.SHARE)
        got = self._valid_replies(replies, self.u1, SecAggStage.SHARE)
        routed: dict[int, dict[int, bytes]] = {}
        for idx in sorted(got):
            r = got[idx]
            recipients = [int(v) for v in r.get("recipients", [])]
            cts = [bytes(c) for c in r.get("ciphertexts", [])]
            commitment = bytes(r.get("seed_commitment", b""))
            if recipients != self.graph[idx] or len(cts) != len(recipients) or len(commitment) != 32:
                self.notes.append(f"share: client {self.id_of[idx]!r} sent malformed shares; dropped")
                continue
            self.commitments[idx] = commitment
            routed[idx] = dict(zip(recipients, cts, strict=True))
        self.u2 = sorted(routed)
        self._need(len(self.u2), "completed key sharing")
        self.stage = SecAggStage.MASKED
        requests = {}
        for v in self.u2:
            senders = [u for u in self.graph[v] if u in routed]
            requests[self.id_of[v]] = {
                "senders": senders, "ciphertexts": [routed[u][v] for u in senders],
            }
        return requests

    # ------------------------------------------------------------------ stage 3
    def receive_masked(self, replies: Mapping[Hashable, dict[str, Any]]) -> dict[Hashable, dict[str, Any]]:
        """Sum the masked vectors; return the consistency-check request (the survivor set)."""
        self._expect(SecAggStage.MASKED)
        got = self._valid_replies(replies, self.u2, SecAggStage.MASKED)
        n = self.params.vector_length + 1
        dtype = ring_dtype(self.params.ring_bits)
        vectors = []
        included = []
        for idx in sorted(got):
            y = np.asarray(got[idx].get("masked", np.empty(0)))
            if y.dtype != dtype or y.shape != (n,):
                self.notes.append(f"masked: client {self.id_of[idx]!r} sent a malformed vector; dropped")
                continue
            vectors.append(y)
            included.append(idx)
        self.u3 = included
        self._need(len(self.u3), "uploaded masked inputs")
        self.total = ring_sum(vectors, dtype)
        self.stage = SecAggStage.CONSISTENCY
        msg = {"survivors": list(self.u3)}
        return {self.id_of[v]: dict(msg) for v in self.u3}

    # ------------------------------------------------------------------ stage 4
    def receive_consistency(self, replies: Mapping[Hashable, dict[str, Any]]) -> dict[Hashable, dict[str, Any]]:
        """Collect the survivors' signatures of the survivor set; return the unmask requests.

        Each client gets the signatures of its own shareholders (its neighbours and itself);
        it verifies them against its roster before revealing anything.
        """
        self._expect(SecAggStage.CONSISTENCY)
        got = self._valid_replies(replies, self.u3, SecAggStage.CONSISTENCY)
        signatures: dict[int, bytes] = {}
        for idx in sorted(got):
            sig = bytes(got[idx].get("consistency_signature", b""))
            if len(sig) != 64:
                self.notes.append(f"consistency: client {self.id_of[idx]!r} sent no signature; dropped")
                continue
            signatures[idx] = sig
        self.u4 = sorted(signatures)
        self._need(len(self.u4), "confirmed the survivor set")
        self.stage = SecAggStage.UNMASK
        requests = {}
        for v in self.u4:
            signers = [u for u in [v, *self.graph[v]] if u in signatures]
            requests[self.id_of[v]] = {"survivors": list(self.u3), "signers": signers,
                                       "signatures": [signatures[u] for u in signers]}
        return requests

    # ------------------------------------------------------------------ stage 5
    def receive_unmask(self, replies: Mapping[Hashable, dict[str, Any]]) -> AggregateResult:
        """Reconstruct the secrets, remove all masks from the sum, decode the weighted mean."""
        self._expect(SecAggStage.UNMASK)
        assert self.total is not None
        got = self._valid_replies(replies, self.u4, SecAggStage.UNMASK)
        u2 = set(self.u2)
        u3 = set(self.u3)
        dropped = sorted(u2 - u3)
        seed_shares: dict[int, dict[int, int]] = {u: {} for u in self.u3}
        key_shares: dict[int, dict[int, int]] = {u: {} for u in dropped}
        for holder in sorted(got):
            r = got[holder]
            try:
                for kind, owners_key, shares_key, allowed in (
                    (seed_shares, "seed_owners", "seed_shares", u3),
                    (key_shares, "key_owners", "key_shares", set(dropped)),
                ):
                    owners = [int(o) for o in r.get(owners_key, [])]
                    values = [shamir.share_from_bytes(bytes(s)) for s in r.get(shares_key, [])]
                    if len(owners) != len(values):
                        raise SecAggError("owner and share lists differ in length")
                    for o, val in zip(owners, values, strict=True):
                        if o in allowed and (o == holder or o in self.graph[holder]):
                            kind[o][holder] = val
            except (SecAggError, ValueError, TypeError) as err:
                self.notes.append(f"unmask: client {self.id_of[holder]!r} sent bad shares ({err})")
        # Secrets are reconstructed from exactly t shares (Lagrange coefficients cached per
        # holder set) and checked against the seed commitment / mask public key, which
        # catches any forged share among them; extra shares are not needed.
        t = self.threshold
        plus: list[bytes] = []
        minus: list[bytes] = []
        for u in self.u3:
            if len(seed_shares[u]) < t:
                raise self._abort(f"only {len(seed_shares[u])} self-mask shares for a survivor")
            secret = shamir.reconstruct(seed_shares[u], t, check=False)
            seed = secret.to_bytes(66, "big")[-crypto.SEED_BYTES:] if secret < 2**256 else b""
            if seed_commitment(self.context, u, seed) != self.commitments[u]:
                raise self._abort("a reconstructed self-mask seed does not match its commitment "
                                  "(a share was corrupted or forged)")
            minus.append(seed)
        for u in dropped:
            partners = [v for v in self.graph[u] if v in u3]
            if not partners:
                continue
            if len(key_shares[u]) < t:
                raise self._abort(f"only {len(key_shares[u])} mask-key shares for a dropped client")
            secret = shamir.reconstruct(key_shares[u], t, check=False)
            sk = secret.to_bytes(66, "big")[-32:] if secret < 2**256 else bytes(32)
            if crypto.public_from_secret(sk) != self.mask_pks[u]:
                raise self._abort("a reconstructed mask key does not match its public key "
                                  "(a share was corrupted or forged)")
            sk_obj = crypto.private_key(sk)
            for v in partners:
                seed = pairwise_seed(sk_obj, self.mask_pks[v], self.transcript, u, v)
                # v added +mask if v < u, else subtracted it: undo that.
                (minus if v < u else plus).append(seed)
        total = crypto.apply_masks(self.total, plus, minus)
        p = self.params
        try:
            mean, total_weight = decode_sum(total, len(self.u3), clip_range=p.clip_range,
                                            quantization_bits=p.quantization_bits,
                                            max_weight=p.max_weight, num_clients=p.num_clients)
        except SecAggError as err:
            raise self._abort(str(err)) from None
        self.stage = "done"
        self.total = None
        return AggregateResult(
            mean=mean, total_weight=total_weight,
            included=[self.id_of[i] for i in self.u3],
            dropped=[self.id_of[i] for i in sorted(set(self.id_of) - u3)],
            notes=list(self.notes),
        )
