"""Empirical privacy audit with one training run (Steinke, Nasr and Jagielski, 2023,
"Privacy auditing with one (1) training run", arXiv:2305.08846).

Protocol (the training side is wired elsewhere; this module is the pure statistics):

1. Pick ``m`` canary records. Include each in the training set independently with
   probability 1/2 (:func:`draw_inclusion`), train once.
2. Score every canary (higher = "looks like it was trained on", e.g. the drop in its loss
   from the initial to the final model).
3. Guess "included" for the ``k_pos`` highest scores and "excluded" for the ``k_neg``
   lowest, abstain on the rest (:func:`guesses_from_scores`); ``k_pos`` and ``k_neg`` must
   be fixed before looking at the scores.
4. With ``r`` guesses of which ``v`` are correct, :func:`epsilon_lower_bound` returns the
   largest epsilon that (epsilon, delta)-DP can be rejected at confidence ``1 - beta``:
   a training algorithm that is truly (epsilon, delta)-DP produces a bound above its
   epsilon with probability at most ``beta``.

For pure epsilon-DP each correct guess behaves like a coin with heads probability at most
``e^eps / (1 + e^eps)``, so ``P[v correct or more] <= P[Binomial(r, e^eps/(1+e^eps)) >= v]``;
for delta > 0 the paper (Theorem 3.3 / Algorithm 2) adds a term proportional to
``2 m delta``. No torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import binom

from fedrg.errors import PrivacyError


def draw_inclusion(m: int, rng: np.random.Generator) -> np.ndarray:
    """Independent fair coins: ``True`` = canary ``i`` is put in the training set."""
    if m < 1:
        raise PrivacyError(f"need at least one canary, got m={m}")
    return rng.random(m) < 0.5


def guesses_from_scores(scores: ArrayLike, *, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 for the ``k_pos`` highest scores, -1 for the ``k_neg`` lowest, 0 (abstain) otherwise."""
    s = np.asarray(scores, dtype=float)
    m = s.size
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise PrivacyError(f"k_pos={k_pos}, k_neg={k_neg} must be >= 0 with k_pos + k_neg <= "
                           f"m={m} canaries")
    order = np.argsort(s, kind="stable")
    g = np.zeros(m, dtype=int)
    if k_neg:
        g[order[:k_neg]] = -1
    if k_pos:
        g[order[m - k_pos:]] = 1
    return g


def count_correct(guesses: ArrayLike, included: ArrayLike) -> tuple[int, int]:
    """Return ``(r, v)``: the number of guesses made and how many were right."""
    g = np.asarray(guesses, dtype=int)
    inc = np.asarray(included, dtype=bool)
    if g.shape != inc.shape:
        raise PrivacyError(f"{g.size} guesses for {inc.size} canaries")
    truth = np.where(inc, 1, -1)
    made = g != 0
    return int(made.sum()), int((g[made] == truth[made]).sum())


def p_value(m: int, r: int, v: int, *, epsilon: float, delta: float) -> float:
    """Upper bound on ``P[>= v of r guesses correct]`` under (epsilon, delta)-DP with m canaries.

    Algorithm 2 of Steinke, Nasr and Jagielski (2023).
    """
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # e^eps / (1 + e^eps), overflow-safe
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    # alpha = max_i (1/i) P[v - i <= Binomial(r, q) < v]
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[=v-1], P[=v-2], ..., P[=0]
    cums = np.cumsum(pmf)
    alpha = float(np.max(cums / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(
    m: int, r: int, v: int, *, delta: float = 0.0, beta: float = 0.05, tol: float = 1e-4
) -> float:
    """Largest epsilon rejected at confidence ``1 - beta`` by ``v`` correct of ``r`` guesses.

    Parameters
    ----------
    m
        Number of canaries (each included with probability 1/2).
    r
        Number of guesses made (abstentions excluded).
    v
        Number of correct guesses.
    delta
        The delta of the (epsilon, delta)-DP claim being tested.
    beta
        Significance level (0.05: the bound is wrong with probability at most 5 %).
    tol
        Absolute precision of the bisection.

    Returns
    -------
    float
        The empirical lower bound on epsilon (0.0 when nothing can be rejected; ``inf``
        is never returned: the search stops at epsilon = 100).
    """
    if not 0.0 < beta < 1.0:
        raise PrivacyError(f"beta={beta} must lie in (0, 1)")
    if not 0.0 <= delta < 1.0:
        raise PrivacyError(f"delta={delta} must lie in [0, 1)")
    if p_value(m, r, v, epsilon=0.0, delta=delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, epsilon=hi, delta=delta) < beta:
        lo, hi = hi, hi * 2.0
        if hi > 100.0:
            return 100.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, epsilon=mid, delta=delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class CanaryAudit:
    """Result of :func:`audit_from_scores`."""

    m: int
    r: int
    v: int
    delta: float
    beta: float
    epsilon_lower_bound: float

    @property
    def accuracy(self) -> float:
        """Fraction of the guesses made that were right."""
        return self.v / self.r if self.r else 0.0


def audit_from_scores(
    scores: ArrayLike,
    included: ArrayLike,
    *,
    k_pos: int,
    k_neg: int,
    delta: float = 0.0,
    beta: float = 0.05,
) -> CanaryAudit:
    """One-run audit from per-canary scores and the secret inclusion coins.

    ``k_pos``/``k_neg`` must be chosen before seeing the scores (choosing them after and
    keeping the best would need a multiple-testing correction).
    """
    g = guesses_from_scores(scores, k_pos=k_pos, k_neg=k_neg)
    r, v = count_correct(g, included)
    m = len(g)
    return CanaryAudit(m=m, r=r, v=v, delta=delta, beta=beta,
                       epsilon_lower_bound=epsilon_lower_bound(m, r, v, delta=delta, beta=beta))
