"""Cryptographic building blocks: key agreement, key derivation, mask expansion, AEAD.

- X25519 key agreement and HKDF-SHA256 key derivation (``cryptography``).
- Masks: a 256-bit seed is expanded with the ChaCha20 stream cipher (keystream of an
  all-zero plaintext) into uint32 words, i.e. uniform elements of Z_{2^32}.
- Shares travel encrypted and authenticated with ChaCha20-Poly1305; the associated data
  binds the round, the sender, the recipient and the public-key transcript.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedrg.errors import SecAggError

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


def agree(secret: bytes, peer_public: bytes, *, salt: bytes, info: bytes) -> bytes:
    """X25519 key agreement followed by HKDF-SHA256 to a 32-byte key.

    Parameters
    ----------
    secret : bytes
        Own raw X25519 secret key.
    peer_public : bytes
        The peer's raw X25519 public key.
    salt : bytes
        HKDF salt (the round context).
    info : bytes
        HKDF info (purpose and the two parties).

    Raises
    ------
    SecAggError
        If the peer key is invalid (e.g. a low-order point giving an all-zero secret).
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(secret).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as err:
        raise SecAggError(f"invalid peer public key in key agreement: {err}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(shared)


def pair_info(purpose: bytes, a: int, b: int) -> bytes:
    """HKDF info naming a purpose and an unordered pair of client indices."""
    lo, hi = sorted((a, b))
    return b"fedrg-secagg/" + purpose + struct.pack(">QQ", lo, hi)


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """Expand a 256-bit seed into ``length`` uniform uint32 words with ChaCha20.

    Parameters
    ----------
    seed : bytes
        32-byte seed (the ChaCha20 key; the nonce is fixed, every seed is used once).
    length : int
        Number of words.

    Returns
    -------
    numpy.ndarray
        ``uint32`` array of shape ``(length,)`` (the ChaCha20 keystream, little-endian).
    """
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}")
    enc = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    out = np.empty(length, dtype="<u4")
    enc.update_into(_zeros(4 * length), memoryview(out).cast("B"))
    return out


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
