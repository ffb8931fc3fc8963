"""The one way an error becomes a reply that leaves the hospital.

A hospital that does not do what a message asks answers with a typed reply::

    {"status": "declined", "reason": str, "message": str, ...}

``reason`` is one of :data:`REASONS`. Only :meth:`fedrg.errors.FedrgError.public_message`
text and numbers the ledger itself releases (the epsilon already spent, the policy's budget)
go into it: never a path, an identifier or a number computed from patient data (the cohort
size included; ``tests/adversary/test_attack_refusal_reveals_cohort_size``).
"""

from __future__ import annotations

from typing import Any

from fedrg.errors import BudgetExceededError, FedrgError, PolicyViolationError

#: A request outside the site's policy (:class:`~fedrg.errors.PolicyViolationError`).
POLICY_VIOLATION = "policy_violation"
#: The lifetime budget would be passed (:class:`~fedrg.errors.BudgetExceededError`).
BUDGET_EXHAUSTED = "privacy_budget_exhausted"

REASONS = (
    POLICY_VIOLATION, BUDGET_EXHAUSTED, "ledger_not_extending",
    "evaluation_not_released", "evaluation_repeated", "evaluation_not_after_training",
    "evaluation_release_cap", "evaluation_epsilon_unreachable", "evaluation_run_cap",
    "evaluation_request_invalid", "evaluation_failed", "evaluation_not_in_run",
)


class DeclinedError(FedrgError):
    """The hospital declines a message for ``reason`` (one of :data:`REASONS`).

    ``message`` is public: it may leave the hospital as it is.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown decline reason {reason!r}; add it to REASONS")
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")

    def public_message(self) -> str:
        return self.message


def declined_reply(err: FedrgError) -> dict[str, Any]:
    """The typed reply for ``err`` (no data, no paths, no cohort-derived numbers).

    Parameters
    ----------
    err : FedrgError
        A :class:`DeclinedError`, a :class:`~fedrg.errors.PolicyViolationError` (adds
        ``setting``, ``requested``, ``allowed``) or a
        :class:`~fedrg.errors.BudgetExceededError` (adds ``epsilon_spent`` and ``budget``;
        the epsilon the refused round would have reached depends on the cohort size and
        stays on site).

    Returns
    -------
    dict
        ``{"status": "declined", "reason", "message", ...}``.
    """
    if isinstance(err, DeclinedError):
        return {"status": "declined", "reason": err.reason, "message": err.message}
    if isinstance(err, PolicyViolationError):
        return {"status": "declined", "reason": POLICY_VIOLATION, "setting": err.setting,
                "requested": repr(err.requested), "allowed": err.allowed,
                "message": err.public_message()}
    if isinstance(err, BudgetExceededError):
        return {"status": "declined", "reason": BUDGET_EXHAUSTED,
                "epsilon_spent": float(err.epsilon_spent), "budget": float(err.budget),
                "message": err.public_message()}
    raise TypeError(f"no declined reply for {type(err).__name__}: raise DeclinedError instead")


def is_budget_decline(reply: dict[str, Any]) -> bool:
    """True when ``reply`` declines for the lifetime budget."""
    return reply.get("status") == "declined" and reply.get("reason") == BUDGET_EXHAUSTED
