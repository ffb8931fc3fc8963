"""The privacy ledger: an append-only, hash-chained, Ed25519-signed record of every DP-SGD
round that ever touched one hospital's dataset, across runs.

File layout in the hospital's state directory (outside any run directory)::

    ledger.jsonl          one canonical JSON object per line (see below)
    ledger_head.json      signed pointer to the last entry (detects dropped trailing lines)
    ledger_ed25519.pem    signing key (0600), see :mod:`fedrg.signing`
    ledger_ed25519.pub    public key an auditor verifies against

Each line is the canonical JSON (sorted keys, no spaces, ASCII) of an entry::

    {"budget", "config_hash", "dataset_fingerprint", "delta", "epsilon", "hospital",
     "key_id", "mechanism": {"accountant", "max_grad_norm", "noise_multiplier",
     "sample_rate", "steps"}, "prev_hash", "round", "run_id", "seq", "signature",
     "timestamp", "version", "policy_hash", "kind", "details"}

``policy_hash`` is the sha256 of the site policy the entry was made under
(:meth:`fedrg.policy.SitePolicy.policy_hash`), ``kind`` is ``train``,
``evaluation`` or ``reinit`` and ``details`` a JSON object (a reinit's reason and the
previous head). Version 1 entries (written before site policies) have none of the three;
they still verify, and the audit reports that they carry no policy.

``epsilon`` is the cumulative epsilon of the dataset at ``delta`` after this entry's steps
(all earlier entries included).

A round a site took part in *without* DP-SGD (only possible when its policy says
``require_dp = false`` and the request turned DP off) is still recorded: its mechanism has
``accountant = "none"`` (:data:`NON_PRIVATE`) and ``noise_multiplier = 0``; it adds nothing
to the DP accounting of the other entries (its ``epsilon`` repeats the cumulative DP epsilon
so far) and the audit lists it as a non-private round, for which no DP guarantee holds. ``prev_hash`` is the sha256 of the previous line's bytes
(64 zeros for the first entry); ``signature`` is Ed25519 over the canonical JSON of the
entry without ``signature`` (so it covers ``prev_hash``). Appends rewrite the whole file
into a temporary file in the same directory, fsync it and ``os.replace`` it, under an
advisory lock, so a crash leaves either the old or the new ledger, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedrg import signing
from fedrg.errors import BudgetExceededError, LedgerError
from fedrg.files import atomic_write
from fedrg.policy import ACCOUNTANTS
from fedrg.privacy.mechanism import (  # re-exported: the ledger's record form
    EPS_TOL,
    MechanismSegment,
    within_budget,
)

LEDGER_NAME = "ledger.jsonl"
HEAD_NAME = "ledger_head.json"
GENESIS_HASH = "0" * 64
ENTRY_VERSION = 2
#: ``mechanism.accountant`` of a non-private round (no DP-SGD; see the module docstring).
NON_PRIVATE = "none"
#: What an entry records: a DP-SGD round, a DP release of evaluation metrics (a Gaussian
#: mechanism, sample_rate 1, steps 1), or an explicit re-initialisation of a fresh ledger
#: (no steps; names the previous head when it is known).
KINDS = ("train", "evaluation", "reinit")

_ENTRY_KEYS_V1 = {
    "budget", "config_hash", "dataset_fingerprint", "delta", "epsilon", "hospital",
    "key_id", "mechanism", "prev_hash", "round", "run_id", "seq", "signature",
    "timestamp", "version",
}
# version 2 binds the site policy (its hash) into every entry, and names the entry's kind
_ENTRY_KEYS = _ENTRY_KEYS_V1 | {"policy_hash", "kind", "details"}
_MECH_KEYS = {"accountant", "max_grad_norm", "noise_multiplier", "sample_rate", "steps"}


# --------------------------------------------------------------------------- encoding

def canonical_bytes(obj: Any) -> bytes:
    """Canonical JSON encoding: sorted keys, no whitespace, ASCII only, no NaN/inf."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def signed_payload(entry: dict[str, Any]) -> bytes:
    """The bytes an entry's signature covers: the canonical entry without ``signature``."""
    return canonical_bytes({k: v for k, v in entry.items() if k != "signature"})


@dataclass(frozen=True)
class LedgerEntry:
    """One verified ledger line."""

    seq: int
    hospital: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str
    delta: float
    epsilon: float
    budget: float
    timestamp: str
    config_hash: str
    dataset_fingerprint: str
    prev_hash: str
    key_id: str
    signature: str
    version: int = ENTRY_VERSION
    policy_hash: str | None = None
    kind: str = "train"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def private(self) -> bool:
        """False for a round recorded without DP-SGD (:data:`NON_PRIVATE`)."""
        return self.accountant != NON_PRIVATE

    @property
    def segment(self) -> MechanismSegment:
        """This entry's mechanism as an accountant history segment."""
        return MechanismSegment(self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored on the entry's line."""
        out = {
            "version": self.version,
            "seq": self.seq,
            "hospital": self.hospital,
            "run_id": self.run_id,
            "round": self.round,
            "mechanism": {
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
                "steps": self.steps,
                "max_grad_norm": self.max_grad_norm,
                "accountant": self.accountant,
            },
            "delta": self.delta,
            "epsilon": self.epsilon,
            "budget": self.budget,
            "timestamp": self.timestamp,
            "config_hash": self.config_hash,
            "dataset_fingerprint": self.dataset_fingerprint,
            "prev_hash": self.prev_hash,
            "key_id": self.key_id,
            "signature": self.signature,
        }
        if self.version >= 2:
            out.update(policy_hash=self.policy_hash or "", kind=self.kind,
                       details=dict(self.details))
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> LedgerEntry:
        """Build from a parsed line; raises ``ValueError`` naming the first schema problem."""
        _check_schema(obj)
        m = obj["mechanism"]
        return cls(
            seq=obj["seq"], hospital=obj["hospital"], run_id=obj["run_id"],
            round=obj["round"], noise_multiplier=float(m["noise_multiplier"]),
            sample_rate=float(m["sample_rate"]), steps=m["steps"],
            max_grad_norm=float(m["max_grad_norm"]), accountant=m["accountant"],
            delta=float(obj["delta"]), epsilon=float(obj["epsilon"]),
            budget=float(obj["budget"]), timestamp=obj["timestamp"],
            config_hash=obj["config_hash"], dataset_fingerprint=obj["dataset_fingerprint"],
            prev_hash=obj["prev_hash"], key_id=obj["key_id"], signature=obj["signature"],
            version=obj["version"], policy_hash=obj.get("policy_hash") or None,
            kind=obj.get("kind", "train"), details=dict(obj.get("details") or {}),
        )


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_schema(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise ValueError("entry is not a JSON object")
    keys = set(obj)
    version = obj.get("version")
    if version not in (1, ENTRY_VERSION) or isinstance(version, bool):
        raise ValueError(f"version {version!r} (this fedrg reads 1 and {ENTRY_VERSION})")
    expected = _ENTRY_KEYS_V1 if version == 1 else _ENTRY_KEYS
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise ValueError(f"fields missing {missing} / unexpected {extra}")
    if version >= 2:
        if not isinstance(obj["policy_hash"], str):
            raise ValueError("policy_hash must be a string")
        if obj["kind"] not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {obj['kind']!r}")
        if not isinstance(obj["details"], dict):
            raise ValueError("details must be a JSON object")
    m = obj["mechanism"]
    if not isinstance(m, dict) or set(m) != _MECH_KEYS:
        raise ValueError(f"mechanism must hold exactly {sorted(_MECH_KEYS)}")
    for name in ("hospital", "run_id", "timestamp", "config_hash", "dataset_fingerprint",
                 "prev_hash", "key_id", "signature"):
        if not isinstance(obj[name], str):
            raise ValueError(f"{name} must be a string")
    for name in ("seq", "round"):
        if not _is_int(obj[name]) or obj[name] < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {obj[name]!r}")
    if not _is_int(m["steps"]) or m["steps"] < 0:
        raise ValueError(f"mechanism.steps must be a non-negative integer, got {m['steps']!r}")
    if not _is_num(m["noise_multiplier"]) or m["noise_multiplier"] < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {m['noise_multiplier']!r}")
    if not _is_num(m["sample_rate"]) or not 0 < m["sample_rate"] <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {m['sample_rate']!r}")
    if not _is_num(m["max_grad_norm"]) or m["max_grad_norm"] <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {m['max_grad_norm']!r}")
    if m["accountant"] not in (*ACCOUNTANTS, NON_PRIVATE):
        raise ValueError(f"accountant must be one of {(*ACCOUNTANTS, NON_PRIVATE)}, "
                         f"got {m['accountant']!r}")
    if m["accountant"] == NON_PRIVATE and m["noise_multiplier"] != 0:
        raise ValueError("a non-private entry (accountant 'none') must have noise_multiplier 0")
    if not _is_num(obj["delta"]) or not 0 < obj["delta"] < 1:
        raise ValueError(f"delta must be in (0, 1), got {obj['delta']!r}")
    for name in ("epsilon", "budget"):
        if not _is_num(obj[name]) or obj[name] < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {obj[name]!r}")


# --------------------------------------------------------------------------- verification

@dataclass(frozen=True)
class LedgerProblem:
    """One problem found in a ledger. ``line`` is 1-based (None: the file as a whole)."""

    code: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclass
class LedgerReport:
    """Outcome of :func:`verify_ledger`: the entries that parsed and every problem found."""

    path: Path
    entries: list[LedgerEntry] = field(default_factory=list)
    problems: list[LedgerProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def codes(self) -> set[str]:
        """The distinct problem codes (for tests and machine-readable output)."""
        return {p.code for p in self.problems}

    def add(self, code: str, message: str, line: int | None = None) -> None:
        self.problems.append(LedgerProblem(code, message, line))

    def summary(self) -> str:
        """Human-readable list of problems."""
        if self.ok:
            return f"{self.path}: {len(self.entries)} entries, verified"
        body = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.path}: {len(self.problems)} problem(s):\n{body}"


def _as_public_key(
    key: Ed25519PublicKey | Ed25519PrivateKey | str | os.PathLike[str],
) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    return signing.load_public_key(key)


def verify_ledger_bytes(
    data: bytes,
    public_key: Ed25519PublicKey,
    *,
    path: Path,
    head: bytes | None = None,
    check_head: bool = True,
) -> LedgerReport:
    """Verify ledger content ``data`` (and its head file content ``head``) against a key.

    See :func:`verify_ledger`; this variant works on bytes already read.
    """
    report = LedgerReport(path=path)
    expected_kid = signing.key_id(public_key)
    if data and not data.endswith(b"\n"):
        report.add("truncated", "the last line has no newline: the file was truncated or "
                   "edited (an append is written whole, so this is never a crash)",
                   data.count(b"\n") + 1)
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    report.lines = len(raw_lines)
    prev_hash = GENESIS_HASH
    prev_entry: LedgerEntry | None = None
    for i, raw in enumerate(raw_lines, start=1):
        expected_prev, prev_hash = prev_hash, sha256_hex(raw)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            report.add("json", f"not valid JSON ({err.msg if hasattr(err, 'msg') else err}): "
                       "the line was edited or cut", i)
            prev_entry = None
            continue
        try:
            canonical = canonical_bytes(obj)
        except ValueError:
            canonical = b""
        if canonical != raw:
            report.add("noncanonical", "not in canonical JSON form (edited by hand?)", i)
        try:
            entry = LedgerEntry.from_dict(obj)
        except ValueError as err:
            report.add("schema", f"malformed entry: {err}", i)
            prev_entry = None
            continue
        if entry.seq != i - 1:
            report.add("seq", f"sequence number {entry.seq}, expected {i - 1}: lines were "
                       "dropped, inserted or reordered", i)
        if entry.prev_hash != expected_prev:
            report.add("chain", "prev_hash does not match the previous line: a line before it "
                       "was dropped, inserted, reordered or edited", i)
        if not signing.verify(public_key, signed_payload(obj), entry.signature):
            if entry.key_id != expected_kid:
                report.add("foreign_key", f"signed by another key (key id {entry.key_id}, "
                           f"the hospital's public key is {expected_kid})", i)
            else:
                report.add("signature", "signature does not verify: the entry was edited or "
                           "its signature replaced", i)
        elif entry.key_id != expected_kid:
            report.add("schema", f"key_id {entry.key_id} does not name the verifying key "
                       f"{expected_kid}", i)
        if not within_budget(entry.epsilon, entry.budget):
            report.add("over_budget", f"recorded epsilon {entry.epsilon:.6g} passes the "
                       f"budget {entry.budget:.6g}", i)
        if prev_entry is not None:
            if entry.epsilon + EPS_TOL < prev_entry.epsilon and entry.delta <= prev_entry.delta:
                report.add("epsilon_decrease", f"cumulative epsilon fell from "
                           f"{prev_entry.epsilon:.6g} to {entry.epsilon:.6g}", i)
            if entry.hospital != prev_entry.hospital:
                report.add("hospital", f"hospital {entry.hospital!r} differs from the line "
                           f"before ({prev_entry.hospital!r})", i)
            if entry.timestamp < prev_entry.timestamp:
                report.warnings.append(f"line {i}: timestamp earlier than the line before")
        report.entries.append(entry)
        prev_entry = entry
    if check_head:
        _check_head(report, raw_lines, head, public_key)
    return report


def _check_head(
    report: LedgerReport, raw_lines: list[bytes], head: bytes | None,
    public_key: Ed25519PublicKey,
) -> None:
    n = len(raw_lines)
    if head is None:
        if n:
            report.add("head_missing", f"{HEAD_NAME} is missing, so removal of trailing "
                       "lines cannot be ruled out")
        return
    try:
        obj = json.loads(head.decode("utf-8"))
        entries, last_hash, sig = obj["entries"], obj["last_hash"], obj["signature"]
        ok_sig = signing.verify(public_key, signed_payload(obj), sig)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        report.add("head", f"{HEAD_NAME} is not a valid head record")
        return
    if not ok_sig:
        report.add("head", f"{HEAD_NAME} signature does not verify")
        return
    hashes = [sha256_hex(r) for r in raw_lines]
    if not _is_int(entries) or entries < 0:
        report.add("head", f"{HEAD_NAME} holds an invalid entry count {entries!r}")
    elif entries > n:
        report.add("dropped_tail", f"the signed head says {entries} entries but the ledger has "
                   f"{n}: trailing lines were removed")
    elif entries == n:
        if (hashes[-1] if n else GENESIS_HASH) != last_hash:
            report.add("head", "the last line differs from the one the signed head points to")
    elif entries == n - 1 and (hashes[-2] if n >= 2 else GENESIS_HASH) == last_hash:
        report.warnings.append(
            f"{HEAD_NAME} lags one entry behind (an append was interrupted after the entry "
            "was written); the next append repairs it"
        )
    else:
        report.add("head", f"the signed head says {entries} entries but the ledger has {n}")


def head_path_for(ledger_path: str | os.PathLike[str]) -> Path:
    """The signed head file of a ledger: ``ledger_head.json`` next to ``ledger.jsonl``, or
    ``<stem>.head.json`` next to a ledger copied under another name (``<name>.jsonl``)."""
    p = Path(ledger_path)
    return p.with_name(HEAD_NAME) if p.name == LEDGER_NAME else p.with_name(f"{p.stem}.head.json")


def verify_ledger(
    path: str | os.PathLike[str],
    public_key: Ed25519PublicKey | Ed25519PrivateKey | str | os.PathLike[str],
    *,
    check_head: bool = True,
) -> LedgerReport:
    """Verify a ledger file: canonical form, hash chain, signatures, budget, head.

    Parameters
    ----------
    path
        The ``ledger.jsonl`` file.
    public_key
        The hospital's Ed25519 public key (or a path to its PEM file).
    check_head
        Also check the signed head file next to the ledger (detects dropped trailing lines).

    Returns
    -------
    LedgerReport
        Every problem found (edited numbers, dropped/reordered lines, swapped signatures,
        entries signed by another key, a truncated last line, a dropped tail, ...).
    """
    path = Path(path)
    pub = _as_public_key(public_key)
    try:
        data = path.read_bytes()
    except OSError as err:
        report = LedgerReport(path=path)
        report.add("missing", f"cannot read ledger {path}: {err.strerror}")
        return report
    head_path = head_path_for(path)
    head = head_path.read_bytes() if check_head and head_path.exists() else None
    return verify_ledger_bytes(data, pub, path=path, head=head, check_head=check_head)


# --------------------------------------------------------------------------- writing

@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


#: Ledgers verified in this process: (path, key id) -> (ledger bytes, head bytes, report).
_VERIFIED: dict[tuple[str, str], tuple[bytes, bytes | None, LedgerReport]] = {}
_VERIFIED_KEPT = 256


class Ledger:
    """A hospital's privacy ledger in its state directory.

    Parameters
    ----------
    state_dir
        The hospital's state directory (created if missing).
    signing_key
        Ed25519 private key; required to append. Without it the ledger is read-only and
        verified against ``<state_dir>/ledger_ed25519.pub``.
    hospital
        Name recorded in each entry (the site name).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        signing_key: Ed25519PrivateKey | None = None,
        hospital: str = "hospital",
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_NAME
        self.head_path = self.state_dir / HEAD_NAME
        self.lock_path = self.state_dir / (LEDGER_NAME + ".lock")
        self.public_key_path = self.state_dir / signing.PUBLIC_KEY_NAME
        self.hospital = hospital
        self._key = signing_key
        #: where the signing key lives (its anchor file sits beside it); None: not known
        self.key_path: Path | None = None

    @classmethod
    def open(
        cls,
        state_dir: str | os.PathLike[str],
        *,
        hospital: str,
        signing_key_path: str | os.PathLike[str] | None = None,
    ) -> Ledger:
        """Open (creating key pair and directory as needed) a hospital's writable ledger.

        ``signing_key_path`` defaults to ``<state_dir>/ledger_ed25519.pem``; the public key
        is kept at ``<state_dir>/ledger_ed25519.pub`` either way.
        """
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        key_path = Path(signing_key_path) if signing_key_path else (
            state_dir / signing.PRIVATE_KEY_NAME)
        key = signing.load_or_create_signing_key(key_path)
        pub_path = state_dir / signing.PUBLIC_KEY_NAME
        pem = signing.public_key_pem(key)
        if not pub_path.exists() or pub_path.read_bytes() != pem:
            if pub_path.exists():
                current = signing.load_public_key(pub_path)
                if signing.key_id(current) != signing.key_id(key):
                    raise LedgerError(
                        f"public key {pub_path} does not belong to signing key {key_path}; "
                        "restore the matching key pair (a ledger cannot change keys)"
                    )
            atomic_write(pub_path, pem)
        ledger = cls(state_dir, signing_key=key, hospital=hospital)
        ledger.key_path = key_path
        return ledger

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key entries are verified against."""
        if self._key is not None:
            return self._key.public_key()
        return signing.load_public_key(self.public_key_path)

    def _read_bytes(self) -> tuple[bytes, bytes | None]:
        data = self.path.read_bytes() if self.path.exists() else b""
        head = self.head_path.read_bytes() if self.head_path.exists() else None
        return data, head

    def verify(self) -> LedgerReport:
        """Verify the ledger on disk (an absent ledger is an empty, valid one).

        Signatures are checked once per content: bytes identical to ones already verified
        under this key (in this process) give the same report without checking again.
        """
        data, head = self._read_bytes()
        return self._verify_bytes(data, head)

    def _verify_bytes(self, data: bytes, head: bytes | None) -> LedgerReport:
        key = (str(self.path.resolve()), signing.key_id(self.public_key))
        cached = _VERIFIED.get(key)
        if cached is not None and cached[0] == data and cached[1] == head:
            return cached[2]
        report = verify_ledger_bytes(data, self.public_key, path=self.path, head=head)
        if report.ok:
            _VERIFIED[key] = (data, head, report)
            while len(_VERIFIED) > _VERIFIED_KEPT:
                _VERIFIED.pop(next(iter(_VERIFIED)))
        return report

    def read(self) -> list[LedgerEntry]:
        """Return all entries after verifying them; raises :class:`LedgerError` on any problem."""
        report = self.verify()
        if not report.ok:
            raise LedgerError(
                report.summary() + "\nThe ledger cannot be trusted; restore it from a backup "
                "or have it audited (`fedrg audit " + str(self.state_dir) + "`)."
            )
        return list(report.entries)

    def history(self) -> list[MechanismSegment]:
        """Every DP mechanism segment ever recorded (all runs), in order, for the accountant.

        Non-private rounds (:data:`NON_PRIVATE`) are not DP mechanisms and are left out.
        """
        return [e.segment for e in self.read() if e.steps > 0 and e.private]

    def epsilon_spent(self) -> float:
        """Cumulative epsilon recorded so far (0 for an empty ledger)."""
        entries = self.read()
        return entries[-1].epsilon if entries else 0.0

    def append(
        self,
        *,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        accountant: str,
        target_delta: float,
        epsilon: float,
        budget: float,
        config_hash: str,
        dataset_fingerprint: str,
        timestamp: str | None = None,
        policy_hash: str = "",
        kind: str = "train",
        details: dict[str, Any] | None = None,
        require_empty: bool = False,
    ) -> LedgerEntry:
        """Append one signed entry (atomically, under an advisory lock).

        ``epsilon`` is the cumulative epsilon of the dataset after these steps, at
        ``target_delta``. ``policy_hash`` binds the site policy the entry was made under;
        ``kind`` is one of :data:`KINDS`. The append is refused (nothing written) when the
        existing ledger does not verify, when ``epsilon`` is below the last recorded value,
        when it passes ``budget`` (:class:`BudgetExceededError`), or, with
        ``require_empty``, when the ledger already holds entries.
        """
        if self._key is None:
            raise LedgerError(f"ledger {self.path} was opened without a signing key; "
                              "use Ledger.open(state_dir, hospital=...) to append")
        if timestamp is None:
            timestamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.lock_path):
            data, head = self._read_bytes()
            report = self._verify_bytes(data, head)
            if not report.ok:
                raise LedgerError("refusing to append to a ledger that does not verify: "
                                  + report.summary())
            last = report.entries[-1] if report.entries else None
            if require_empty and last is not None:
                raise LedgerError(
                    f"ledger {self.path} already holds {len(report.entries)} entries; a "
                    "re-initialisation starts a fresh ledger only (nothing was written)")
            if last is None and kind != "reinit" and read_anchor(self) is not None:
                raise LedgerError(
                    f"ledger {self.path} is empty but the anchor beside its signing key pins "
                    "an earlier ledger: the state directory was wiped. Restore it, or restart "
                    "explicitly with `fedrg site reinit` (recorded); nothing was written")
            spent = last.epsilon if last else 0.0
            if last is not None and last.hospital != self.hospital:
                raise LedgerError(
                    f"ledger {self.path} belongs to hospital {last.hospital!r}, not "
                    f"{self.hospital!r}; each hospital (dataset) needs its own state_dir"
                )
            # Cumulative epsilon only grows, unless delta was raised (then it may fall).
            same_or_smaller_delta = last is None or target_delta <= last.delta
            if not math.isfinite(epsilon) or (same_or_smaller_delta and epsilon + EPS_TOL < spent):
                raise LedgerError(
                    f"epsilon {epsilon!r} for run {run_id} round {round} is below the "
                    f"cumulative epsilon already recorded ({spent:.6g}); epsilon must be "
                    "computed over the ledger's whole history (Ledger.history())"
                )
            if not within_budget(epsilon, budget):
                raise BudgetExceededError(epsilon_spent=spent, epsilon_after=epsilon,
                                          budget=budget)
            prev_hash = sha256_hex(data.split(b"\n")[-2]) if data else GENESIS_HASH
            entry = {
                "version": ENTRY_VERSION,
                "seq": len(report.entries),
                "hospital": self.hospital,
                "run_id": str(run_id),
                "round": int(round),
                "mechanism": {
                    "noise_multiplier": float(noise_multiplier),
                    "sample_rate": float(sample_rate),
                    "steps": int(steps),
                    "max_grad_norm": float(max_grad_norm),
                    "accountant": accountant,
                },
                "delta": float(target_delta),
                "epsilon": float(epsilon),
                "budget": float(budget),
                "timestamp": timestamp,
                "config_hash": config_hash,
                "dataset_fingerprint": dataset_fingerprint,
                "prev_hash": prev_hash,
                "key_id": signing.key_id(self._key),
                "policy_hash": str(policy_hash),
                "kind": kind,
                "details": dict(details or {}),
            }
            try:
                _check_schema({**entry, "signature": ""})
            except ValueError as err:
                raise LedgerError(f"invalid ledger entry for run {run_id} round {round}: "
                                  f"{err}") from None
            entry["signature"] = signing.sign(self._key, signed_payload(entry))
            line = canonical_bytes(entry)
            try:
                atomic_write(self.path, data + line + b"\n")
            except OSError as err:
                raise LedgerError(f"could not write ledger {self.path} ({err}); the previous "
                                  "ledger is intact and nothing was recorded") from err
            head_obj = {"entries": len(report.entries) + 1, "last_hash": sha256_hex(line),
                        "key_id": entry["key_id"], "hospital": self.hospital}
            head_obj["signature"] = signing.sign(self._key, signed_payload(head_obj))
            head_bytes = canonical_bytes(head_obj)
            try:
                atomic_write(self.head_path, head_bytes)
            except OSError as err:
                raise LedgerError(f"ledger {self.path} was written but its head {self.head_path} "
                                  f"could not be updated ({err}); the next append repairs "
                                  "it") from err
            new = LedgerEntry.from_dict(entry)
            # what was just signed and written needs no second verification
            key = (str(self.path.resolve()), signing.key_id(self._key))
            _VERIFIED[key] = (data + line + b"\n", head_bytes, LedgerReport(
                self.path, entries=[*report.entries, new], lines=report.lines + 1))
            if not report.entries:
                write_anchor(self, line)
            return new

    # ------------------------------------------------------------------ heads and reinit
    def signed_head(self) -> dict[str, Any]:
        """A freshly signed summary of the verified ledger, for the server to keep.

        ``{"entries", "last_hash", "epsilon", "key_id", "hospital", "reinit_seq",
        "public_key", "signature"}``: ``reinit_seq`` is the sequence number of the latest
        re-initialisation entry (-1: none); ``public_key`` the raw Ed25519 key (base64), so
        a server can notice a key change; the signature covers every other field.
        Raises :class:`LedgerError` when the ledger does not verify.
        """
        if self._key is None:
            raise LedgerError(f"ledger {self.path} was opened without a signing key")
        data, _ = self._read_bytes()
        entries = self.read()
        lines = data.split(b"\n")[:-1] if data else []
        reinits = [e.seq for e in entries if e.kind == "reinit"]
        head: dict[str, Any] = {
            "entries": len(entries),
            "last_hash": sha256_hex(lines[-1]) if lines else GENESIS_HASH,
            "epsilon": entries[-1].epsilon if entries else 0.0,
            "key_id": signing.key_id(self._key),
            "hospital": self.hospital,
            "reinit_seq": reinits[-1] if reinits else -1,
            "public_key": signing.raw_public_b64(self._key),
        }
        head["signature"] = signing.sign(self._key, signed_payload(head))
        return head

    def extends(self, head: dict[str, Any]) -> bool:
        """True when this ledger holds the entry ``head`` points to (it extends ``head``)."""
        try:
            count, last_hash = int(head["entries"]), str(head["last_hash"])
        except (KeyError, TypeError, ValueError):
            return False
        if count == 0:
            return True
        data, _ = self._read_bytes()
        lines = data.split(b"\n")[:-1] if data else []
        return len(lines) >= count and sha256_hex(lines[count - 1]) == last_hash

    def reinitialise(
        self,
        *,
        reason: str,
        previous_head: dict[str, Any] | None,
        policy_hash: str,
        accountant: str,
        target_delta: float,
        budget: float,
    ) -> LedgerEntry:
        """Start a fresh ledger with a signed ``reinit`` entry (the only way to train again
        after a server has seen an earlier ledger of this hospital).

        Parameters
        ----------
        reason : str
            Why the state was re-initialised (recorded; shown by ``fedrg audit``).
        previous_head : dict | None
            The last head of the old ledger, when known (e.g. the server's
            ``ledger_heads.json``); recorded as given.
        policy_hash : str
            Hash of the site policy in force.
        accountant, target_delta, budget
            Recorded with the entry (no steps, epsilon 0).

        Raises
        ------
        LedgerError
            When the ledger already holds entries, or ``reason`` is empty.
        """
        if not reason.strip():
            raise LedgerError("a re-initialisation needs a reason (--reason TEXT); it is "
                              "recorded in the ledger and shown by `fedrg audit`")
        details = {"reason": reason.strip(), "previous_head": previous_head,
                   "previous_anchor": read_anchor(self)}
        return self.append(run_id="reinit", round=0, noise_multiplier=0.0, sample_rate=1.0,
                           steps=0, max_grad_norm=1.0, accountant=accountant,
                           target_delta=target_delta, epsilon=0.0, budget=budget,
                           config_hash="", dataset_fingerprint="", policy_hash=policy_hash,
                           kind="reinit", details=details, require_empty=True)

    def reinit_entry(self) -> LedgerEntry | None:
        """The latest ``reinit`` entry (None when the ledger was never re-initialised)."""
        found = [e for e in self.read() if e.kind == "reinit"]
        return found[-1] if found else None


def head_extends(known: dict[str, Any], current: dict[str, Any]) -> tuple[bool, str]:
    """Does the head a hospital reports now (``current``) extend the one seen last (``known``)?

    Judged from the two signed heads alone (a server holds no ledger lines): the same key,
    at least as many entries, and the same last hash when the count is unchanged.

    Returns
    -------
    tuple[bool, str]
        ``(True, "")`` or ``(False, why)``.
    """
    try:
        k_entries, c_entries = int(known["entries"]), int(current["entries"])
        k_key, c_key = str(known["key_id"]), str(current["key_id"])
    except (KeyError, TypeError, ValueError):
        return False, "a ledger head is malformed"
    if k_key != c_key:
        return False, (f"the ledger is now signed by key {c_key}, the last head seen was "
                       f"signed by {k_key} ({k_entries} entries): state wiped or key replaced")
    if c_entries < k_entries:
        return False, (f"the ledger now holds {c_entries} entries, the last head seen had "
                       f"{k_entries}: entries were removed")
    if c_entries == k_entries and current.get("last_hash") != known.get("last_hash"):
        return False, "the ledger's last entry differs from the one in the last head seen"
    return True, ""


def verify_head(head: dict[str, Any], public_key: Ed25519PublicKey) -> bool:
    """True when ``head`` (from :meth:`Ledger.signed_head`) is signed by ``public_key``."""
    sig = head.get("signature")
    return isinstance(sig, str) and signing.verify(public_key, signed_payload(head), sig)


# --------------------------------------------------------------------------- anchor
#: Suffix of the anchor file written beside the signing key (``ledger_ed25519.pem.anchor``).
ANCHOR_SUFFIX = ".anchor"


def anchor_path(key_path: str | os.PathLike[str]) -> Path:
    """Where the anchor of the ledger signed by the key at ``key_path`` is kept."""
    key_path = Path(key_path)
    return key_path.with_name(key_path.name + ANCHOR_SUFFIX)


def write_anchor(ledger: Ledger, first_line: bytes) -> None:
    """Pin the ledger's first entry beside its signing key (a signed, tiny JSON file).

    Written when a ledger gets its first entry (and by a re-initialisation). A state
    directory wiped while the key lives elsewhere then no longer matches the anchor, and a
    wipe that takes the key too gives a key the federation roster does not list: either way
    the hospital notices by itself (:func:`anchor_problem`), without the server's help.
    """
    if ledger.key_path is None or ledger._key is None:
        return
    obj: dict[str, Any] = {"hospital": ledger.hospital, "key_id": signing.key_id(ledger._key),
                           "first_entry_hash": sha256_hex(first_line)}
    obj["signature"] = signing.sign(ledger._key, signed_payload(obj))
    try:
        atomic_write(anchor_path(ledger.key_path), canonical_bytes(obj), mode=0o600)
    except OSError as err:
        raise LedgerError(f"could not write the ledger anchor {anchor_path(ledger.key_path)} "
                          f"({err}); make the signing key's directory writable") from err


def read_anchor(ledger: Ledger) -> dict[str, Any] | None:
    """The anchor beside the ledger's signing key (None: there is none)."""
    if ledger.key_path is None:
        return None
    path = anchor_path(ledger.key_path)
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise LedgerError(f"ledger anchor {path} is unreadable ({err}); restore it from a "
                          "backup, or re-initialise with `fedrg site reinit`") from None
    return obj if isinstance(obj, dict) else {}


def anchor_problem(ledger: Ledger) -> str:
    """Why the state directory does not hold the ledger its key's anchor pins (``''``: it does).

    A ledger without an anchor (made before anchors existed) is anchored at its first entry
    now; an empty ledger without an anchor is a fresh one.
    """
    if ledger.key_path is None or ledger._key is None:
        return ""
    anchor = read_anchor(ledger)
    data, _ = ledger._read_bytes()
    lines = data.split(b"\n")[:-1] if data else []
    if anchor is None:
        if lines:
            ledger.read()  # only a ledger that verifies is pinned
            write_anchor(ledger, lines[0])
        return ""
    where = anchor_path(ledger.key_path)
    if not verify_head(anchor, ledger._key.public_key()):
        return (f"the ledger anchor {where} is not signed by this hospital's key: it was "
                "edited or belongs to another key")
    if not lines:
        return (f"the state directory {ledger.state_dir} holds no ledger, but the anchor beside "
                f"the signing key ({where}) pins one whose first entry is "
                f"{str(anchor.get('first_entry_hash'))[:12]}: the state directory was wiped, "
                "which would silently reset the lifetime privacy budget")
    if sha256_hex(lines[0]) != anchor.get("first_entry_hash"):
        return (f"the ledger in {ledger.state_dir} does not start with the entry its anchor "
                f"({where}) pins: it was replaced, which would silently reset the lifetime "
                "privacy budget")
    return ""
