"""One-run canary audit statistics (Steinke, Nasr, Jagielski 2023)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrg.audit.canary import (
    audit_from_scores,
    count_correct,
    draw_inclusion,
    epsilon_lower_bound,
    guesses_from_scores,
    p_value,
)
from fedrg.errors import PrivacyError


def _tail_exact(r: int, v: int, eps: float) -> float:
    """P[Binomial(r, e^eps/(1+e^eps)) >= v] by exact summation (reference)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    return float(sum(Fraction(math.comb(r, k)) * Fraction(q) ** k * Fraction(1 - q) ** (r - k)
                     for k in range(v, r + 1)))


@settings(max_examples=30, deadline=None)
@given(r=st.integers(1, 60), data=st.data(), eps=st.floats(0.0, 6.0))
def test_pure_dp_p_value_is_the_binomial_tail(r: int, data, eps: float) -> None:
    v = data.draw(st.integers(0, r))
    assert p_value(r, r, v, epsilon=eps, delta=0.0) == pytest.approx(
        _tail_exact(r, v, eps), rel=1e-9, abs=1e-12)


def test_p_value_delta_term_matches_definition() -> None:
    m, r, v, eps, delta = 50, 40, 30, 1.0, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    alpha = max(sum(pmf[v - i:v]) / i for i in range(1, v + 1))
    expect = _tail_exact(r, v, eps) + 2 * m * delta * alpha
    assert p_value(m, r, v, epsilon=eps, delta=delta) == pytest.approx(expect, rel=1e-9)


def test_bound_is_zero_without_evidence_and_grows_with_it() -> None:
    assert epsilon_lower_bound(100, 0, 0) == 0.0
    assert epsilon_lower_bound(100, 100, 50) == 0.0  # chance level
    bounds = [epsilon_lower_bound(1000, 1000, v) for v in (550, 600, 700, 800, 900, 1000)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    # All 1000 guesses right: (e^eps/(1+e^eps))^1000 = 0.05 at eps ~ 5.8.
    assert bounds[-1] == pytest.approx(math.log(0.05 ** (1 / 1000) / (1 - 0.05 ** (1 / 1000))),
                                       abs=1e-3)
    # A positive delta can only weaken the bound.
    assert epsilon_lower_bound(1000, 1000, 900, delta=1e-5) <= epsilon_lower_bound(
        1000, 1000, 900)


def test_bound_is_valid_for_randomized_response() -> None:
    """Guesses that are exactly as good as eps-DP allows exceed eps at most beta of the time,
    and the bound is not vacuous."""
    rng = np.random.default_rng(0)
    eps, m, beta, trials = 1.0, 2000, 0.05, 300
    q = math.exp(eps) / (1 + math.exp(eps))
    bounds = np.array([
        epsilon_lower_bound(m, m, int(rng.binomial(m, q)), beta=beta) for _ in range(trials)
    ])
    violations = int((bounds > eps).sum())
    assert violations <= 2 * beta * trials  # expected <= 15; allow sampling noise
    assert np.median(bounds) > 0.8 * eps  # close to the truth with 2000 canaries


def test_end_to_end_from_scores() -> None:
    rng = np.random.default_rng(1)
    m = 1000
    included = draw_inclusion(m, rng)
    assert 400 < included.sum() < 600
    # A memorising (non-private) model: included canaries score visibly higher.
    scores = rng.normal(size=m) + 3.0 * included
    res = audit_from_scores(scores, included, k_pos=100, k_neg=100)
    assert res.r == 200 and res.accuracy > 0.95 and res.epsilon_lower_bound > 2.0
    # A model that learnt nothing about them: bound ~ 0.
    res0 = audit_from_scores(rng.normal(size=m), included, k_pos=100, k_neg=100)
    assert res0.epsilon_lower_bound < 0.5


def test_guesses_and_counts() -> None:
    g = guesses_from_scores([0.1, 5.0, -3.0, 2.0, 0.0], k_pos=2, k_neg=1)
    assert g.tolist() == [0, 1, -1, 1, 0]
    assert count_correct(g, [False, True, False, False, True]) == (3, 2)
    with pytest.raises(PrivacyError):
        guesses_from_scores([1.0, 2.0], k_pos=2, k_neg=1)
    with pytest.raises(PrivacyError):
        p_value(10, 5, 6, epsilon=1.0, delta=0.0)
