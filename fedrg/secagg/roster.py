"""The federation roster: who the hospitals are, and the long-term keys that vouch for them.

The operator publishes the roster; each hospital pins its own copy (its TOML names the file)
and trusts nothing else about its peers. A roster lists, per hospital, its name, its Flower
node-authentication public key and its long-term Ed25519 signing key (the key that also
signs its privacy ledger; every secure-aggregation message signed with it starts with the
``fedrg-secagg-v2/`` domain prefix, so a signature can never be taken for a ledger entry,
whose signed bytes are canonical JSON, or the reverse).

File format (TOML)::

    # fedrg federation roster: published by the operator, pinned by every hospital
    version = 1

    [[hospital]]
    name = "hospital_a"
    node_public_key = "ecdsa-sha2-nistp384 AAAA..."   # may be "" (simulation)
    signing_key = "9f1c...e2"                         # 64 hex digits: raw Ed25519 public key

Pure apart from :func:`load_roster` / :func:`write_roster` / :func:`load_identity`. Problems
with the file raise :class:`~fedrg.errors.ConfigError` naming the file and the entry (its
public message, which may reach the server, is only the class name).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tomllib
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedrg.errors import ConfigError
from fedrg.files import PUBLIC_MODE, atomic_write

ROSTER_VERSION = 1
SIGNATURE_BYTES = 64
_VERIFIED_KEPT = 200_000
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _check_name(name: str, where: str) -> str:
    if not name or not set(name) <= _NAME_CHARS:
        raise ConfigError(
            f"{where}: hospital name {name!r} may only hold letters, digits, '-', '_' and '.' "
            "(and may not be empty); fix the name in the roster"
        )
    return name


@dataclass(frozen=True)
class RosterEntry:
    """One hospital of the federation.

    Attributes
    ----------
    name : str
        The hospital's name (as in its TOML ``name``).
    signing_key : bytes
        Its long-term Ed25519 public key, 32 raw bytes.
    node_public_key : str
        Its Flower node-authentication public key (OpenSSH text), ``""`` in simulation.
    """

    name: str
    signing_key: bytes
    node_public_key: str = ""

    def public_key(self) -> Ed25519PublicKey:
        """The signing key as a ``cryptography`` object."""
        return Ed25519PublicKey.from_public_bytes(self.signing_key)


class Roster:
    """The pinned list of hospitals; verifies signatures by hospital name.

    Parameters
    ----------
    entries : iterable of RosterEntry
        Hospitals; names and signing keys must be distinct.
    source : str
        Where the roster came from (for error messages).

    Raises
    ------
    ConfigError
        On a duplicated name or signing key, or a malformed key.
    """

    def __init__(self, entries: Iterable[RosterEntry], *, source: str = "roster") -> None:
        self.source = source
        self.entries: dict[str, RosterEntry] = {}
        keys: dict[bytes, str] = {}
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._verified: set[tuple[str, bytes, bytes]] = set()
        for e in entries:
            _check_name(e.name, source)
            if e.name in self.entries:
                raise ConfigError(f"{source}: hospital {e.name!r} is listed twice; each hospital "
                                  "must appear once")
            if e.signing_key in keys:
                raise ConfigError(f"{source}: hospitals {keys[e.signing_key]!r} and {e.name!r} share "
                                  "one signing key; every hospital needs its own")
            try:
                self._keys[e.name] = e.public_key()
            except ValueError:
                raise ConfigError(f"{source}: signing_key of {e.name!r} is not an Ed25519 public "
                                  f"key (need 32 bytes, got {len(e.signing_key)})") from None
            keys[e.signing_key] = e.name
            self.entries[e.name] = e

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    @property
    def names(self) -> list[str]:
        """Hospital names, sorted."""
        return sorted(self.entries)

    def verify(self, name: str, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` is ``name``'s valid Ed25519 signature of ``message``.

        Unknown names and malformed signatures give ``False``. Verification is
        deterministic, so a successful check of the exact ``(name, message, signature)``
        is remembered: simulated hospitals that share one roster object in a process
        verify each signature once (a deployed hospital holds its own roster).
        """
        key = self._keys.get(name)
        if key is None or len(signature) != SIGNATURE_BYTES:
            return False
        memo = (name, hashlib.sha256(message).digest(), bytes(signature))
        if memo in self._verified:
            return True
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        if len(self._verified) >= _VERIFIED_KEPT:
            self._verified.clear()
        self._verified.add(memo)
        return True

    def to_toml(self) -> str:
        """The roster file's text (see the module docstring)."""
        lines = ["# fedrg federation roster: published by the operator, pinned by every hospital",
                 f"version = {ROSTER_VERSION}", ""]
        for name in self.names:
            e = self.entries[name]
            node = e.node_public_key.replace("\\", "\\\\").replace('"', '\\"')
            lines += ["[[hospital]]", f'name = "{e.name}"', f'node_public_key = "{node}"',
                      f'signing_key = "{e.signing_key.hex()}"', ""]
        return "\n".join(lines)

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical roster text: compare it out of band with peers."""
        return hashlib.sha256(self.to_toml().encode()).hexdigest()

    @classmethod
    def from_toml(cls, text: str, *, source: str = "roster") -> Roster:
        """Parse a roster file's text.

        Raises
        ------
        ConfigError
            Naming the file and the faulty entry.
        """
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source} is not valid TOML: {err}") from None
        if data.get("version") != ROSTER_VERSION:
            raise ConfigError(f"{source}: version = {data.get('version')!r}; this fedrg reads "
                              f"roster version {ROSTER_VERSION} (ask the operator for a current roster)")
        unknown = set(data) - {"version", "hospital"}
        if unknown:
            raise ConfigError(f"{source}: unknown top-level keys {sorted(unknown)}")
        hospitals = data.get("hospital", [])
        if not isinstance(hospitals, list) or not hospitals:
            raise ConfigError(f"{source} lists no [[hospital]] entries")
        entries = []
        for i, h in enumerate(hospitals, 1):
            where = f"{source}, hospital #{i}"
            if not isinstance(h, dict):
                raise ConfigError(f"{where} is not a table")
            extra = set(h) - {"name", "signing_key", "node_public_key"}
            if extra or "name" not in h or "signing_key" not in h:
                raise ConfigError(f"{where}: needs name and signing_key (and optionally "
                                  f"node_public_key), got keys {sorted(h)}")
            try:
                key = bytes.fromhex(str(h["signing_key"]))
            except ValueError:
                key = b""
            if len(key) != 32:
                raise ConfigError(f"{where} ({h['name']!r}): signing_key must be 64 hex digits "
                                  f"(a raw Ed25519 public key), got {str(h['signing_key'])[:80]!r}")
            entries.append(RosterEntry(name=_check_name(str(h["name"]), where), signing_key=key,
                                       node_public_key=str(h.get("node_public_key", ""))))
        return cls(entries, source=source)


def load_roster(path: str | os.PathLike[str]) -> Roster:
    """Read a roster file.

    Raises
    ------
    ConfigError
        If the file cannot be read or is malformed (the message names the file).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read the federation roster {path}: {err.strerror}; set "
                          "'roster' in the hospital's TOML to the file the operator published") from None
    return Roster.from_toml(text, source=str(path))


def write_roster(path: str | os.PathLike[str], roster: Roster) -> Path:
    """Write ``roster`` to ``path`` (atomically; the roster is public, mode 0644)."""
    return atomic_write(path, roster.to_toml(), mode=PUBLIC_MODE)


def entry_from_files(name: str, signing_public: str | os.PathLike[str],
                     node_public: str | os.PathLike[str] | None = None) -> RosterEntry:
    """A hospital's roster entry from the public files ``fedrg keys new`` wrote.

    Parameters
    ----------
    name : str
        The hospital's name.
    signing_public : path
        Its ``ledger_ed25519.pub`` (Ed25519 SubjectPublicKeyInfo PEM).
    node_public : path, optional
        Its ``node_auth.pub`` (OpenSSH line).

    Raises
    ------
    ConfigError
        If a file cannot be read or holds the wrong kind of key.
    """
    from fedrg import signing
    from fedrg.errors import LedgerError

    try:
        key = signing.load_public_key(signing_public)
    except LedgerError as err:
        raise ConfigError(f"roster entry {name!r}: {err}") from None
    node = ""
    if node_public:
        try:
            node = Path(node_public).read_text().strip()
        except OSError as err:
            raise ConfigError(f"roster entry {name!r}: cannot read {node_public}: "
                              f"{err.strerror}") from None
    return RosterEntry(_check_name(name, "roster entry"), key.public_bytes_raw(), node)


@dataclass(frozen=True)
class SigningIdentity:
    """A hospital's own name and long-term signing key (never leaves the hospital).

    Attributes
    ----------
    name : str
        The hospital's roster name.
    key : Ed25519PrivateKey
        Its long-term signing key.
    """

    name: str
    key: Ed25519PrivateKey

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``message``."""
        return self.key.sign(message)

    def entry(self, node_public_key: str = "") -> RosterEntry:
        """This hospital's roster entry (what it sends the operator)."""
        return RosterEntry(self.name, self.key.public_key().public_bytes_raw(), node_public_key)


def load_identity(name: str, key_path: str | os.PathLike[str], *, create: bool = False) -> SigningIdentity:
    """The hospital's identity from its Ed25519 key file (the ledger signing key).

    Parameters
    ----------
    name : str
        The hospital's roster name.
    key_path : path
        PKCS8 PEM Ed25519 private key (mode 0600).
    create : bool
        Create the key pair when missing (simulation); deployment keys come from
        ``fedrg keys new``.
    """
    from fedrg import signing

    key = (signing.load_or_create_signing_key(key_path) if create
           else signing.load_private_key(key_path))
    return SigningIdentity(_check_name(name, str(key_path)), key)
