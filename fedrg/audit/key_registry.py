"""The auditor's registry of hospital ledger keys (``fedrg audit --keys REGISTRY``).

A TOML or JSON file mapping hospital name to its Ed25519 public key, given as PEM text,
base64 of the raw 32 bytes, or a path (relative to the registry) to a PEM file::

    # keys.toml
    hospital-1 = "MCowBQYDK2VwAyEA..."          # or the raw base64 key
    hospital-2 = "keys/hospital-2.pub"

The auditor obtains these keys out of band (from each hospital, once); a ledger signed by
any other key is reported as UNVERIFIED, whatever key file lies next to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tomllib
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedrg import signing
from fedrg.errors import LedgerError


def load_key_registry(path: str | os.PathLike[str]) -> dict[str, Ed25519PublicKey]:
    """Read a key registry (TOML or JSON object: hospital -> key).

    Parameters
    ----------
    path : path-like
        The registry file (``.json`` is read as JSON, anything else as TOML).

    Returns
    -------
    dict[str, Ed25519PublicKey]
        One key per hospital name.

    Raises
    ------
    LedgerError
        Naming the file, the hospital and the fix when the file or a key is unusable.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise LedgerError(f"cannot read key registry {path}: {err.strerror}; pass --keys "
                          "with a TOML/JSON file mapping hospital name to public key") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise LedgerError(f"key registry {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: "
                          f"{err}") from None
    if not isinstance(raw, dict) or not raw:
        raise LedgerError(f"key registry {path} holds no 'hospital = \"key\"' pairs")
    keys: dict[str, Ed25519PublicKey] = {}
    for name, value in raw.items():
        if not isinstance(value, str):
            raise LedgerError(f"key registry {path}: the key of {name!r} must be a string "
                              f"(PEM, base64 or a path), got {type(value).__name__}")
        text_value = value
        if not value.strip().startswith("-----BEGIN") and (path.parent / value).is_file():
            text_value = (path.parent / value).read_text()
        try:
            keys[str(name)] = signing.public_key_from_text(text_value)
        except LedgerError as err:
            raise LedgerError(f"key registry {path}, hospital {name!r}: {err}") from None
    return keys


def registry_entry(name: str, key: Ed25519PublicKey) -> str:
    """One TOML line for ``name`` (what ``fedrg site key`` prints for the auditor)."""
    return f'"{name}" = "{signing.raw_public_b64(key)}"'
