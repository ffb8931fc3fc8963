"""Lifetime privacy-budget enforcement for one hospital's dataset.

Before a round touches any data, the hospital computes the cumulative epsilon its dataset
would reach after the planned steps (over the ledger's whole history, every run) and
declines the round when that would pass its budget. The decline is a typed reply the
server understands (:func:`decline_reply`); the ledger itself also refuses any entry whose
epsilon passes the budget, so the ledger never records an overspend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedrg.errors import BudgetExceededError, PrivacyError
from fedrg.privacy.mechanism import EPS_TOL, MechanismSegment

DECLINE_REASON = "privacy_budget_exhausted"


def cumulative_epsilon(
    segments: Sequence[tuple[float, float, int]],
    *,
    target_delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon at ``target_delta`` after all ``segments`` (noise_multiplier, sample_rate, steps).

    Delegates to :func:`fedrg.privacy.accounting.epsilon_of` (the Opacus accountant named
    ``accountant``, history never reset), so a planned round is judged with exactly the
    accounting that training records.
    """
    from fedrg.privacy.accounting import epsilon_of

    return float(epsilon_of(list(segments), target_delta=target_delta, accountant=accountant))


@dataclass(frozen=True)
class RoundPlan:
    """Outcome of :func:`plan_round` for a round that fits the budget."""

    epsilon_spent: float
    epsilon_after: float
    budget: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    target_delta: float
    accountant: str

    @property
    def remaining_after(self) -> float:
        """Budget left after the round."""
        return self.budget - self.epsilon_after


def plan_round(
    history: Sequence[tuple[float, float, int]],
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    target_delta: float,
    budget: float,
    accountant: str = "rdp",
) -> RoundPlan:
    """Check a planned round against the dataset's lifetime budget, before touching data.

    Parameters
    ----------
    history
        Every mechanism segment already spent on this dataset (``Ledger.history()``).
    noise_multiplier, sample_rate, steps
        The planned round.
    target_delta
        Delta at which epsilon is measured.
    budget
        The dataset's lifetime epsilon budget.
    accountant
        Opacus accountant name ("rdp", "prv", "gdp"); use the one the ledger records.

    Returns
    -------
    RoundPlan
        Epsilon before and after the round.

    Raises
    ------
    BudgetExceededError
        When the epsilon after the round would pass ``budget``.
    PrivacyError
        When the planned parameters are invalid.
    """
    if steps < 0 or not 0.0 < sample_rate <= 1.0 or noise_multiplier < 0.0:
        raise PrivacyError(
            f"invalid planned round: noise_multiplier={noise_multiplier}, "
            f"sample_rate={sample_rate}, steps={steps}; need noise_multiplier >= 0, "
            "0 < sample_rate <= 1, steps >= 0"
        )
    if not 0.0 < target_delta < 1.0:
        raise PrivacyError(f"target_delta={target_delta} must be in (0, 1)")
    past = list(history)
    spent = cumulative_epsilon(past, target_delta=target_delta, accountant=accountant)
    planned = [*past, MechanismSegment(float(noise_multiplier), float(sample_rate), int(steps))]
    after = cumulative_epsilon(planned, target_delta=target_delta, accountant=accountant)
    if not after <= budget + EPS_TOL:
        raise BudgetExceededError(epsilon_spent=spent, epsilon_after=after, budget=budget)
    return RoundPlan(
        epsilon_spent=spent, epsilon_after=after, budget=float(budget),
        noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate),
        steps=int(steps), target_delta=float(target_delta), accountant=accountant,
    )


def decline_reply(err: BudgetExceededError) -> dict[str, Any]:
    """The typed reply a hospital sends instead of an update when it declines a round.

    Holds only aggregate privacy numbers (no paths, identifiers or data)::

        {"status": "declined", "reason": "privacy_budget_exhausted",
         "epsilon_spent": float, "epsilon_after": float, "budget": float, "message": str}
    """
    return {
        "status": "declined",
        "reason": DECLINE_REASON,
        "epsilon_spent": float(err.epsilon_spent),
        "epsilon_after": float(err.epsilon_after),
        "budget": float(err.budget),
        "message": err.public_message(),
    }


def is_decline(reply: dict[str, Any]) -> bool:
    """True when ``reply`` is a budget decline made by :func:`decline_reply`."""
    return reply.get("status") == "declined" and reply.get("reason") == DECLINE_REASON
