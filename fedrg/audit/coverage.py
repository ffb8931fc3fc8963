"""What a hospital's DP guarantee covers, read from its ledger entries.

Training rounds, evaluation releases and the entries made *without* DP are counted apart;
each distinct mechanism is one row; and a privacy verdict says whether every use of the
data was differentially private (``dp``), only some of it (``partial``) or none of it
(``none``). The audit (:mod:`fedrg.audit.verify`) combines this with the tamper checks:
a ledger with any non-private entry is never reported as protected by DP.

An entry is *not private* when its accountant is ``none`` (a round trained without DP-SGD,
or an exact metric release, both allowed only by the site's own policy) or when it claims
an accountant but records steps with no noise at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedrg.privacy.ledger import LedgerEntry

#: privacy verdicts of :attr:`Coverage.privacy`
DP, PARTIAL, NONE, EMPTY = "dp", "partial", "none", "empty"


def entry_is_private(entry: LedgerEntry) -> bool:
    """True when ``entry`` is a DP mechanism: an accountant, and noise on every step.

    Re-initialisation entries (no steps) are neither; callers skip them.
    """
    return entry.private and (entry.noise_multiplier > 0.0 or entry.steps == 0)


@dataclass(frozen=True)
class Mechanism:
    """One distinct mechanism of a ledger and how often it was used.

    ``kind`` is ``train`` or ``evaluation``; ``entries`` counts rounds (train) or releases
    (evaluation); ``steps`` sums their steps (a release is one step).
    """

    kind: str
    accountant: str
    noise_multiplier: float
    sample_rate: float
    delta: float
    private: bool
    entries: int = 0
    steps: int = 0
    max_grad_norms: tuple[float, ...] = ()
    noise: str = "local"

    @property
    def label(self) -> str:
        """``DP-SGD``, ``DP-SGD, distributed noise``, ``train, no DP``, ``DP release`` or
        ``exact release``."""
        if self.kind == "train":
            if self.private and self.noise != "local":
                return f"DP-SGD, {self.noise} noise"
            return "DP-SGD" if self.private else "train, no DP"
        return "DP release" if self.private else "exact release"

    @property
    def unit(self) -> str:
        """What ``entries`` counts: ``round(s)`` or ``release(s)``."""
        return "round(s)" if self.kind == "train" else "release(s)"

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``fedrg audit --json``'s ``mechanisms`` list."""
        return {"kind": self.kind, "label": self.label, "private": self.private,
                "accountant": self.accountant, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta,
                "entries": self.entries, "steps": self.steps, "noise": self.noise,
                "max_grad_norm": sorted(set(self.max_grad_norms))}


@dataclass
class Coverage:
    """Training rounds, evaluation releases and non-private entries of one ledger, apart."""

    runs: int = 0
    dp_rounds: int = 0
    dp_steps: int = 0
    plain_rounds: int = 0
    plain_steps: int = 0
    dp_releases: int = 0
    exact_releases: int = 0
    mechanisms: list[Mechanism] = field(default_factory=list)
    not_private: list[str] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        """Training rounds, with or without DP (evaluation releases are not rounds)."""
        return self.dp_rounds + self.plain_rounds

    @property
    def steps(self) -> int:
        """Training steps, with or without DP (a release's one step is not counted)."""
        return self.dp_steps + self.plain_steps

    @property
    def releases(self) -> int:
        """Evaluation releases, DP or exact."""
        return self.dp_releases + self.exact_releases

    @property
    def privacy(self) -> str:
        """``dp`` (every entry DP), ``partial``, ``none`` (no DP entry) or ``empty``."""
        dp = self.dp_rounds + self.dp_releases
        plain = self.plain_rounds + self.exact_releases
        if not dp and not plain:
            return EMPTY
        if not plain:
            return DP
        return NONE if not dp else PARTIAL

    @property
    def has_dp(self) -> bool:
        """True when some entry is a DP mechanism (so an epsilon means something)."""
        return self.dp_rounds + self.dp_releases > 0

    def counts(self) -> str:
        """``3 DP-SGD rounds (27 steps), 3 exact releases (no DP), 1 run`` in words."""
        parts = []
        if self.dp_rounds:
            parts.append(f"{self.dp_rounds} DP-SGD round(s) ({self.dp_steps:,} steps)")
        if self.plain_rounds:
            parts.append(f"{self.plain_rounds} round(s) trained WITHOUT DP "
                         f"({self.plain_steps:,} steps)")
        if self.dp_releases:
            parts.append(f"{self.dp_releases} DP evaluation release(s)")
        if self.exact_releases:
            parts.append(f"{self.exact_releases} exact evaluation release(s) (no DP)")
        if not parts:
            return "no training or release recorded"
        return ", ".join(parts) + f", in {self.runs} run(s)"

    def to_json(self) -> dict[str, Any]:
        """The counts, the verdict, the mechanisms and what was not private."""
        return {"privacy": self.privacy, "rounds": self.rounds, "steps": self.steps,
                "dp_rounds": self.dp_rounds, "dp_steps": self.dp_steps,
                "non_private_rounds": self.plain_rounds,
                "non_private_steps": self.plain_steps,
                "evaluation_releases": self.releases, "dp_releases": self.dp_releases,
                "exact_releases": self.exact_releases,
                "mechanisms": [m.to_json() for m in self.mechanisms],
                "not_private": list(self.not_private)}


def _where(entries: Sequence[LedgerEntry]) -> str:
    """``run abc: rounds 1, 2, 3; run def: round 1``."""
    by_run: dict[str, list[int]] = {}
    for e in entries:
        by_run.setdefault(e.run_id, []).append(e.round)
    return "; ".join(
        f"run {run}: round{'s' if len(rounds) > 1 else ''} "
        + ", ".join(str(r) for r in rounds)
        for run, rounds in by_run.items())


def coverage_of(entries: Sequence[LedgerEntry]) -> Coverage:
    """Count ``entries`` by kind and privacy, one row per distinct mechanism.

    Parameters
    ----------
    entries
        A ledger's entries in order (re-initialisations are skipped).

    Returns
    -------
    Coverage
        Mechanisms keyed by (kind, accountant, noise_multiplier, sample_rate, delta) in the
        order first used; ``not_private`` names every non-private entry by run and round.
    """
    used = [e for e in entries if e.kind in ("train", "evaluation")]
    cov = Coverage(runs=len(dict.fromkeys(e.run_id for e in used)))
    rows: dict[tuple[str, str, float, float, float, str], Mechanism] = {}
    plain_train: list[LedgerEntry] = []
    exact: list[LedgerEntry] = []
    noiseless: list[LedgerEntry] = []
    for e in used:
        private = entry_is_private(e)
        if e.kind == "train":
            if private:
                cov.dp_rounds, cov.dp_steps = cov.dp_rounds + 1, cov.dp_steps + e.steps
            else:
                cov.plain_rounds, cov.plain_steps = cov.plain_rounds + 1, cov.plain_steps + e.steps
        elif private:
            cov.dp_releases += 1
        else:
            cov.exact_releases += 1
        if not private:
            (noiseless if e.private else plain_train if e.kind == "train" else exact).append(e)
        noise = str(e.details.get("noise", "local"))
        key = (e.kind, e.accountant, e.noise_multiplier, e.sample_rate, e.delta)
        m = rows.get((*key, noise)) or Mechanism(*key, private=private, noise=noise)
        rows[(*key, noise)] = Mechanism(*key, private=private, entries=m.entries + 1,
                                        steps=m.steps + e.steps, noise=noise,
                                        max_grad_norms=(*m.max_grad_norms, e.max_grad_norm))
    cov.mechanisms = list(rows.values())
    if plain_train:
        cov.not_private.append(
            f"{len(plain_train)} training round(s) WITHOUT DP-SGD "
            f"({sum(e.steps for e in plain_train):,} steps; {_where(plain_train)})")
    if exact:
        cov.not_private.append(f"{len(exact)} exact evaluation release(s) WITHOUT DP "
                               f"(metrics without noise; {_where(exact)})")
    if noiseless:
        cov.not_private.append(
            f"{len(noiseless)} entr(ies) recorded with a DP accountant but noise multiplier 0 "
            f"({_where(noiseless)})")
    return cov


def format_epsilon(value: float | None, *, has_dp: bool, digits: int = 3,
                   empty: str = "-") -> str:
    """An epsilon for people: ``no DP`` when nothing was DP, never ``0.000``.

    ``inf`` prints as ``inf``; ``None`` as ``empty``.
    """
    if not has_dp:
        return "no DP"
    if value is None:
        return empty
    return f"{value:.{digits}f}" if math.isfinite(value) else "inf"
