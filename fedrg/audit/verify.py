"""Independent audit of privacy ledgers.

For every ledger found under a path, :func:`audit_path` verifies the canonical form, hash
chain and Ed25519 signatures against the hospital's public key, recomputes the cumulative
epsilon from the recorded mechanism parameters with Google's ``dp_accounting`` (not the
training code's Opacus accountants), checks the budget, and says what the DP guarantee
covers (:mod:`fedrg.audit.coverage`): a verified ledger is ``OK`` only when every entry is
DP, else ``PARTIAL`` or ``NOT PRIVATE`` (:data:`EXIT_NOT_PRIVATE`), apart from the
verification failures (:data:`EXIT_FAILED`).

Verdict rule (:func:`check_epsilons`): a recorded epsilon is a *claim* that the mechanism
is (epsilon, delta)-DP. The claim holds when any sound accountant proves it; the tightest
one here is dp_accounting's PLD accountant (pessimistic discretisation, an upper bound on
the true privacy curve). So an entry is flagged only when its recorded epsilon lies below
what PLD proves (by more than ``rel_tol``, 1 % by default): an *understatement*. An entry
that records more than PLD (RDP records a looser, still valid bound) is not a fault: how
loose the two accountants are differs with lifetime epsilon and run count, and a verdict
must not flip with them. dp_accounting's RDP figures are shown beside it for information,
and serve as a cheap first screen: a recorded value at or above the RDP bound is proven
without running PLD for that entry. The same proven value (``min(RDP, PLD)``) is checked
against each entry's budget.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedrg import signing
from fedrg.audit.coverage import (
    DP,
    EMPTY,
    NONE,
    PARTIAL,
    Coverage,
    coverage_of,
    entry_is_private,
    format_epsilon,
)
from fedrg.errors import LedgerError
from fedrg.policy import SitePolicy
from fedrg.privacy.ledger import LEDGER_NAME, LedgerEntry, LedgerReport, verify_ledger

# dp_accounting logs convergence notes for large sample rates on every call; the
# recomputed value is unaffected (those RDP orders are skipped), so keep the report readable.
logging.getLogger("absl").setLevel(logging.ERROR)

# The RDP orders the training code searches (fedrg.privacy.accounting.RDP_ALPHAS: Opacus's
# defaults extended to 1024), written out so the audit needs nothing from the training stack.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
    + [72.0, 80.0, 96.0, 112.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0]
)
PLD_DISCRETIZATION = 1e-3
DEFAULT_REL_TOL = 0.01
# Relative slack when comparing an independently recomputed epsilon with the budget.
BUDGET_REL_TOL = 1e-3


# --------------------------------------------------------------------------- accountants

def _event(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    import dp_accounting

    inner = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        inner = dp_accounting.PoissonSampledDpEvent(sample_rate, inner)
    return dp_accounting.SelfComposedDpEvent(inner, steps)


def _one_step_rdp(noise_multiplier: float, sample_rate: float) -> Any:
    """RDP vector (over RDP_ORDERS) of one step, via dp_accounting; None if unavailable."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    acc = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    acc.compose(_event(noise_multiplier, sample_rate, 1))
    vec = getattr(acc, "_rdp", None)  # dp_accounting keeps the RDP curve here
    return None if vec is None else vec.copy()


def rdp_epsilons(entries: Sequence[LedgerEntry]) -> list[float]:
    """Cumulative epsilon after each entry (at that entry's delta), dp_accounting RDP.

    Parameters
    ----------
    entries
        Ledger entries in order; each contributes its (noise_multiplier, sample_rate, steps).

    Returns
    -------
    list[float]
        One epsilon per entry (``inf`` once any step had no noise).

    Notes
    -----
    RDP composes additively, so the one-step RDP curve of each distinct mechanism is
    computed once with dp_accounting and scaled by the step count; the curve is turned
    into epsilon with dp_accounting's ``compute_epsilon``. If the installed dp_accounting
    does not expose the curve, every entry is composed through its public API instead.
    """
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    entries = list(entries)
    active = [e for e in entries if e.steps > 0 and e.noise_multiplier > 0.0 and e.private]
    computed = {key: _one_step_rdp(*key)
                for key in dict.fromkeys((e.noise_multiplier, e.sample_rate) for e in active)}
    curves = {key: c for key, c in computed.items() if c is not None}
    fast = len(curves) == len(computed)
    total: Any = 0.0
    slow = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    out: list[float] = []
    noiseless = composed = False
    for e in entries:
        if e.steps > 0 and e.private:  # non-private rounds are reported apart, not composed
            if e.noise_multiplier == 0.0:
                noiseless = True
            elif fast:
                total = total + e.steps * curves[(e.noise_multiplier, e.sample_rate)]
                composed = True
            else:
                slow.compose(_event(e.noise_multiplier, e.sample_rate, e.steps))
                composed = True
        if noiseless:
            out.append(math.inf)
        elif not composed:
            out.append(0.0)
        elif fast:
            out.append(float(rdp.compute_epsilon(list(RDP_ORDERS), total, e.delta)[0]))
        else:
            out.append(float(slow.get_epsilon(e.delta)))
    return out


def pld_epsilon(
    segments: Sequence[tuple[float, float, int]], *, target_delta: float
) -> float:
    """Epsilon of all ``segments`` (noise_multiplier, sample_rate, steps) with the PLD accountant.

    Identical (noise_multiplier, sample_rate) pairs are merged (composition commutes).
    """
    from dp_accounting.pld import pld_privacy_accountant as pld

    merged: dict[tuple[float, float], int] = {}
    for s, q, n in segments:
        if n > 0:
            if s == 0.0:
                return math.inf
            merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(n)
    if not merged:
        return 0.0
    acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for (s, q), n in merged.items():
        acc.compose(_event(s, q, n))
    return float(acc.get_epsilon(target_delta))


def relative_gap(recorded: float, recomputed: float) -> float:
    """|recorded - recomputed| / recomputed (0 when both are 0, inf when only one is)."""
    if recorded == recomputed:
        return 0.0
    if recomputed == 0.0 or not math.isfinite(recomputed) or not math.isfinite(recorded):
        return math.inf
    return abs(recorded - recomputed) / abs(recomputed)


# --------------------------------------------------------------------------- discovery

@dataclass(frozen=True)
class LedgerLocation:
    """A ledger file, the public key to verify it with, and a name hint for its hospital."""

    ledger: Path
    public_key: Path | None
    hospital_hint: str


def _hospital_hint(ledger: Path) -> str:
    parent = ledger.parent
    if ledger.name != LEDGER_NAME:
        return ledger.stem
    if parent.name in ("state", "ledger", "ledgers") and parent.parent.name:
        return parent.parent.name
    return parent.name or ledger.stem


def _key_for(ledger: Path) -> Path | None:
    for cand in (
        ledger.parent / signing.PUBLIC_KEY_NAME,
        ledger.with_suffix(".pub"),
        ledger.parent / f"{ledger.stem}_ed25519.pub",
    ):
        if cand.is_file():
            return cand
    return None


def find_ledgers(
    path: str | os.PathLike[str], *, public_key: str | os.PathLike[str] | None = None
) -> list[LedgerLocation]:
    """Find ledgers under ``path`` (a ledger file, a state directory or a run directory).

    Directories are searched recursively for ``ledger.jsonl`` and for ``*.jsonl`` inside
    folders named ``ledgers``. The public key is ``public_key`` when given, else the
    ``ledger_ed25519.pub`` next to each ledger (or ``<ledger stem>.pub``).
    """
    root = Path(path)
    if not root.exists():
        raise LedgerError(f"audit path {root} does not exist; pass a run directory, a "
                          "hospital state directory or a ledger.jsonl file")
    if root.is_file():
        found = [root]
    else:
        candidates = set(root.rglob(LEDGER_NAME))
        for folder in [p for p in root.rglob("ledgers") if p.is_dir()]:
            candidates.update(folder.rglob("*.jsonl"))
        if root.name == "ledgers":
            candidates.update(root.rglob("*.jsonl"))
        found = sorted(p for p in candidates if p.is_file())
    key = Path(public_key) if public_key is not None else None
    return [LedgerLocation(p, key if key is not None else _key_for(p), _hospital_hint(p))
            for p in found]


# --------------------------------------------------------------------------- audit

#: ``fedrg audit``'s exit codes: every hospital ``OK``; a verification failure (tampered,
#: unverified, mismatch, over budget, outside policy, not extending, nothing found); all
#: verified but some entry not differentially private (``PARTIAL`` or ``NOT PRIVATE``).
EXIT_OK, EXIT_FAILED, EXIT_NOT_PRIVATE = 0, 1, 3
#: statuses of a verified ledger, by what its DP guarantee covers
PRIVACY_STATUS = {DP: "OK", EMPTY: "OK", PARTIAL: "PARTIAL", NONE: "NOT PRIVATE"}


@dataclass
class EntryAudit:
    """One ledger entry with its recomputed epsilon (for tables and plots)."""

    seq: int
    run_id: str
    round: int
    steps: int
    epsilon_recorded: float
    epsilon_recomputed_rdp: float
    budget: float
    accountant: str
    epsilon_recomputed_pld: float | None = None
    kind: str = "train"
    private: bool = True


@dataclass
class HospitalAudit:
    """Audit result for one hospital's ledger."""

    hospital: str
    ledger: Path
    public_key: Path | None
    verified: bool = False
    agrees: bool = True
    within_budget: bool = True
    runs: int = 0
    rounds: int = 0
    steps: int = 0
    noise_multipliers: list[float] = field(default_factory=list)
    sample_rates: list[float] = field(default_factory=list)
    max_grad_norms: list[float] = field(default_factory=list)
    deltas: list[float] = field(default_factory=list)
    accountants: list[str] = field(default_factory=list)
    dataset_fingerprints: list[str] = field(default_factory=list)
    epsilon_recorded: float = 0.0
    epsilon_recomputed: float = 0.0
    epsilon_recomputed_rdp: float = 0.0
    epsilon_recomputed_pld: float = 0.0
    recompute_method: str = "dp_accounting PLD"
    budget: float | None = None
    entries: list[EntryAudit] = field(default_factory=list)
    codes: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    key_source: str = "file next to the ledger"
    untrusted_key: bool = False
    extends_head: bool = True
    within_policy: bool | None = None
    policy_hash: str | None = None
    reinits: list[str] = field(default_factory=list)
    evaluation_releases: int = 0
    coverage: Coverage = field(default_factory=Coverage)

    @property
    def integrity_ok(self) -> bool:
        """True when the ledger verified, the recomputation agreed and the budget held
        (whether or not every entry was differentially private)."""
        return (self.verified and self.agrees and self.within_budget and not self.problems
                and not self.untrusted_key)

    @property
    def privacy(self) -> str:
        """``dp``, ``partial``, ``none`` or ``empty`` (:class:`Coverage`)."""
        return self.coverage.privacy

    @property
    def ok(self) -> bool:
        """True only when the ledger verified and every entry in it is differentially
        private (status ``OK``)."""
        return self.integrity_ok and self.privacy in (DP, EMPTY)

    @property
    def has_dp(self) -> bool:
        """True when some entry is a DP mechanism: only then does an epsilon mean anything."""
        return self.coverage.has_dp

    def eps(self, value: float | None, digits: int = 3) -> str:
        """``value`` for people: ``no DP`` for a hospital without any DP entry, never 0."""
        return format_epsilon(value, has_dp=self.has_dp or self.privacy == EMPTY,
                              digits=digits)

    @property
    def status(self) -> str:
        """One word (or two) for the table: a verification failure first, else what the
        DP guarantee covers (``OK``, ``PARTIAL``, ``NOT PRIVATE``)."""
        if self.integrity_ok:
            return PRIVACY_STATUS[self.privacy]
        if self.untrusted_key or (not self.verified and "foreign_key" in self.codes
                                  and self.key_source == "registry"):
            return "UNVERIFIED"
        if not self.extends_head:
            return "NOT EXTENDING"
        if not self.verified:
            if self.public_key is None or self.codes <= {"head_missing", "missing"}:
                return "UNVERIFIED"
            return "TAMPERED"
        if not self.within_budget:
            return "OVER BUDGET"
        if self.within_policy is False:
            return "OUTSIDE POLICY"
        return "MISMATCH"

    @property
    def verdict(self) -> str:
        """The status in full: what was verified and what the DP guarantee covers."""
        cov = self.coverage
        status = self.status
        if not self.integrity_ok:
            text = f"{status}: the audit FAILED (see the problems listed)"
            if cov.not_private:
                text += "; besides, NOT differentially private: " + "; ".join(cov.not_private)
            return text
        if self.privacy == EMPTY:
            return f"{status}: nothing recorded in this ledger"
        if self.privacy == DP:
            return (f"{status}: every entry is differentially private ({cov.counts()}); "
                    f"epsilon {self.eps(self.epsilon_recorded)} recorded")
        not_private = "; ".join(cov.not_private)
        if self.privacy == NONE:
            return (f"{status}: no entry is differentially private: {not_private}; no DP "
                    "guarantee covers this hospital's patients and there is no epsilon")
        dp = ", ".join(p for p in (
            f"{cov.dp_rounds} DP-SGD round(s)" if cov.dp_rounds else "",
            f"{cov.dp_releases} DP release(s)" if cov.dp_releases else "") if p)
        return (f"{status}: NOT everything is differentially private: {not_private}. No DP "
                f"guarantee covers these; the epsilon {self.eps(self.epsilon_recorded)} covers "
                f"only the DP entries ({dp})")

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``fedrg audit --json`` prints for this hospital."""

        def num(x: float | None) -> float | None:
            return x if x is None or math.isfinite(x) else None

        def eps(x: float | None) -> float | None:  # no DP entry: no epsilon (null), never 0
            return num(x) if self.has_dp or self.privacy == EMPTY else None

        return {
            "hospital": self.hospital,
            "epsilon_recorded": eps(self.epsilon_recorded),
            "epsilon_recomputed": eps(self.epsilon_recomputed),
            "budget": self.budget,
            "verified": self.verified,
            "agrees": self.agrees,
            "within_budget": self.within_budget,
            "ok": self.ok,
            "integrity_ok": self.integrity_ok,
            "status": self.status,
            "verdict": self.verdict,
            "epsilon_recomputed_rdp": eps(self.epsilon_recomputed_rdp),
            "epsilon_recomputed_pld": eps(self.epsilon_recomputed_pld),
            "recompute_method": self.recompute_method,
            "runs": self.runs,
            **self.coverage.to_json(),
            "noise_multiplier": sorted(set(self.noise_multipliers)),
            "sample_rate": sorted(set(self.sample_rates)),
            "max_grad_norm": sorted(set(self.max_grad_norms)),
            "delta": sorted(set(self.deltas)),
            "accountant": sorted(set(self.accountants)),
            "dataset_fingerprints": sorted(set(self.dataset_fingerprints)),
            "ledger": str(self.ledger),
            "public_key": str(self.public_key) if self.public_key else None,
            "key_source": self.key_source,
            "extends_last_head": self.extends_head,
            "within_policy": self.within_policy,
            "policy_hash": self.policy_hash,
            "reinits": list(self.reinits),
            "problem_codes": sorted(self.codes),
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "entries": [
                {
                    "seq": e.seq, "run_id": e.run_id, "round": e.round, "kind": e.kind,
                    "private": e.private, "steps": e.steps,
                    "epsilon_recorded": e.epsilon_recorded,
                    "epsilon_recomputed_rdp": num(e.epsilon_recomputed_rdp),
                    "epsilon_recomputed_pld": (None if e.epsilon_recomputed_pld is None
                                               else num(e.epsilon_recomputed_pld)),
                    "budget": e.budget, "accountant": e.accountant,
                }
                for e in self.entries
            ],
        }


@dataclass
class AuditResult:
    """Audit of every ledger under a path."""

    path: Path
    hospitals: list[HospitalAudit]

    @property
    def ok(self) -> bool:
        """True when every hospital is ``OK``: verified and every entry DP (and at least
        one ledger was found)."""
        return bool(self.hospitals) and all(h.ok for h in self.hospitals)

    @property
    def integrity_ok(self) -> bool:
        """True when every ledger verified (DP or not) and at least one was found."""
        return bool(self.hospitals) and all(h.integrity_ok for h in self.hospitals)

    @property
    def status(self) -> str:
        """``OK``, ``PARTIAL`` (some data used without DP), ``NOT PRIVATE`` (no DP at any
        hospital) or ``FAILED`` (a verification failure; it takes precedence)."""
        if not self.integrity_ok:
            return "FAILED"
        kinds = {h.privacy for h in self.hospitals}
        if kinds <= {DP, EMPTY}:
            return "OK"
        return "NOT PRIVATE" if kinds <= {NONE, EMPTY} else "PARTIAL"

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_OK`, :data:`EXIT_FAILED` or :data:`EXIT_NOT_PRIVATE`."""
        status = self.status
        return EXIT_OK if status == "OK" else EXIT_FAILED if status == "FAILED" \
            else EXIT_NOT_PRIVATE

    def to_json(self) -> dict[str, Any]:
        """``{"ok": bool, "status": str, "integrity_ok": bool, "hospitals": [...]}``."""
        return {"ok": self.ok, "status": self.status, "integrity_ok": self.integrity_ok,
                "hospitals": [h.to_json() for h in self.hospitals]}


def audit_ledger(
    location: LedgerLocation,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
    policy: SitePolicy | None = None,
    registry: dict[str, Ed25519PublicKey] | None = None,
    heads: dict[str, dict[str, Any]] | None = None,
) -> HospitalAudit:
    """Verify one ledger, recompute its epsilon independently and check its budget.

    Parameters
    ----------
    location : LedgerLocation
        The ledger and the key file found next to it.
    rel_tol : float
        Agreement tolerance of recorded and recomputed epsilon.
    policy : SitePolicy | None
        Check every entry against this site policy (``--policy``).
    registry : dict | None
        Hospital -> public key supplied by the auditor (``--keys``); when given, the key
        next to the ledger is ignored and a ledger signed by another key is UNVERIFIED.
    heads : dict | None
        Hospital -> the last signed ledger head a server saw (``ledger_heads.json``); a
        ledger that does not extend it is reported.
    """
    result = HospitalAudit(hospital=location.hospital_hint, ledger=location.ledger,
                           public_key=location.public_key)
    if registry is not None:
        pre = _parse_unverified(location.ledger)
        name = pre.entries[-1].hospital if pre.entries else location.hospital_hint
        result.hospital = name
        result.key_source = "registry"
        key = registry.get(name)
        if key is None:
            result.untrusted_key = True
            result.problems.append(f"hospital {name!r} is not in the key registry: its ledger "
                                   "cannot be verified against a key the auditor trusts")
            report = pre
        else:
            report = verify_ledger(location.ledger, key)
            result.verified = report.ok
            result.codes = set(report.codes)
            result.problems.extend(str(p) for p in report.problems)
            if "foreign_key" in result.codes:
                result.untrusted_key = True
                result.problems.insert(0, f"the ledger is not signed by the key the registry "
                                       f"holds for {name!r} (key id {signing.key_id(key)})")
    elif location.public_key is None:
        result.problems.append(
            f"no public key found next to {location.ledger} "
            f"(expected {location.ledger.parent / signing.PUBLIC_KEY_NAME}); pass "
            "--public-key FILE with the hospital's ledger_ed25519.pub"
        )
        report = _parse_unverified(location.ledger)
    else:
        try:
            report = verify_ledger(location.ledger, location.public_key)
            result.verified = report.ok
            result.codes = set(report.codes)
            result.problems.extend(str(p) for p in report.problems)
        except LedgerError as err:  # unreadable public key
            result.problems.append(str(err))
            report = _parse_unverified(location.ledger)
    if registry is None:
        result.key_source = ("--public-key" if location.public_key is not None
                             and location.public_key.name != signing.PUBLIC_KEY_NAME
                             else "file next to the ledger")
        if location.public_key is not None:
            result.warnings.append(
                "verified against the public key found next to the ledger, which whoever "
                "wrote the ledger also wrote; pass --keys REGISTRY with the keys you trust")
    result.warnings.extend(report.warnings)
    entries = report.entries
    _check_reinit_and_heads(result, location.ledger, entries, heads, registry)
    if policy is not None and entries:
        _check_policy(result, entries, policy)
    elif entries and any(e.version < 2 for e in entries):
        result.warnings.append(
            f"{sum(e.version < 2 for e in entries)} entries predate site policies (ledger "
            "version 1): no policy hash is bound into them")
    result.coverage = coverage_of(entries)
    result.evaluation_releases = result.coverage.releases
    if not entries:
        if report.lines == 0 and not result.problems:
            result.warnings.append("the ledger is empty: no training has been recorded")
        return result
    result.hospital = entries[-1].hospital or result.hospital
    result.runs = result.coverage.runs
    result.rounds = result.coverage.rounds  # training rounds: releases are counted apart
    result.steps = result.coverage.steps
    result.noise_multipliers = [e.noise_multiplier for e in entries]
    result.sample_rates = [e.sample_rate for e in entries]
    result.max_grad_norms = [e.max_grad_norm for e in entries]
    result.deltas = [e.delta for e in entries]
    result.accountants = [e.accountant for e in entries]
    result.dataset_fingerprints = [e.dataset_fingerprint for e in entries]
    last = entries[-1]
    result.epsilon_recorded = last.epsilon
    result.budget = last.budget

    check_epsilons(result, entries, rel_tol=rel_tol)
    from fedrg.audit.noise import distributed_noise_problems, is_distributed

    result.problems.extend(distributed_noise_problems(entries))
    distributed = [e for e in entries if is_distributed(e)]
    if distributed:
        # (an invalid assumption is one of distributed_noise_problems; it is not listed here)
        peers = sorted({h for h in (e.details.get("honest_peers") for e in distributed)
                        if isinstance(h, int) and not isinstance(h, bool)})
        result.warnings.append(
            f"{len(distributed)} round(s) with distributed noise: their epsilon holds when at "
            f"least {peers} other hospital(s) of each secure sum added their noise share "
            "honestly (the hospital's own assumption, recorded in each entry)")
    if len(set(result.dataset_fingerprints)) > 1:
        result.warnings.append(
            f"{len(set(result.dataset_fingerprints))} dataset fingerprints: the cohort changed "
            "between runs; epsilon is accumulated over all of them (conservative)"
        )
    if len(set(result.deltas)) > 1:
        result.warnings.append("delta changed between entries; each cumulative epsilon is "
                               "at its own entry's delta")
    return result


def _check_policy(result: HospitalAudit, entries: list[LedgerEntry], policy: SitePolicy) -> None:
    from fedrg.audit.policy_check import check_entries

    def run_eps(run: Sequence[LedgerEntry]) -> float:
        return rdp_epsilons(list(run))[-1] if run else 0.0

    problems, warnings = check_entries(entries, policy, run_epsilon=run_eps)
    result.policy_hash = policy.policy_hash()
    result.within_policy = not problems
    result.problems.extend(problems)
    result.warnings.extend(warnings)


def _check_reinit_and_heads(
    result: HospitalAudit, ledger: Path, entries: list[LedgerEntry],
    heads: dict[str, dict[str, Any]] | None, registry: dict[str, Ed25519PublicKey] | None,
) -> None:
    """Show re-initialisations; report a ledger that does not extend the last head seen."""
    from fedrg.privacy.ledger import GENESIS_HASH, sha256_hex, verify_head

    for e in entries:
        if e.kind != "reinit":
            continue
        prev = e.details.get("previous_head") or {}
        named = (f"previous ledger: {prev.get('entries')} entries, key {prev.get('key_id')}, "
                 f"epsilon {prev.get('epsilon')}" if prev else "previous ledger head unknown")
        result.reinits.append(f"seq {e.seq} at {e.timestamp}: {e.details.get('reason', '')} "
                              f"({named})")
        result.warnings.append(f"re-initialised (entry {e.seq}, {e.timestamp}): "
                               f"{e.details.get('reason', '')}; {named}; the lifetime budget "
                               "restarted here")
    if not heads:
        return
    name = entries[-1].hospital if entries else result.hospital
    head = heads.get(name)
    if head is None:
        return
    try:
        data = ledger.read_bytes()
    except OSError:
        return
    lines = data.split(b"\n")[:-1] if data else []
    key = registry.get(name) if registry is not None else None
    if key is None and result.public_key is not None:
        try:
            key = signing.load_public_key(result.public_key)
        except LedgerError:
            key = None
    kid = signing.key_id(key) if key is not None else None
    count = int(head.get("entries", 0) or 0)
    same_key = key is not None and head.get("key_id") == kid and verify_head(head, key)
    extends = same_key and len(lines) >= count and (
        (sha256_hex(lines[count - 1]) if count else GENESIS_HASH) == head.get("last_hash"))
    if extends:
        return
    why = (f"the server last saw {count} entries (key {head.get('key_id')}, epsilon "
           f"{head.get('epsilon')}); this ledger holds {len(lines)} entries"
           + ("" if same_key else f" under key {kid}"))
    if result.reinits:
        result.warnings.append(f"does not extend the last head the server saw, after an "
                               f"explicit re-initialisation: {why}")
    else:
        result.extends_head = False
        result.problems.append(f"the ledger does not extend the last head the server saw and "
                               f"holds no re-initialisation: {why}; the state was wiped or "
                               "entries removed, and the lifetime budget silently restarted")


# --------------------------------------------------------------------------- verdict

def proven_epsilons(
    entries: Sequence[LedgerEntry], rdp: Sequence[float], *, rel_tol: float
) -> list[float | None]:
    """PLD epsilon after each entry where the cheap RDP screen cannot settle the verdict.

    Parameters
    ----------
    entries
        Ledger entries in order.
    rdp
        :func:`rdp_epsilons` of ``entries``.
    rel_tol
        Relative slack of the understatement test.

    Returns
    -------
    list[float | None]
        PLD epsilon (at the entry's delta, over the history up to it) for the last entry and
        for every entry whose recorded epsilon lies below ``(1 - rel_tol)`` times its RDP
        bound, or whose RDP bound passes its budget; ``None`` elsewhere (not needed).
    """
    out: list[float | None] = []
    last = len(entries) - 1
    for i, (e, r) in enumerate(zip(entries, rdp, strict=True)):
        needed = (i == last or e.epsilon < r * (1 - rel_tol)
                  or r > e.budget * (1 + BUDGET_REL_TOL))
        out.append(pld_epsilon([x.segment for x in entries[: i + 1] if x.private],
                               target_delta=e.delta) if needed else None)
    return out


def check_epsilons(
    result: HospitalAudit, entries: Sequence[LedgerEntry], *, rel_tol: float = DEFAULT_REL_TOL
) -> None:
    """Recompute every entry's epsilon and decide agreement and budget on ``result``.

    An entry fails agreement only when its recorded epsilon is an understatement: below
    ``(1 - rel_tol)`` times the smallest epsilon a sound accountant proves for it
    (``min(RDP, PLD)``, in practice PLD). It fails the budget when its recorded epsilon, or
    that proven epsilon, passes the entry's budget. Sets ``epsilon_recomputed`` (PLD, last
    entry), ``epsilon_recomputed_rdp``, ``epsilon_recomputed_pld`` and ``entries``; appends
    one problem line per failing entry.
    """
    rdp = rdp_epsilons(entries)
    pld = proven_epsilons(entries, rdp, rel_tol=rel_tol)
    last_pld = pld[-1]
    assert last_pld is not None
    result.epsilon_recomputed_rdp, result.epsilon_recomputed_pld = rdp[-1], last_pld
    result.epsilon_recomputed, result.recompute_method = last_pld, "dp_accounting PLD"
    result.entries = [
        EntryAudit(e.seq, e.run_id, e.round, e.steps, e.epsilon, r, e.budget, e.accountant, p,
                   kind=e.kind, private=entry_is_private(e))
        for e, r, p in zip(entries, rdp, pld, strict=True)
    ]
    for e, r, p in zip(entries, rdp, pld, strict=True):
        proven = r if p is None else min(r, p)
        where = f"entry {e.seq} (run {e.run_id}, round {e.round})"
        if e.epsilon < proven * (1 - rel_tol):
            result.agrees = False
            result.problems.append(
                f"{where}: recorded epsilon {e.epsilon:.4f} ({e.accountant}) understates the "
                f"privacy loss: dp_accounting PLD proves only epsilon <= {proven:.4f} "
                f"({relative_gap(e.epsilon, proven):.1%} below it, tolerance {rel_tol:.0%}; "
                f"RDP gives {r:.4f})"
            )
        if e.epsilon > e.budget * (1 + 1e-12):
            result.within_budget = False  # verify_ledger words this one
        if proven > e.budget * (1 + BUDGET_REL_TOL):
            result.within_budget = False
            result.problems.append(
                f"{where}: recomputed epsilon {proven:.4f} passes the budget {e.budget:.4f}"
            )
    if any(e.accountant == "gdp" for e in entries):
        result.warnings.append("recorded with the gdp accountant (an approximation); checked "
                               "only that it does not under-state the PLD epsilon")


def _parse_unverified(path: Path) -> LedgerReport:
    """Parse entries without a key (signatures unchecked) so numbers can still be shown."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedrg.privacy.ledger import verify_ledger_bytes

    try:
        data = path.read_bytes()
    except OSError as err:
        report = LedgerReport(path=path)
        report.add("missing", f"cannot read ledger {path}: {err.strerror}")
        return report
    throwaway = Ed25519PrivateKey.generate().public_key()
    return verify_ledger_bytes(data, throwaway, path=path, check_head=False)


HEADS_NAME = "ledger_heads.json"


def find_heads(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The last ledger heads servers saw, from every ``ledger_heads.json`` under ``path``."""
    import json

    root = Path(path)
    files = [root] if root.is_file() and root.name == HEADS_NAME else (
        sorted(root.rglob(HEADS_NAME)) if root.is_dir() else [])
    heads: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            obj = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(obj, dict):
            obj = obj.get("heads", obj)
            heads.update({str(k): v for k, v in obj.items()
                          if isinstance(v, dict) and "entries" in v})
    return heads


def audit_path(
    path: str | os.PathLike[str],
    *,
    public_key: str | os.PathLike[str] | None = None,
    rel_tol: float = DEFAULT_REL_TOL,
    policy: SitePolicy | None = None,
    keys: str | os.PathLike[str] | None = None,
    heads: str | os.PathLike[str] | None = None,
) -> AuditResult:
    """Audit every ledger under ``path`` (run directory, state directory or ledger file).

    Parameters
    ----------
    path : path-like
        Run directory, hospital state directory or ledger file.
    public_key : path-like, optional
        One key for every ledger (instead of the file next to each).
    rel_tol : float
        Agreement tolerance.
    policy : SitePolicy, optional
        Check each entry against this site policy.
    keys : path-like, optional
        The auditor's key registry (hospital -> key); overrides ``public_key``.
    heads : path-like, optional
        A ``ledger_heads.json`` (or a folder holding one); by default any found under
        ``path`` is used.

    Raises
    ------
    LedgerError
        When ``path`` does not exist or holds no ledger, or the registry is unusable.
    """
    from fedrg.audit.key_registry import load_key_registry

    registry = load_key_registry(keys) if keys is not None else None
    known_heads = find_heads(heads if heads is not None else path)
    locations = find_ledgers(path, public_key=public_key)
    audits = [audit_ledger(loc, rel_tol=rel_tol, policy=policy, registry=registry,
                           heads=known_heads) for loc in locations]
    audited = {h.hospital for h in audits}
    for site, head in sorted(known_heads.items()):
        if site not in audited and int(head.get("entries", 0) or 0) > 0:
            missing = HospitalAudit(hospital=site, ledger=Path(path), public_key=None,
                                    extends_head=False)
            missing.problems.append(
                f"the server last saw a ledger of {head.get('entries')} entries (key "
                f"{head.get('key_id')}, epsilon {head.get('epsilon')}) for {site!r}, and no "
                "ledger of it is here: its state was wiped or not handed over")
            audits.append(missing)
    if not audits:
        raise LedgerError(
            f"no privacy ledger ({LEDGER_NAME}) found under {path}; point `fedrg audit` at a "
            "run directory, a hospital state directory or a ledger file"
        )
    return AuditResult(Path(path), audits)
