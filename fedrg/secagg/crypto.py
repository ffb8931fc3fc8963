"""Cryptographic building blocks: key agreement, key derivation, mask expansion, AEAD.

- X25519 key agreement and HKDF-SHA256 key derivation (``cryptography``).
- Masks: a 256-bit seed is expanded with AES-128 in counter mode (keystream of an
  all-zero plaintext) into uint32 or uint64 words, i.e. uniform elements of the ring.
- Shares travel encrypted and authenticated with ChaCha20-Poly1305; the associated data
  binds the round, the sender, the recipient and the public-key transcript.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedrg.errors import SecAggError
from fedrg.secagg import parallel

Entropy = Callable[[int], bytes]
"""A source of random bytes: ``entropy(n) -> n bytes``."""

SEED_BYTES = 32
KEY_BYTES = 32
NONCE_BYTES = 12
_ZERO_NONCE = bytes(16)


def seeded_entropy(seed: bytes | int) -> Entropy:
    """Deterministic randomness from a seed (ChaCha20 keystream). **For tests only.**

    Parameters
    ----------
    seed : bytes or int
        Any seed; it is hashed to a 256-bit ChaCha20 key.

    Returns
    -------
    callable
        ``entropy(n) -> n bytes``, a reproducible stream.
    """
    raw = seed if isinstance(seed, bytes) else str(seed).encode()
    key = hashlib.sha256(b"fedrg-secagg-test-entropy" + raw).digest()
    enc = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    return lambda n: enc.update(bytes(n))


def generate_keypair(entropy: Entropy = os.urandom) -> tuple[bytes, bytes]:
    """Make an X25519 key pair.

    Returns
    -------
    (secret, public) : tuple of bytes
        32 raw bytes each.
    """
    sk = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def public_from_secret(secret: bytes) -> bytes:
    """The X25519 public key (raw bytes) of a raw secret key."""
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def private_key(secret: bytes) -> X25519PrivateKey:
    """An X25519 private-key object from raw bytes (build it once, reuse it for many peers)."""
    return X25519PrivateKey.from_private_bytes(secret)


def public_key(peer_public: bytes) -> X25519PublicKey:
    """An X25519 public-key object from raw bytes.

    Raises
    ------
    SecAggError
        If the bytes are not a 32-byte X25519 public key.
    """
    try:
        return X25519PublicKey.from_public_bytes(peer_public)
    except ValueError as err:
        raise SecAggError(f"invalid X25519 public key: {err}") from None


def agree(secret: bytes | X25519PrivateKey, peer_public: bytes | X25519PublicKey, *,
          salt: bytes, info: bytes) -> bytes:
    """X25519 key agreement followed by HKDF-SHA256 to a 32-byte key.

    Parameters
    ----------
    secret : bytes or X25519PrivateKey
        Own X25519 secret key (raw bytes, or a key object from :func:`private_key` to
        avoid rebuilding it for every peer).
    peer_public : bytes or X25519PublicKey
        The peer's X25519 public key (raw bytes or key object).
    salt : bytes
        HKDF salt (the round context).
    info : bytes
        HKDF info (purpose and the two parties).

    Raises
    ------
    SecAggError
        If the peer key is invalid (e.g. a low-order point giving an all-zero secret).
    """
    sk = secret if isinstance(secret, X25519PrivateKey) else private_key(secret)
    pk = peer_public if isinstance(peer_public, X25519PublicKey) else public_key(peer_public)
    try:
        shared = sk.exchange(pk)
    except ValueError as err:
        raise SecAggError(f"invalid peer public key in key agreement: {err}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(shared)


def pair_info(purpose: bytes, a: int, b: int) -> bytes:
    """HKDF info naming a purpose and an unordered pair of client indices."""
    lo, hi = sorted((a, b))
    return b"fedrg-secagg/" + purpose + struct.pack(">QQ", lo, hi)


_PRG_BLOCK = 16
_SLACK = _PRG_BLOCK - 1  # ``update_into`` wants this much room past the input


def _keystream(seed: bytes, block: int = 0) -> Any:
    """The mask PRG: AES-128-CTR keyed by ``seed[:16]``, counter ``seed[16:] + block``.

    AES-128-CTR (as in Bonawitz et al. 2017) runs about a third faster than ChaCha20 on
    CPUs with AES instructions; a 128-bit key and a random initial counter per seed, and
    far fewer than 2**64 blocks per seed, keep it a secure PRG.
    """
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    counter = (int.from_bytes(seed[16:], "big") + block) % (1 << 128)
    return Cipher(algorithms.AES(seed[:16]), modes.CTR(counter.to_bytes(16, "big"))).encryptor()


def expand_mask(seed: bytes, length: int, dtype: Any = np.uint32) -> np.ndarray:
    """Expand a 256-bit seed into ``length`` uniform ring elements (the mask PRG).

    Parameters
    ----------
    seed : bytes
        32-byte seed (AES-128 key and initial counter; every seed is used once).
    length : int
        Number of words.
    dtype : numpy dtype
        ``uint32`` (ring Z_{2^32}) or ``uint64`` (ring Z_{2^64}).

    Returns
    -------
    numpy.ndarray
        Array of shape ``(length,)`` (the keystream as little-endian words).
    """
    dt = np.dtype(dtype).newbyteorder("<")
    raw = bytearray(length * dt.itemsize + _SLACK)
    _keystream(seed).update_into(_zeros(length * dt.itemsize), raw)
    return np.frombuffer(raw, dtype=dt, count=length).copy()


MASK_CHUNK_BYTES = 1 << 17
"""Masks are expanded and added in blocks of this many bytes (they stay in the CPU cache)."""


class MaskRun:
    """Add and subtract the masks of some seeds along consecutive blocks of a ring vector.

    The keystream of every seed starts at word ``start`` (a multiple of the cipher block
    in words) and moves on with each :meth:`apply`: calling it on consecutive blocks
    ``v[start:a], v[a:b], ...`` equals adding ``expand_mask(s)[start:...]`` for each seed in
    ``plus`` and subtracting it for each in ``minus`` (mod ``2**bits``). One keystream
    buffer of at most :data:`MASK_CHUNK_BYTES` is reused: no full-length mask is allocated,
    so a caller can mask each block while it is still in the CPU cache (e.g. right after
    encoding it).

    Parameters
    ----------
    plus, minus : sequence of bytes
        32-byte seeds of the masks to add and to subtract.
    start : int
        Index of the first word the next :meth:`apply` receives.
    dtype : numpy dtype
        ``uint32`` or ``uint64`` (the ring).
    """

    def __init__(self, plus: Sequence[bytes], minus: Sequence[bytes], *, start: int = 0,
                 dtype: Any = np.uint32) -> None:
        dt = np.dtype(dtype)
        if dt not in (np.uint32, np.uint64):
            raise SecAggError("masks apply to a uint32 or uint64 ring vector")
        if (start * dt.itemsize) % _PRG_BLOCK:
            raise SecAggError(f"a mask run starts on a cipher block, not at word {start}")
        first = start * dt.itemsize // _PRG_BLOCK
        self._streams = ([(_keystream(s, first), True) for s in plus]
                         + [(_keystream(s, first), False) for s in minus])
        self._dtype = dt.newbyteorder("<")
        self._words = max(_PRG_BLOCK // dt.itemsize, MASK_CHUNK_BYTES // dt.itemsize)
        self._room = bytearray(0)  # the keystream buffer, sized by the first block
        self._scratch = np.frombuffer(self._room, dtype=self._dtype)

    def apply(self, part: np.ndarray) -> None:
        """Mask the next ``part.size`` words (``part``, 1-D, in place).

        Raises
        ------
        SecAggError
            If ``part`` is not a 1-D vector of this run's ring type.
        """
        if part.ndim != 1 or part.dtype != self._dtype:
            raise SecAggError(f"a {self._dtype.name} mask run cannot mask a {part.dtype.name} "
                              f"array of shape {part.shape}")
        if not self._streams:
            return
        item = self._dtype.itemsize
        need = min(part.size, self._words)
        if self._scratch.size < need:
            self._room = bytearray(need * item + _SLACK)
            self._scratch = np.frombuffer(self._room, dtype=self._dtype, count=need)
        for lo in range(0, part.size, self._words):
            block = part[lo:lo + self._words]
            nbytes = block.size * item
            buf = self._scratch[: block.size]
            out = memoryview(self._room)[: nbytes + _SLACK]
            zeros = _zeros(nbytes)
            for enc, add in self._streams:
                enc.update_into(zeros, out)
                if add:
                    np.add(block, buf, out=block)
                else:
                    np.subtract(block, buf, out=block)


def _apply_range(target: np.ndarray, lo: int, hi: int, plus: Sequence[bytes],
                 minus: Sequence[bytes]) -> None:
    MaskRun(plus, minus, start=lo, dtype=target.dtype).apply(target[lo:hi])


def apply_masks(target: np.ndarray, plus: Sequence[bytes], minus: Sequence[bytes], *,
                threads: int | None = None) -> np.ndarray:
    """``target += sum(expand(s) for s in plus) - sum(expand(s) for s in minus)``, in place.

    Equal to adding and subtracting :func:`expand_mask` of each seed (same keystreams), but
    block by block, so that each block of ``target`` and of the keystream stays in the CPU
    cache while every mask is applied to it, no full-length mask is ever allocated, and
    large vectors are split between threads (each slice starts its keystreams at the
    slice's block counter).

    Parameters
    ----------
    target : numpy.ndarray
        1-D ``uint32`` or ``uint64`` array (the ring), modified in place (wraps modulo
        ``2**bits``).
    plus, minus : sequence of bytes
        32-byte seeds of the masks to add and to subtract.
    threads : int, optional
        Threads to use (default :func:`fedrg.secagg.parallel.threads_for`).

    Returns
    -------
    numpy.ndarray
        ``target``.
    """
    if target.ndim != 1 or target.dtype not in (np.uint32, np.uint64):
        raise SecAggError("masks apply to a 1-D uint32 or uint64 ring vector")
    if not plus and not minus:
        return target
    # slice bounds on cipher block boundaries: each slice starts its keystreams there
    parallel.run_slices(target.size, lambda lo, hi: _apply_range(target, lo, hi, plus, minus),
                        nbytes=target.nbytes, align=_PRG_BLOCK // target.dtype.itemsize,
                        threads=threads)
    return target


_ZERO_BUFFER = bytes(0)


def _zeros(nbytes: int) -> memoryview:
    """A read-only view of ``nbytes`` zero bytes (one buffer, grown on demand)."""
    global _ZERO_BUFFER
    if len(_ZERO_BUFFER) < nbytes:
        _ZERO_BUFFER = bytes(nbytes)
    return memoryview(_ZERO_BUFFER)[:nbytes]


def seal(key: bytes, plaintext: bytes, associated: bytes, entropy: Entropy = os.urandom) -> bytes:
    """Encrypt and authenticate with ChaCha20-Poly1305; returns ``nonce || ciphertext``."""
    nonce = entropy(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Decrypt what :func:`seal` made.

    Raises
    ------
    SecAggError
        If the ciphertext, the nonce or the associated data were altered, or the message
        was meant for another sender, recipient or round.
    """
    if len(sealed) < NONCE_BYTES + 16:
        raise SecAggError("encrypted share too short: truncated or not a fedrg share")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecAggError(
            "encrypted share failed authentication: tampered, misrouted or from another round"
        ) from None
