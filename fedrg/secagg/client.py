"""Client side of the secure-aggregation protocol, as message-in / message-out stages.

One :class:`ClientSession` lives for one round. Every stage takes the server's request (a
flat dict of ints, floats, bytes, lists of those, or numpy arrays) and returns the reply
in the same shape, so both fit Flower ``ConfigRecord`` / ``ArrayRecord`` values. Between
messages the session is kept with :meth:`ClientSession.to_bytes` /
:meth:`ClientSession.from_bytes` (it holds secret keys: keep it on the node, e.g. in
Flower's ``context.state``, never send it).

The client trusts no one but its pinned :class:`~fedrg.secagg.roster.Roster` (see
:class:`ClientTrust`): the server is assumed active (it may drop, forge, replay and tell
clients different stories; Bonawitz et al. 2017 §4, Bell et al. 2020).

Stages (server request -> client reply):

1. :meth:`~ClientSession.setup`: round parameters + own index -> two X25519 public keys,
   signed with the hospital's long-term key (binding round, index and name).
2. :meth:`~ClientSession.share`: everyone's signed public keys -> (after verifying every
   neighbour's signature against the roster, distinct names, enough peers) Shamir shares
   of the self-mask seed and of the mask secret key, encrypted for each neighbour.
3. :meth:`~ClientSession.masked_input`: the shares addressed to this client -> the masked,
   quantised, weighted update.
4. :meth:`~ClientSession.consistency`: the survivor set -> this client's signature of it.
5. :meth:`~ClientSession.unmask`: the survivor set and the signatures of it -> if at least
   ``threshold`` of this client's shareholders signed the same set: self-mask-seed shares of
   surviving neighbours and mask-key shares of dropped ones (never both kinds for one).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedrg.errors import ConfigError, SecAggError
from fedrg.policy import required_threshold
from fedrg.secagg import crypto, shamir
from fedrg.secagg.params import RoundParams, holders_count, neighbours_of
from fedrg.secagg.quantize import encode, ring_dtype
from fedrg.secagg.roster import Roster, SigningIdentity
from fedrg.secagg.stages import SecAggStage

#: session states: "new", then the value of the last :class:`SecAggStage` answered
STAGES = ("new", *(stage.value for stage in SecAggStage))
STATE_VERSION = 3  # 3: states named by SecAggStage


@dataclass(frozen=True)
class ClientTrust:
    """What a hospital trusts in secure aggregation: its own key, its roster, its policy.

    Attributes
    ----------
    identity : SigningIdentity
        This hospital's roster name and long-term signing key.
    roster : Roster
        The federation roster it pinned.
    min_peers : int
        Fewest other distinct roster hospitals (verified neighbours, and surviving
        neighbours at unmasking) it accepts (``SitePolicy.min_secagg_peers``).
    min_threshold_fraction : float
        Lowest Shamir threshold it accepts, as a fraction of its shareholders
        (``SitePolicy.min_threshold_fraction``).
    """

    identity: SigningIdentity
    roster: Roster
    min_peers: int = 2
    min_threshold_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.min_peers < 1:
            raise ConfigError(f"min_peers={self.min_peers} must be >= 1")
        if not 0 < self.min_threshold_fraction <= 1:
            raise ConfigError(f"min_threshold_fraction={self.min_threshold_fraction} must lie in (0, 1]")
        entry = self.roster.entries.get(self.identity.name)
        own = self.identity.key.public_key().public_bytes_raw()
        if entry is None:
            raise ConfigError(f"this hospital ({self.identity.name!r}) is not in the roster "
                              f"{self.roster.source}; ask the operator to add it, or fix 'name'")
        if entry.signing_key != own:
            raise ConfigError(f"the roster {self.roster.source} lists another signing key for "
                              f"{self.identity.name!r} than this hospital's own; ask the operator "
                              "for a current roster or check the signing key path")


def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">H", len(raw)) + raw


def key_message(context: bytes, index: int, name: str, enc_pk: bytes, mask_pk: bytes) -> bytes:
    """What a hospital signs in stage 1: its round keys, bound to round, index and name."""
    return (b"fedrg-secagg-v2/keys" + context + struct.pack(">Q", index) + _name_bytes(name)
            + enc_pk + mask_pk)


def survivors_digest(survivors: list[int]) -> bytes:
    """SHA-256 of a sorted survivor list."""
    return hashlib.sha256(np.array(sorted(survivors), dtype=">u8").tobytes()).digest()


def consistency_message(transcript: bytes, index: int, name: str, survivors: list[int] | bytes) -> bytes:
    """What a hospital signs in the consistency check: the survivor set it was shown.

    ``survivors`` is the list, or its :func:`survivors_digest` (computed once per round).
    """
    digest = survivors if isinstance(survivors, bytes) else survivors_digest(survivors)
    return (b"fedrg-secagg-v2/survivors" + transcript + struct.pack(">Q", index)
            + _name_bytes(name) + digest)


def transcript_hash(context: bytes, indices: list[int], enc_pks: list[bytes], mask_pks: list[bytes],
                    names: list[str]) -> bytes:
    """SHA-256 over the round context and the full signed key list (sorted by index)."""
    if not len(indices) == len(enc_pks) == len(mask_pks) == len(names):
        raise SecAggError("secagg key list: indices, keys and names differ in length")
    order = sorted(range(len(indices)), key=indices.__getitem__)
    packed = np.array(indices, dtype=">u8").tobytes()
    parts = [b"fedrg-secagg-v2/transcript", context]
    for k in order:
        parts += (packed[8 * k: 8 * k + 8], enc_pks[k], mask_pks[k], _name_bytes(names[k]))
    return hashlib.sha256(b"".join(parts)).digest()


def share_associated_data(transcript: bytes, sender: int, recipient: int) -> bytes:
    """AEAD associated data of a share ciphertext: binds round transcript and direction."""
    return b"fedrg-secagg-share" + transcript + struct.pack(">QQ", sender, recipient)


def seed_commitment(context: bytes, index: int, seed: bytes) -> bytes:
    """Hash commitment to a self-mask seed (lets the server verify its reconstruction)."""
    return hashlib.sha256(b"fedrg-secagg-seed" + context + struct.pack(">Q", index) + seed).digest()


def pairwise_seed(mask_sk: bytes | X25519PrivateKey, peer_mask_pk: bytes, transcript: bytes,
                  a: int, b: int) -> bytes:
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
    except (TypeError, ValueError):
        raise SecAggError(f"secagg message field '{key}' is not a list of byte strings") from None


def _str_list(msg: dict[str, Any], key: str) -> list[str]:
    try:
        values = list(msg[key])
    except KeyError:
        raise SecAggError(f"secagg message lacks the field '{key}'") from None
    if not all(isinstance(v, str) for v in values):
        raise SecAggError(f"secagg message field '{key}' is not a list of names")
    return values


def _adder(vector: np.ndarray) -> Callable[[int], Callable[[np.ndarray], None]]:
    """For :func:`encode`'s ``mask``: add ``vector`` to consecutive blocks from ``lo`` on."""

    def per_slice(lo: int) -> Callable[[np.ndarray], None]:
        pos = [lo]

        def add(block: np.ndarray) -> None:
            np.add(block, vector[pos[0]:pos[0] + block.size], out=block)
            pos[0] += block.size

        return add

    return per_slice


@dataclass(frozen=True)
class PrecomputedMasks:
    """The sum of a session's masks, expanded before its update exists.

    Made by :meth:`ClientSession.precompute_masks` in this process (never received from
    anyone) and used by :meth:`ClientSession.masked_input` only for the session, index and
    partners it was made for. It is as secret as the session's keys: it never leaves.

    Attributes
    ----------
    transcript : bytes
        The round transcript of the session.
    index : int
        The client's index.
    partners : tuple of int
        The neighbours whose shares were opened (their pairwise masks are in it).
    vector : numpy.ndarray
        ``self mask + sum(+-pairwise masks)`` in the ring, ``vector_length + 1`` words.
    """

    transcript: bytes
    index: int
    partners: tuple[int, ...]
    vector: np.ndarray


class ClientSession:
    """One client's state machine for one secure-aggregation round.

    Parameters
    ----------
    trust : ClientTrust
        The hospital's identity, pinned roster and policy minimums.
    entropy : callable, optional
        ``entropy(n) -> n random bytes``; default :func:`os.urandom`. Pass
        :func:`fedrg.secagg.crypto.seeded_entropy` only in tests.
    """

    def __init__(self, trust: ClientTrust, entropy: crypto.Entropy | None = None) -> None:
        self.trust = trust
        self._entropy = entropy or os.urandom
        self.stage: str = "new"
        self.params: RoundParams | None = None
        self.index = 0
        self.enc_sk: bytes | None = None
        self.mask_sk: bytes | None = None
        self.enc_pk = b""
        self.mask_pk = b""
        self.seed: bytes | None = None
        self.transcript = b""
        self.members: list[int] = []
        self.neighbours: list[int] = []
        self.names: dict[int, str] = {}
        self.enc_pks: dict[int, bytes] = {}
        self.mask_pks: dict[int, bytes] = {}
        self.share_keys: dict[int, bytes] = {}
        self.shares: dict[int, tuple[int, int]] = {}
        self.partners: list[int] = []
        self.survivors: list[int] = []
        self.revealed: dict[int, str] = {}

    # ------------------------------------------------------------------ helpers
    def _expect(self, stage: str, action: str) -> None:  # stage: "new" or a SecAggStage
        if self.stage != stage:
            raise SecAggError(
                f"secagg client cannot {action} in stage '{self.stage}' (expected '{stage}'); "
                "the server sent messages out of order"
            )

    def _params(self) -> RoundParams:
        assert self.params is not None
        return self.params

    def _check_threshold(self, holders: int) -> None:
        t, frac = self._params().threshold, self.trust.min_threshold_fraction
        need = required_threshold(fraction=frac, holders=holders)
        if t < need:
            raise SecAggError(
                f"threshold {t} for {holders} shareholders is below this hospital's policy "
                f"minimum min_threshold_fraction={frac} (needs >= {need}); refusing the round"
            )

    # ------------------------------------------------------------------ stage 1
    def setup(self, request: dict[str, Any]) -> dict[str, Any]:
        """Stage 1: accept the round parameters and advertise two fresh, signed public keys.

        Parameters
        ----------
        request : dict
            :meth:`RoundParams.to_message` fields plus ``index`` (this client's index).

        Returns
        -------
        dict
            ``{"index", "enc_pk", "mask_pk", "name", "key_signature"}``.

        Raises
        ------
        SecAggError
            If the round cannot hold enough peers or its threshold is below the policy.
        """
        self._expect("new", "set up")
        params = RoundParams.from_message(request)
        index = int(request.get("index", 0))
        if not 1 <= index <= params.num_clients:
            raise SecAggError(f"secagg index {index} outside 1..{params.num_clients}")
        if params.num_clients - 1 < self.trust.min_peers:
            raise SecAggError(
                f"the round invites {params.num_clients} clients: fewer than this hospital's "
                f"policy minimum of {self.trust.min_peers} peers (min_secagg_peers); refusing"
            )
        if len(self.trust.roster) - 1 < self.trust.min_peers:
            raise SecAggError(
                f"the roster {self.trust.roster.source} lists {len(self.trust.roster)} hospitals: "
                f"too few for min_secagg_peers={self.trust.min_peers}; refusing"
            )
        self.params, self.index = params, index
        self._check_threshold(holders_count(params.num_clients, params.neighbours))
        self.enc_sk, self.enc_pk = crypto.generate_keypair(self._entropy)
        self.mask_sk, self.mask_pk = crypto.generate_keypair(self._entropy)
        name = self.trust.identity.name
        signature = self.trust.identity.sign(
            key_message(params.context(), index, name, self.enc_pk, self.mask_pk))
        self.stage = SecAggStage.SETUP.value
        return {"index": index, "enc_pk": self.enc_pk, "mask_pk": self.mask_pk, "name": name,
                "key_signature": signature}

    # ------------------------------------------------------------------ stage 2
    def share(self, request: dict[str, Any]) -> dict[str, Any]:
        """Stage 2: verify the signed key list, then make encrypted shares for the neighbours.

        Parameters
        ----------
        request : dict
            ``{"indices": [int], "enc_pks": [bytes], "mask_pks": [bytes], "names": [str],
            "key_signatures": [bytes]}`` of all clients that completed stage 1.

        Returns
        -------
        dict
            ``{"index", "recipients": [int], "ciphertexts": [bytes], "seed_commitment": bytes}``.

        Raises
        ------
        SecAggError
            On a name outside the roster, a repeated name or key, a neighbour key whose
            signature does not verify against the roster, fewer verified peers than the
            policy minimum, or a threshold below it.
        """
        self._expect(SecAggStage.SETUP, "share keys")
        p = self._params()
        roster = self.trust.roster
        indices = _int_list(request, "indices")
        enc_pks = _bytes_list(request, "enc_pks")
        mask_pks = _bytes_list(request, "mask_pks")
        names = _str_list(request, "names")
        signatures = _bytes_list(request, "key_signatures")
        if not len(indices) == len(enc_pks) == len(mask_pks) == len(names) == len(signatures):
            raise SecAggError("secagg key list: indices, keys, names and signatures differ in length")
        if len(set(indices)) != len(indices) or any(not 1 <= i <= p.num_clients for i in indices):
            raise SecAggError("secagg key list holds duplicate or out-of-range indices")
        if len(set(enc_pks + mask_pks)) != 2 * len(indices):
            raise SecAggError("secagg key list repeats a public key; refusing")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise SecAggError(f"secagg key list names hospitals {dup} more than once "
                              "(duplicated identity); refusing")
        strangers = sorted(set(names) - set(roster.names))
        if strangers:
            raise SecAggError(f"secagg key list holds {len(strangers)} client(s) that are not in the "
                              f"roster {roster.source} (e.g. {strangers[0][:40]!r}); refusing")
        table = {i: (e, m, n, sg) for i, e, m, n, sg in
                 zip(indices, enc_pks, mask_pks, names, signatures, strict=True)}
        own = table.get(self.index)
        if own is None or own[:3] != (self.enc_pk, self.mask_pk, self.trust.identity.name):
            raise SecAggError("secagg key list does not hold this client's own signed public keys")
        if len(indices) < p.threshold:
            raise SecAggError(
                f"only {len(indices)} clients completed setup, fewer than threshold {p.threshold}"
            )
        neighbours = neighbours_of(self.index, sorted(indices), p.neighbours, p.round_id)
        context = p.context()
        for v in neighbours:
            e, m, n, sg = table[v]
            if not roster.verify(n, key_message(context, v, n, e, m), sg):
                raise SecAggError(
                    f"the public keys of client {v} (claimed to be {n!r}) do not carry a valid "
                    f"signature by that hospital's roster key: forged, replayed or from another "
                    "round; refusing"
                )
        if len(neighbours) < self.trust.min_peers:
            raise SecAggError(
                f"only {len(neighbours)} verified roster peers share with this hospital, fewer "
                f"than its policy minimum of {self.trust.min_peers} (min_secagg_peers); refusing"
            )
        holders = sorted([*neighbours, self.index])
        if len(holders) < p.threshold:
            raise SecAggError(
                f"client {self.index} has {len(holders)} shareholders, fewer than threshold "
                f"{p.threshold}"
            )
        self._check_threshold(len(holders))
        self.transcript = transcript_hash(context, indices, enc_pks, mask_pks, names)
        self.members = sorted(indices)
        self.neighbours = neighbours
        self.names = {v: table[v][2] for v in holders}
        self.enc_pks = {v: table[v][0] for v in neighbours}
        self.mask_pks = {v: table[v][1] for v in neighbours}
        assert self.enc_sk is not None and self.mask_sk is not None
        self.seed = self._entropy(crypto.SEED_BYTES)
        seed_shares = shamir.split(
            int.from_bytes(self.seed, "big"), holders, p.threshold, entropy=self._entropy
        )
        key_shares = shamir.split(
            int.from_bytes(self.mask_sk, "big"), holders, p.threshold, entropy=self._entropy
        )
        self.shares = {self.index: (seed_shares[self.index], key_shares[self.index])}
        enc_sk = crypto.private_key(self.enc_sk)
        ciphertexts = []
        for v in neighbours:
            # one key per pair and direction-independent: it also opens v's shares to us
            key = self.share_keys[v] = crypto.agree(
                enc_sk, self.enc_pks[v], salt=self.transcript,
                info=crypto.pair_info(b"share-encryption", self.index, v),
            )
            plaintext = shamir.share_to_bytes(seed_shares[v]) + shamir.share_to_bytes(key_shares[v])
            ciphertexts.append(
                crypto.seal(key, plaintext, share_associated_data(self.transcript, self.index, v),
                            self._entropy)
            )
        self.enc_sk = None  # the share keys are derived: the secret is no longer needed
        self.stage = SecAggStage.SHARE.value
        return {
            "index": self.index,
            "recipients": list(neighbours),
            "ciphertexts": ciphertexts,
            "seed_commitment": seed_commitment(context, self.index, self.seed),
        }

    # ------------------------------------------------------------------ stage 3
    def open_shares(self, request: dict[str, Any]) -> dict[int, tuple[int, int]]:
        """Open and check the shares routed to this client (stage 3's request), changing nothing.

        :meth:`masked_input` starts with this; a hospital may call it first to refuse a
        tampered or misrouted request before it trains.

        Returns
        -------
        dict
            ``{sender: (seed share, mask-key share)}``.

        Raises
        ------
        SecAggError
            On a tampered or misrouted ciphertext, shares from non-neighbours, or too few
            neighbours to meet the threshold.
        """
        self._expect(SecAggStage.SHARE, "open its shares")
        p = self._params()
        senders = _int_list(request, "senders")
        ciphertexts = _bytes_list(request, "ciphertexts")
        if len(senders) != len(ciphertexts) or len(set(senders)) != len(senders):
            raise SecAggError("secagg share routing: senders and ciphertexts do not match")
        unknown = set(senders) - set(self.neighbours)
        if unknown:
            raise SecAggError(f"secagg shares from non-neighbours {sorted(unknown)}; refusing")
        received: dict[int, tuple[int, int]] = {}
        for u, ct in zip(senders, ciphertexts, strict=True):
            plain = crypto.open_sealed(self.share_keys[u], ct, share_associated_data(self.transcript, u, self.index))
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
        return received

    def _mask_seeds(self, partners: tuple[int, ...]) -> tuple[list[bytes], list[bytes]]:
        """Seeds of the masks to add (self mask, pairwise with higher indices) and subtract."""
        assert self.mask_sk is not None and self.seed is not None
        mask_sk = crypto.private_key(self.mask_sk)
        plus: list[bytes] = [self.seed]
        minus: list[bytes] = []
        for v in partners:
            seed = pairwise_seed(mask_sk, self.mask_pks[v], self.transcript, self.index, v)
            (plus if self.index < v else minus).append(seed)
        return plus, minus

    def precompute_masks(self, request: dict[str, Any]) -> PrecomputedMasks:
        """Expand this session's masks before the update exists (e.g. while it trains).

        Possible once the shares are exchanged (the pipelined round: stage 3's request comes
        with the train request): the masks depend only on the agreed keys, the self-mask
        seed and which neighbours' shares open. Changes nothing in the session; pass the
        result to :meth:`masked_input` with the same request.

        Raises
        ------
        SecAggError
            As :meth:`open_shares`.
        """
        p = self._params()
        partners = tuple(sorted(self.open_shares(request)))
        plus, minus = self._mask_seeds(partners)
        vector = np.zeros(p.vector_length + 1, dtype=ring_dtype(p.ring_bits))
        crypto.apply_masks(vector, plus, minus)
        return PrecomputedMasks(self.transcript, self.index, partners, vector)

    def masked_input(self, request: dict[str, Any], update: np.ndarray, weight: float, *,
                     masks: PrecomputedMasks | None = None) -> dict[str, Any]:
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
        masks : PrecomputedMasks, optional
            This session's masks from :meth:`precompute_masks` with the same request; used
            only when made for this transcript, index and partners (else the masks are
            expanded here, as without it).

        Returns
        -------
        dict
            ``{"index": int, "masked": numpy.ndarray}`` (``uint32``, or ``uint64`` in the
            wide ring) of length ``vector_length + 1``.

        Raises
        ------
        SecAggError
            On a tampered or misrouted ciphertext, too few surviving neighbours, or a bad
            update / weight.
        """
        self._expect(SecAggStage.SHARE, "upload a masked input")
        p = self._params()
        received = self.open_shares(request)
        assert self.mask_sk is not None and self.seed is not None
        x = np.asarray(update)
        if x.size != p.vector_length:
            raise SecAggError(
                f"update has {x.size} values but this round aggregates {p.vector_length}"
            )
        rng = np.random.default_rng(int.from_bytes(self._entropy(16), "big"))
        partners = tuple(sorted(received))
        dtype = ring_dtype(p.ring_bits)
        mask: Callable[[int], Callable[[np.ndarray], None]]
        if masks is not None and (masks.transcript, masks.index, masks.partners) == (
                self.transcript, self.index, partners) and masks.vector.shape == (x.size + 1,) \
                and masks.vector.dtype == dtype:
            mask = _adder(masks.vector)  # expanded before training: one addition left
        else:  # expand them now, each block while it is in the CPU cache
            plus, minus = self._mask_seeds(partners)

            def mask(lo: int) -> Callable[[np.ndarray], None]:
                return crypto.MaskRun(plus, minus, start=lo, dtype=dtype).apply

        y = encode(x, weight, clip_range=p.clip_range, quantization_bits=p.quantization_bits,
                   max_weight=p.max_weight, num_clients=p.num_clients, rounding=p.rounding,
                   rng=rng, mask=mask)
        self.shares.update(received)
        self.partners = sorted(received)
        # The secrets are shared and used: forget them.
        self.seed = self.mask_sk = self.enc_sk = None
        self.share_keys = {}
        self.stage = SecAggStage.MASKED.value
        return {"index": self.index, "masked": y}

    # ------------------------------------------------------------------ stage 4
    def _check_survivors(self, survivors: list[int]) -> None:
        p = self._params()
        s = set(survivors)
        if len(s) != len(survivors):
            raise SecAggError("survivor list repeats a client; refusing")
        if self.index not in s:
            raise SecAggError("server lists this client as dropped although it sent its input")
        outside = s - set(self.members)
        if outside:
            raise SecAggError(f"survivors {sorted(outside)[:5]} were never in this round's key "
                              "list; refusing")
        not_partners = (s & set(self.neighbours)) - set(self.partners)
        if not_partners:
            raise SecAggError(f"survivors {sorted(not_partners)[:5]} are neighbours that never sent "
                              "this client their shares: not within its partners; refusing")
        if len(s) < p.threshold:
            raise SecAggError(
                f"only {len(s)} clients survived, fewer than threshold {p.threshold}"
            )
        alive = len(s & set(self.neighbours))
        if alive < self.trust.min_peers:
            raise SecAggError(
                f"only {alive} of this hospital's verified peers survived, fewer than its policy "
                f"minimum of {self.trust.min_peers} (min_secagg_peers): the sum would not hide "
                "its update; refusing to unmask"
            )

    def consistency(self, request: dict[str, Any]) -> dict[str, Any]:
        """Stage 4 (consistency check): sign the survivor set the server announces.

        Parameters
        ----------
        request : dict
            ``{"survivors": [int]}``: clients whose masked input the server holds.

        Returns
        -------
        dict
            ``{"index", "consistency_signature": bytes}``.

        Raises
        ------
        SecAggError
            If this client is not listed, the list holds clients outside the round or
            neighbours that never sent this client shares, fewer than the threshold, or
            fewer surviving verified peers than the policy minimum.
        """
        self._expect(SecAggStage.MASKED, "sign the survivor set")
        survivors = sorted(_int_list(request, "survivors"))
        self._check_survivors(survivors)
        self.survivors = survivors
        self.stage = SecAggStage.CONSISTENCY.value
        name = self.trust.identity.name
        return {"index": self.index, "consistency_signature": self.trust.identity.sign(
            consistency_message(self.transcript, self.index, name, survivors))}

    # ------------------------------------------------------------------ stage 5
    def unmask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Stage 5: reveal seed shares of survivors and key shares of dropped neighbours.

        Parameters
        ----------
        request : dict
            ``{"survivors": [int], "signers": [int], "signatures": [bytes]}``: the survivor
            set again, and the consistency signatures of it by this client's shareholders.

        Returns
        -------
        dict
            ``{"index", "seed_owners": [int], "seed_shares": [bytes], "key_owners": [int],
            "key_shares": [bytes]}``; owners are only ever this client's partners (and itself).

        Raises
        ------
        SecAggError
            If the survivor set differs from the one this client signed, any signature does
            not verify, fewer than ``threshold`` of its shareholders signed, or the other kind
            of share of a client was revealed before.
        """
        if self.stage not in (SecAggStage.CONSISTENCY, SecAggStage.UNMASK):
            self._expect(SecAggStage.CONSISTENCY, "unmask")
        p = self._params()
        survivors = sorted(_int_list(request, "survivors"))
        if survivors != self.survivors:
            raise SecAggError("the survivor set in the unmask request differs from the one this "
                              "client signed in the consistency check; refusing")
        signers = _int_list(request, "signers")
        signatures = _bytes_list(request, "signatures")
        if len(signers) != len(signatures) or len(set(signers)) != len(signers):
            raise SecAggError("consistency signatures: signers and signatures do not match")
        holders = set(self.names)
        outside = [u for u in signers if u not in holders]
        if outside:
            raise SecAggError(f"consistency signature from client {outside[0]}, not one of this "
                              "client's shareholders; refusing")
        if len(signers) < p.threshold:
            raise SecAggError(
                f"only {len(signers)} of this client's shareholders confirmed the survivor set, "
                f"fewer than threshold {p.threshold}; refusing to unmask"
            )
        # threshold valid signatures suffice; any invalid one seen means two stories: refuse
        digest = survivors_digest(survivors)
        for u, sg in list(zip(signers, signatures, strict=True))[: p.threshold]:
            name = self.names[u]
            if not self.trust.roster.verify(
                    name, consistency_message(self.transcript, u, name, digest), sg):
                raise SecAggError(
                    f"client {u} ({name!r}) did not sign this survivor set: the server showed "
                    "clients different survivor sets (or forged a signature); refusing to unmask"
                )
        alive = set(survivors)
        mine = set(self.shares)  # itself and its partners: never anyone else
        seed_owners = sorted(o for o in alive if o in mine)
        key_owners = sorted(o for o in mine - alive)
        for o in seed_owners:
            if self.revealed.get(o, "seed") != "seed":
                raise SecAggError(f"mask-key share of client {o} was revealed; refusing its seed share")
        for o in key_owners:
            if self.revealed.get(o, "key") != "key":
                raise SecAggError(f"seed share of client {o} was revealed; refusing its mask-key share")
        self.revealed.update({o: "seed" for o in seed_owners})
        self.revealed.update({o: "key" for o in key_owners})
        self.stage = SecAggStage.UNMASK.value
        return {
            "index": self.index,
            "seed_owners": seed_owners,
            "seed_shares": [shamir.share_to_bytes(self.shares[o][0]) for o in seed_owners],
            "key_owners": key_owners,
            "key_shares": [shamir.share_to_bytes(self.shares[o][1]) for o in key_owners],
        }

    # ------------------------------------------------------------------ state
    def to_bytes(self) -> bytes:
        """Serialise the session (secret keys included: keep it on the node).

        The trust (identity, roster, policy) is not included: pass it again to
        :meth:`from_bytes`.
        """

        def b64(b: bytes | None) -> str | None:
            return None if b is None else base64.b64encode(b).decode()

        state = {
            "v": STATE_VERSION,
            "stage": self.stage,
            "name": self.trust.identity.name,
            "params": None if self.params is None else {
                **self.params.to_message(), "round_id": self.params.round_id.hex()
            },
            "index": self.index,
            "enc_sk": b64(self.enc_sk), "mask_sk": b64(self.mask_sk),
            "enc_pk": b64(self.enc_pk), "mask_pk": b64(self.mask_pk),
            "seed": b64(self.seed), "transcript": b64(self.transcript),
            "members": self.members,
            "neighbours": self.neighbours,
            "names": {str(k): v for k, v in self.names.items()},
            "enc_pks": {str(k): b64(v) for k, v in self.enc_pks.items()},
            "mask_pks": {str(k): b64(v) for k, v in self.mask_pks.items()},
            "share_keys": {str(k): b64(v) for k, v in self.share_keys.items()},
            "shares": {str(k): [hex(a), hex(b)] for k, (a, b) in self.shares.items()},
            "partners": self.partners,
            "survivors": self.survivors,
            "revealed": {str(k): v for k, v in self.revealed.items()},
        }
        return json.dumps(state, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, trust: ClientTrust,
                   entropy: crypto.Entropy | None = None) -> ClientSession:
        """Restore a session written by :meth:`to_bytes` (for the same hospital)."""
        try:
            s = json.loads(bytes(data))
            if s.get("v") != STATE_VERSION or s["stage"] not in STAGES:
                raise ValueError("unknown version or stage")
        except (ValueError, KeyError, TypeError) as err:
            raise SecAggError(f"secagg client state cannot be read: {err}") from None
        if s.get("name") != trust.identity.name:
            raise SecAggError("secagg client state belongs to another hospital; refusing it")

        def unb64(v: str | None) -> bytes | None:
            return None if v is None else base64.b64decode(v)

        self = cls(trust, entropy)
        self.stage = s["stage"]
        if s["params"] is not None:
            msg = dict(s["params"])
            msg["round_id"] = bytes.fromhex(msg["round_id"])
            self.params = RoundParams.from_message(msg)
        self.index = int(s["index"])
        self.enc_sk, self.mask_sk = unb64(s["enc_sk"]), unb64(s["mask_sk"])
        self.enc_pk, self.mask_pk = unb64(s["enc_pk"]) or b"", unb64(s["mask_pk"]) or b""
        self.seed, self.transcript = unb64(s["seed"]), unb64(s["transcript"]) or b""
        self.members = [int(v) for v in s["members"]]
        self.neighbours = [int(v) for v in s["neighbours"]]
        self.names = {int(k): str(v) for k, v in s["names"].items()}
        self.enc_pks = {int(k): unb64(v) or b"" for k, v in s["enc_pks"].items()}
        self.mask_pks = {int(k): unb64(v) or b"" for k, v in s["mask_pks"].items()}
        self.share_keys = {int(k): unb64(v) or b"" for k, v in s["share_keys"].items()}
        self.shares = {int(k): (int(a, 16), int(b, 16)) for k, (a, b) in s["shares"].items()}
        self.partners = [int(v) for v in s["partners"]]
        self.survivors = [int(v) for v in s["survivors"]]
        self.revealed = {int(k): str(v) for k, v in s["revealed"].items()}
        return self
