"""Client side of the secure-aggregation protocol, as message-in / message-out stages.

One :class:`ClientSession` lives for one round. Every stage takes the server's request (a
flat dict of ints, floats, bytes, lists of those, or numpy arrays) and returns the reply
in the same shape, so both fit Flower ``ConfigRecord`` / ``ArrayRecord`` values. Between
messages the session is kept with :meth:`ClientSession.to_bytes` /
:meth:`ClientSession.from_bytes` (it holds secret keys: keep it on the node, e.g. in
Flower's ``context.state``, never send it).

Stages (server request -> client reply):

1. :meth:`~ClientSession.setup`: round parameters + own index -> two X25519 public keys.
2. :meth:`~ClientSession.share`: everyone's public keys -> Shamir shares of the self-mask
   seed and of the mask secret key, encrypted for each neighbour.
3. :meth:`~ClientSession.masked_input`: the shares addressed to this client -> the masked,
   quantised, weighted update.
4. :meth:`~ClientSession.unmask`: who survived / dropped -> self-mask-seed shares of
   survivors and mask-key shares of dropped clients (never both kinds for one client).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from typing import Any

import numpy as np

from fedrg.errors import SecAggError
from fedrg.secagg import crypto, shamir
from fedrg.secagg.params import RoundParams, neighbour_graph
from fedrg.secagg.quantize import encode

STAGES = ("new", "setup", "shared", "masked", "unmasked")


def transcript_hash(context: bytes, indices: list[int], enc_pks: list[bytes], mask_pks: list[bytes]) -> bytes:
    """SHA-256 over the round context and the full public-key list (sorted by index)."""
    h = hashlib.sha256(b"fedrg-secagg-transcript" + context)
    for i, e, m in sorted(zip(indices, enc_pks, mask_pks, strict=True)):
        h.update(struct.pack(">Q", i) + e + m)
    return h.digest()


def share_associated_data(transcript: bytes, sender: int, recipient: int) -> bytes:
    """AEAD associated data of a share ciphertext: binds round transcript and direction."""
    return b"fedrg-secagg-share" + transcript + struct.pack(">QQ", sender, recipient)


def seed_commitment(context: bytes, index: int, seed: bytes) -> bytes:
    """Hash commitment to a self-mask seed (lets the server verify its reconstruction)."""
    return hashlib.sha256(b"fedrg-secagg-seed" + context + struct.pack(">Q", index) + seed).digest()


def pairwise_seed(mask_sk: bytes, peer_mask_pk: bytes, transcript: bytes, a: int, b: int) -> bytes:
    """The 256-bit seed of the pairwise mask between clients ``a`` and ``b``."""
    return crypto.agree(
        mask_sk, peer_mask_pk, salt=transcript, info=crypto.pair_info(b"pairwise-mask", a, b)
    )


def _int_list(msg: dict[str, Any], key: str) -> list[int]:
    try:
        return [int(v) for v in msg[key]]
    except KeyError:
        raise SecAggError(f"secagg message lacks the field '{key}'") from None


def _bytes_list(msg: dict[str, Any], key: str) -> list[bytes]:
    try:
        return [bytes(v) for v in msg[key]]
    except KeyError:
        raise SecAggError(f"secagg message lacks the field '{key}'") from None


class ClientSession:
    """One client's state machine for one secure-aggregation round.

    Parameters
    ----------
    entropy : callable, optional
        ``entropy(n) -> n random bytes``; default :func:`os.urandom`. Pass
        :func:`fedrg.secagg.crypto.seeded_entropy` only in tests.
    """

    def __init__(self, entropy: crypto.Entropy | None = None) -> None:
        self._entropy = entropy or os.urandom
        self.stage = "new"
        self.params: RoundParams | None = None
        self.index = 0
        self.enc_sk: bytes | None = None
        self.mask_sk: bytes | None = None
        self.enc_pk = b""
        self.mask_pk = b""
        self.seed: bytes | None = None
        self.transcript = b""
        self.neighbours: list[int] = []
        self.enc_pks: dict[int, bytes] = {}
        self.mask_pks: dict[int, bytes] = {}
        self.shares: dict[int, tuple[int, int]] = {}
        self.partners: list[int] = []
        self.revealed: dict[int, str] = {}

    # ------------------------------------------------------------------ helpers
    def _expect(self, stage: str, action: str) -> None:
        if self.stage != stage:
            raise SecAggError(
                f"secagg client cannot {action} in stage '{self.stage}' (expected '{stage}'); "
                "the server sent messages out of order"
            )

    def _params(self) -> RoundParams:
        assert self.params is not None
        return self.params

    # ------------------------------------------------------------------ stage 1
    def setup(self, request: dict[str, Any]) -> dict[str, Any]:
        """Stage 1: accept the round parameters and advertise two fresh public keys.

        Parameters
        ----------
        request : dict
            :meth:`RoundParams.to_message` fields plus ``index`` (this client's index).

        Returns
        -------
        dict
            ``{"index": int, "enc_pk": bytes, "mask_pk": bytes}``.
        """
        self._expect("new", "set up")
        params = RoundParams.from_message(request)
        index = int(request.get("index", 0))
        if not 1 <= index <= params.num_clients:
            raise SecAggError(f"secagg index {index} outside 1..{params.num_clients}")
        self.params, self.index = params, index
        self.enc_sk, self.enc_pk = crypto.generate_keypair(self._entropy)
        self.mask_sk, self.mask_pk = crypto.generate_keypair(self._entropy)
        self.stage = "setup"
        return {"index": index, "enc_pk": self.enc_pk, "mask_pk": self.mask_pk}

    # ------------------------------------------------------------------ stage 2
    def share(self, request: dict[str, Any]) -> dict[str, Any]:
        """Stage 2: from everyone's public keys, make encrypted shares for the neighbours.

        Parameters
        ----------
        request : dict
            ``{"indices": [int], "enc_pks": [bytes], "mask_pks": [bytes]}`` of all clients
            that completed stage 1.

        Returns
        -------
        dict
            ``{"index", "recipients": [int], "ciphertexts": [bytes], "seed_commitment": bytes}``.
        """
        self._expect("setup", "share keys")
        p = self._params()
        indices = _int_list(request, "indices")
        enc_pks = _bytes_list(request, "enc_pks")
        mask_pks = _bytes_list(request, "mask_pks")
        if not len(indices) == len(enc_pks) == len(mask_pks):
            raise SecAggError("secagg key list: indices and keys differ in length")
        if len(set(indices)) != len(indices) or any(not 1 <= i <= p.num_clients for i in indices):
            raise SecAggError("secagg key list holds duplicate or out-of-range indices")
        if len(set(enc_pks + mask_pks)) != 2 * len(indices):
            raise SecAggError("secagg key list repeats a public key; refusing")
        table = {i: (e, m) for i, e, m in zip(indices, enc_pks, mask_pks, strict=True)}
        if table.get(self.index) != (self.enc_pk, self.mask_pk):
            raise SecAggError("secagg key list does not hold this client's own public keys")
        if len(indices) < p.threshold:
            raise SecAggError(
                f"only {len(indices)} clients completed setup, fewer than threshold {p.threshold}"
            )
        self.transcript = transcript_hash(p.context(), indices, enc_pks, mask_pks)
        graph = neighbour_graph(sorted(indices), p.neighbours, p.round_id)
        self.neighbours = graph[self.index]
        holders = sorted([*self.neighbours, self.index])
        if len(holders) < p.threshold:
            raise SecAggError(
                f"client {self.index} has {len(holders)} shareholders, fewer than threshold "
                f"{p.threshold}"
            )
        self.enc_pks = {v: table[v][0] for v in self.neighbours}
        self.mask_pks = {v: table[v][1] for v in self.neighbours}
        assert self.enc_sk is not None and self.mask_sk is not None
        self.seed = self._entropy(crypto.SEED_BYTES)
        seed_shares = shamir.split(
            int.from_bytes(self.seed, "big"), holders, p.threshold, entropy=self._entropy
        )
        key_shares = shamir.split(
            int.from_bytes(self.mask_sk, "big"), holders, p.threshold, entropy=self._entropy
        )
        self.shares = {self.index: (seed_shares[self.index], key_shares[self.index])}
        ciphertexts = []
        for v in self.neighbours:
            key = crypto.agree(
                self.enc_sk, self.enc_pks[v], salt=self.transcript,
                info=crypto.pair_info(b"share-encryption", self.index, v),
            )
            plaintext = shamir.share_to_bytes(seed_shares[v]) + shamir.share_to_bytes(key_shares[v])
            ciphertexts.append(
                crypto.seal(key, plaintext, share_associated_data(self.transcript, self.index, v),
                            self._entropy)
            )
        self.stage = "shared"
        return {
            "index": self.index,
            "recipients": list(self.neighbours),
            "ciphertexts": ciphertexts,
            "seed_commitment": seed_commitment(p.context(), self.index, self.seed),
        }

    # ------------------------------------------------------------------ stage 3
    def masked_input(self, request: dict[str, Any], update: np.ndarray, weight: float) -> dict[str, Any]:
        """Stage 3: store the shares received, then upload the masked weighted update.

        Parameters
        ----------
        request : dict
            ``{"senders": [int], "ciphertexts": [bytes]}``: shares from neighbours that
            completed stage 2.
        update : numpy.ndarray
            The model update (any shape, ``vector_length`` values; flattened).
        weight : float
            This client's weight (e.g. number of training examples), ``<= max_weight``.

        Returns
        -------
        dict
            ``{"index": int, "masked": numpy.ndarray[uint32]}`` of length
            ``vector_length + 1``.

        Raises
        ------
        SecAggError
            On a tampered or misrouted ciphertext, too few surviving neighbours, or a bad
            update / weight.
        """
        self._expect("shared", "upload a masked input")
        p = self._params()
        senders = _int_list(request, "senders")
        ciphertexts = _bytes_list(request, "ciphertexts")
        if len(senders) != len(ciphertexts) or len(set(senders)) != len(senders):
            raise SecAggError("secagg share routing: senders and ciphertexts do not match")
        unknown = set(senders) - set(self.neighbours)
        if unknown:
            raise SecAggError(f"secagg shares from non-neighbours {sorted(unknown)}; refusing")
        assert self.enc_sk is not None and self.mask_sk is not None and self.seed is not None
        received: dict[int, tuple[int, int]] = {}
        for u, ct in zip(senders, ciphertexts, strict=True):
            key = crypto.agree(
                self.enc_sk, self.enc_pks[u], salt=self.transcript,
                info=crypto.pair_info(b"share-encryption", u, self.index),
            )
            plain = crypto.open_sealed(key, ct, share_associated_data(self.transcript, u, self.index))
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggError(f"share from client {u} has the wrong length")
            received[u] = (
                shamir.share_from_bytes(plain[: shamir.SHARE_BYTES]),
                shamir.share_from_bytes(plain[shamir.SHARE_BYTES:]),
            )
        if len(received) + 1 < p.threshold:
            raise SecAggError(
                f"only {len(received)} neighbours of client {self.index} survived key sharing; "
                f"threshold {p.threshold} cannot be met"
            )
        x = np.asarray(update)
        if x.size != p.vector_length:
            raise SecAggError(
                f"update has {x.size} values but this round aggregates {p.vector_length}"
            )
        rng = np.random.default_rng(int.from_bytes(self._entropy(16), "big"))
        y = encode(x, weight, clip_range=p.clip_range, quantization_bits=p.quantization_bits,
                   max_weight=p.max_weight, num_clients=p.num_clients, rounding=p.rounding,
                   rng=rng)  # type: ignore[arg-type]
        n = y.size
        y += crypto.expand_mask(self.seed, n)
        for v in sorted(received):
            mask = crypto.expand_mask(
                pairwise_seed(self.mask_sk, self.mask_pks[v], self.transcript, self.index, v), n
            )
            if self.index < v:
                y += mask
            else:
                y -= mask
        self.shares.update(received)
        self.partners = sorted(received)
        # The secrets are shared and used: forget them.
        self.seed = self.mask_sk = self.enc_sk = None
        self.stage = "masked"
        return {"index": self.index, "masked": y}

    # ------------------------------------------------------------------ stage 4
    def unmask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Stage 4: reveal seed shares of survivors and key shares of dropped clients.

        Parameters
        ----------
        request : dict
            ``{"survivors": [int], "dropped": [int]}``: clients whose masked input the
            server holds, and clients that shared keys but sent no masked input.

        Returns
        -------
        dict
            ``{"index", "seed_owners": [int], "seed_shares": [bytes], "key_owners": [int],
            "key_shares": [bytes]}``.

        Raises
        ------
        SecAggError
            If a client is listed as both survivor and dropped, if the other kind of share
            of a client was revealed before, if this client is not listed as a survivor, or
            if fewer than the threshold survived.
        """
        if self.stage not in ("masked", "unmasked"):
            self._expect("masked", "unmask")
        p = self._params()
        survivors = set(_int_list(request, "survivors"))
        dropped = set(_int_list(request, "dropped"))
        if survivors & dropped:
            raise SecAggError(
                f"server lists clients {sorted(survivors & dropped)} as both survived and dropped; "
                "refusing to reveal both kinds of share"
            )
        if self.index not in survivors:
            raise SecAggError("server lists this client as dropped although it sent its input")
        if len(survivors) < p.threshold:
            raise SecAggError(
                f"only {len(survivors)} clients survived, fewer than threshold {p.threshold}"
            )
        seed_owners = sorted(o for o in survivors if o in self.shares)
        key_owners = sorted(o for o in dropped if o in self.shares)
        for o in seed_owners:
            if self.revealed.get(o, "seed") != "seed":
                raise SecAggError(f"mask-key share of client {o} was revealed; refusing its seed share")
        for o in key_owners:
            if self.revealed.get(o, "key") != "key":
                raise SecAggError(f"seed share of client {o} was revealed; refusing its mask-key share")
        self.revealed.update({o: "seed" for o in seed_owners})
        self.revealed.update({o: "key" for o in key_owners})
        self.stage = "unmasked"
        return {
            "index": self.index,
            "seed_owners": seed_owners,
            "seed_shares": [shamir.share_to_bytes(self.shares[o][0]) for o in seed_owners],
            "key_owners": key_owners,
            "key_shares": [shamir.share_to_bytes(self.shares[o][1]) for o in key_owners],
        }

    # ------------------------------------------------------------------ state
    def to_bytes(self) -> bytes:
        """Serialise the session (secret keys included: keep it on the node)."""

        def b64(b: bytes | None) -> str | None:
            return None if b is None else base64.b64encode(b).decode()

        state = {
            "v": 1,
            "stage": self.stage,
            "params": None if self.params is None else {
                **self.params.to_message(), "round_id": self.params.round_id.hex()
            },
            "index": self.index,
            "enc_sk": b64(self.enc_sk), "mask_sk": b64(self.mask_sk),
            "enc_pk": b64(self.enc_pk), "mask_pk": b64(self.mask_pk),
            "seed": b64(self.seed), "transcript": b64(self.transcript),
            "neighbours": self.neighbours,
            "enc_pks": {str(k): b64(v) for k, v in self.enc_pks.items()},
            "mask_pks": {str(k): b64(v) for k, v in self.mask_pks.items()},
            "shares": {str(k): [hex(a), hex(b)] for k, (a, b) in self.shares.items()},
            "partners": self.partners,
            "revealed": {str(k): v for k, v in self.revealed.items()},
        }
        return json.dumps(state, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, entropy: crypto.Entropy | None = None) -> ClientSession:
        """Restore a session written by :meth:`to_bytes`."""
        try:
            s = json.loads(bytes(data))
            if s.get("v") != 1 or s["stage"] not in STAGES:
                raise ValueError("unknown version or stage")
        except (ValueError, KeyError, TypeError) as err:
            raise SecAggError(f"secagg client state cannot be read: {err}") from None

        def unb64(v: str | None) -> bytes | None:
            return None if v is None else base64.b64decode(v)

        self = cls(entropy)
        self.stage = s["stage"]
        if s["params"] is not None:
            msg = dict(s["params"])
            msg["round_id"] = bytes.fromhex(msg["round_id"])
            self.params = RoundParams.from_message(msg)
        self.index = int(s["index"])
        self.enc_sk, self.mask_sk = unb64(s["enc_sk"]), unb64(s["mask_sk"])
        self.enc_pk, self.mask_pk = unb64(s["enc_pk"]) or b"", unb64(s["mask_pk"]) or b""
        self.seed, self.transcript = unb64(s["seed"]), unb64(s["transcript"]) or b""
        self.neighbours = [int(v) for v in s["neighbours"]]
        self.enc_pks = {int(k): unb64(v) or b"" for k, v in s["enc_pks"].items()}
        self.mask_pks = {int(k): unb64(v) or b"" for k, v in s["mask_pks"].items()}
        self.shares = {int(k): (int(a, 16), int(b, 16)) for k, (a, b) in s["shares"].items()}
        self.partners = [int(v) for v in s["partners"]]
        self.revealed = {int(k): str(v) for k, v in s["revealed"].items()}
        return self
