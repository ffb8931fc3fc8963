"""The recorded form of a DP mechanism, shared by the ledger and the budget (pure, no I/O).

Kept apart from :mod:`fedrg.privacy.ledger` (which writes files) so that budget checks and
accounting depend only on this plain record.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["EPS_TOL", "RUN_CAP_RTOL", "MechanismSegment", "within_budget", "within_run_cap"]

#: Slack for float comparisons of epsilon against the budget / the previous entry.
EPS_TOL = 1e-9
#: Relative slack when comparing a run's epsilon with its per-run cap.
RUN_CAP_RTOL = 1e-6


def within_budget(epsilon: float, budget: float) -> bool:
    """The lifetime-budget rule: ``epsilon <= budget`` (to :data:`EPS_TOL`).

    The hospital's plan, the ledger's own append check and the audit all call this one function.
    """
    return epsilon <= budget + EPS_TOL


def within_run_cap(epsilon: float, cap: float, *, rtol: float = RUN_CAP_RTOL) -> bool:
    """The per-run rule: ``epsilon <= cap`` (to ``rtol``, relative).

    The audit passes a wider ``rtol`` because it recomputes epsilon with another accountant.
    """
    return epsilon <= cap * (1 + rtol)


class MechanismSegment(NamedTuple):
    """One stretch of DP-SGD steps with fixed parameters (Opacus accountant history form)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
