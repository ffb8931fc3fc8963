"""Ed25519 keys that sign a hospital's privacy ledger.

Contract: the private key is PKCS8 PEM, unencrypted, file mode 0600, default
``<state_dir>/ledger_ed25519.pem``; the public key is SubjectPublicKeyInfo PEM,
default ``<state_dir>/ledger_ed25519.pub``. The private key never leaves the hospital;
the public key is what an auditor verifies the ledger against.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedrg.errors import LedgerError
from fedrg.files import atomic_write, create_private

PRIVATE_KEY_NAME = "ledger_ed25519.pem"
PUBLIC_KEY_NAME = "ledger_ed25519.pub"


def default_key_paths(state_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Return ``(private_path, public_path)`` of the ledger key pair in ``state_dir``."""
    root = Path(state_dir)
    return root / PRIVATE_KEY_NAME, root / PUBLIC_KEY_NAME


def public_path_for(private_path: str | os.PathLike[str]) -> Path:
    """The public key file that goes with ``private_path`` (same stem, ``.pub``)."""
    return Path(private_path).with_suffix(".pub")


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of ``key`` (or of a private key's public half)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Short fingerprint of a key: first 16 hex digits of sha256 of the raw public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def raw_public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64 (how key registries and ledger heads carry it)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text or base64 of the raw 32 bytes.

    Raises
    ------
    LedgerError
        When ``text`` is neither.
    """
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError, UnicodeEncodeError) as err:
        raise LedgerError(f"not an Ed25519 public key (PEM or base64 of 32 bytes): {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"a {type(key).__name__} key, expected Ed25519")
    return key


def write_keypair(
    private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]
) -> Ed25519PrivateKey:
    """Generate a new Ed25519 key pair and write it (private 0600 PKCS8 PEM, public SPKI PEM).

    Parameters
    ----------
    private_path, public_path
        Files to create. The private file must not exist yet (an existing key is never
        overwritten: a new key would orphan the ledger it signed).

    Returns
    -------
    Ed25519PrivateKey
        The new private key.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.exists():
        raise LedgerError(
            f"signing key {private_path} already exists; refusing to overwrite it "
            "(the ledger it signed could no longer be verified). Move it away first "
            "if you really mean to rotate keys."
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    create_private(private_path, pem)
    atomic_write(public_path, public_key_pem(key))
    return key


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PKCS8 PEM); refuse one that others can read."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as err:
        raise LedgerError(f"cannot read signing key {path}: {err.strerror}") from None
    if mode & 0o077:
        raise LedgerError(
            f"signing key {path} has mode {mode:04o}; group/others must not read it. "
            f"Fix: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise LedgerError(
            f"signing key {path} is not an unencrypted PKCS8 PEM key ({err})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(
            f"signing key {path} is a {type(key).__name__}, expected Ed25519"
        )
    return key


def load_or_create_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load the ledger signing key at ``path``, creating the key pair when missing.

    The public key is written next to it (``path`` with suffix ``.pub``) when created,
    and re-written if it went missing.
    """
    path = Path(path)
    pub_path = public_path_for(path)
    if not path.exists():
        return write_keypair(path, pub_path)
    key = load_private_key(path)
    if not pub_path.exists():
        atomic_write(pub_path, public_key_pem(key))
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key (SubjectPublicKeyInfo PEM)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LedgerError(f"cannot read public key {path}: {err.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise LedgerError(f"public key {path} is not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"public key {path} is a {type(key).__name__}, expected Ed25519")
    return key


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    """Sign ``message``; returns the signature as standard base64 text."""
    return base64.b64encode(key.sign(message)).decode("ascii")


def verify(public_key: Ed25519PublicKey, message: bytes, signature_b64: str) -> bool:
    """True when ``signature_b64`` is a valid signature of ``message`` under ``public_key``."""
    try:
        sig = base64.b64decode(signature_b64.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return False
    if len(sig) != 64 or base64.b64encode(sig).decode("ascii") != signature_b64:
        return False  # non-canonical base64 (e.g. altered padding bits) is refused
    try:
        public_key.verify(sig, message)
    except InvalidSignature:
        return False
    return True
