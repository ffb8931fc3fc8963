"""Budget enforcement: a round that would pass the budget is declined before anything runs,
and a ledger driven by plan_round never passes its budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from privacy_ledger_helpers import CONFIG_HASH, FINGERPRINT, opacus_epsilon

from fedrg.errors import BudgetExceededError, PrivacyError
from fedrg.privacy.budget import (
    cumulative_epsilon,
    decline_reply,
    is_decline,
    plan_round,
)
from fedrg.privacy.ledger import LEDGER_NAME, Ledger, verify_ledger


def test_cumulative_epsilon_matches_opacus_history_semantics() -> None:
    segs = [(1.1, 0.05, 30), (0.9, 0.04, 25)]
    assert cumulative_epsilon(segs, target_delta=1e-5) == pytest.approx(
        opacus_epsilon(segs, delta=1e-5))
    # Splitting a segment changes nothing (composition is additive in RDP).
    split = [(1.1, 0.05, 10), (1.1, 0.05, 20), (0.9, 0.04, 25)]
    assert cumulative_epsilon(split, target_delta=1e-5) == pytest.approx(
        cumulative_epsilon(segs, target_delta=1e-5), rel=1e-12)
    assert cumulative_epsilon([], target_delta=1e-5) == 0.0
    assert math.isinf(cumulative_epsilon([(0.0, 0.1, 5)], target_delta=1e-5))


def test_plan_round_reports_before_and_after() -> None:
    hist = [(1.1, 0.05, 30)]
    plan = plan_round(hist, noise_multiplier=1.1, sample_rate=0.05, steps=30,
                      target_delta=1e-5, budget=10.0)
    assert plan.epsilon_spent == pytest.approx(opacus_epsilon(hist, delta=1e-5))
    assert plan.epsilon_after == pytest.approx(opacus_epsilon(hist * 2, delta=1e-5))
    assert plan.epsilon_spent < plan.epsilon_after <= plan.budget
    assert plan.remaining_after == pytest.approx(10.0 - plan.epsilon_after)


def test_plan_round_raises_when_budget_would_be_passed() -> None:
    hist = [(1.0, 0.05, 200)]
    spent = opacus_epsilon(hist, delta=1e-5)
    with pytest.raises(BudgetExceededError) as info:
        plan_round(hist, noise_multiplier=1.0, sample_rate=0.05, steps=200,
                   target_delta=1e-5, budget=spent * 1.05)
    err = info.value
    assert err.epsilon_spent == pytest.approx(spent) and err.epsilon_after > err.budget
    reply = decline_reply(err)
    assert is_decline(reply)
    assert reply["status"] == "declined" and reply["reason"] == "privacy_budget_exhausted"
    assert set(reply) == {"status", "reason", "epsilon_spent", "epsilon_after", "budget",
                          "message"}
    assert all(isinstance(reply[k], float) for k in ("epsilon_spent", "epsilon_after",
                                                     "budget"))
    assert not is_decline({"status": "ok"})


def test_plan_round_rejects_invalid_parameters() -> None:
    with pytest.raises(PrivacyError):
        plan_round([], noise_multiplier=1.0, sample_rate=0.0, steps=1, target_delta=1e-5,
                   budget=1.0)
    with pytest.raises(PrivacyError):
        plan_round([], noise_multiplier=1.0, sample_rate=0.1, steps=1, target_delta=1.0,
                   budget=1.0)
    with pytest.raises(BudgetExceededError):  # no noise = no finite epsilon
        plan_round([], noise_multiplier=0.0, sample_rate=0.1, steps=1, target_delta=1e-5,
                   budget=100.0)


def _run_hospital(state: Path, *, budget: float, rounds: int, steps: int,
                  sigma: float, q: float, delta: float) -> tuple[int, int, list[str]]:
    """Drive the client-side protocol: plan (decline = stop), 'train', record.

    Returns (rounds trained, rounds declined, event log). The 'training' is a marker in the
    log, so the test can check no training happened after a decline.
    """
    ledger = Ledger.open(state, hospital="h")
    trained = declined = 0
    log: list[str] = []
    for r in range(rounds):
        try:
            plan = plan_round(ledger.history(), noise_multiplier=sigma, sample_rate=q,
                              steps=steps, target_delta=delta, budget=budget)
        except BudgetExceededError as err:
            assert is_decline(decline_reply(err))
            declined += 1
            log.append("decline")
            continue
        log.append("train")
        ledger.append(run_id="run", round=r, noise_multiplier=sigma, sample_rate=q,
                      steps=steps, max_grad_norm=1.0, accountant="rdp", target_delta=delta,
                      epsilon=plan.epsilon_after, budget=budget, config_hash=CONFIG_HASH,
                      dataset_fingerprint=FINGERPRINT)
        trained += 1
    return trained, declined, log


def test_nearly_spent_hospital_declines_and_ledger_stays_within_budget(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one = opacus_epsilon([(1.0, 0.05, 50)], delta=1e-5)
    budget = opacus_epsilon([(1.0, 0.05, 150)], delta=1e-5) * 1.01  # room for 3 rounds
    trained, declined, log = _run_hospital(state, budget=budget, rounds=6, steps=50,
                                           sigma=1.0, q=0.05, delta=1e-5)
    assert (trained, declined) == (3, 3)
    assert log == ["train"] * 3 + ["decline"] * 3
    entries = Ledger(state).read()
    assert len(entries) == 3 and entries[0].epsilon == pytest.approx(one)
    assert all(e.epsilon <= budget for e in entries)
    assert verify_ledger(state / LEDGER_NAME, state / "ledger_ed25519.pub").ok
    # A second run on the same dataset is refused straight away: the history spans runs.
    trained2, declined2, _ = _run_hospital(state, budget=budget, rounds=2, steps=50,
                                           sigma=1.0, q=0.05, delta=1e-5)
    assert (trained2, declined2) == (0, 2)
    assert len(Ledger(state).read()) == 3


@settings(max_examples=5, deadline=None)
@given(
    sigma=st.floats(0.7, 2.0),
    q=st.floats(0.01, 0.2),
    steps=st.integers(5, 60),
    budget=st.floats(0.5, 6.0),
)
def test_ledger_never_passes_budget(sigma: float, q: float, steps: int, budget: float) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        trained, declined, log = _run_hospital(state, budget=budget, rounds=5, steps=steps,
                                               sigma=sigma, q=q, delta=1e-5)
        entries = Ledger(state).read()
        assert len(entries) == trained and trained + declined == 5
        assert all(e.epsilon <= budget for e in entries)
        # Independent check of the recorded history with Opacus itself.
        assert opacus_epsilon([e.segment for e in entries], delta=1e-5) <= budget * (1 + 1e-9) \
            if entries else True
        # Once declined, every later round declines too (same plan, nothing spent).
        if "decline" in log:
            assert "train" not in log[log.index("decline"):]
