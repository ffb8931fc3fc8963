"""Budget enforcement: a round that would pass the lifetime budget is declined before anything
runs (by the hospital's one plan, :func:`fedrg.hospital.plan.plan_training`), and a ledger
driven by that plan never passes its budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from privacy_ledger_helpers import CONFIG_HASH, FINGERPRINT, opacus_epsilon

from fedrg.config import load_config
from fedrg.errors import BudgetExceededError
from fedrg.hospital.plan import Spent, plan_training
from fedrg.hospital.replies import declined_reply, is_budget_decline
from fedrg.hospital.request import check_request
from fedrg.policy import EvaluationPolicy, SitePolicy
from fedrg.privacy.accounting import PrivacyHistory, epsilon_of
from fedrg.privacy.ledger import LEDGER_NAME, Ledger, verify_ledger

N_TRAIN = 400


def _fixed(*, sigma: float, q: float, steps: int, budget: float, rounds: int = 50):
    """A request with a fixed sigma whose plan at N_TRAIN patients is ``steps`` steps at
    sample rate ``q`` (batch ``q * N_TRAIN``), under a policy with lifetime ``budget``."""
    batch = round(q * N_TRAIN)
    policy = SitePolicy(epsilon_budget=budget, epsilon_per_run=budget, target_delta=1e-5,
                        min_noise_multiplier=0.0, max_local_steps=10_000,
                        evaluation=EvaluationPolicy(release="none"))
    cfg = check_request(load_config(None, [
        f"privacy.noise_multiplier={sigma}", f"training.batch_size={batch}",
        f"training.local_epochs={steps * batch / N_TRAIN}", f"federation.rounds={rounds}"]),
        policy, round_=1, hospitals_in_round=3)
    return cfg, policy


def test_epsilon_composes_as_opacus_history_semantics() -> None:
    segs = [(1.1, 0.05, 30), (0.9, 0.04, 25)]
    assert epsilon_of(segs, target_delta=1e-5) == pytest.approx(opacus_epsilon(segs, delta=1e-5))
    # Splitting a segment changes nothing (composition is additive in RDP).
    split = [(1.1, 0.05, 10), (1.1, 0.05, 20), (0.9, 0.04, 25)]
    assert epsilon_of(split, target_delta=1e-5) == pytest.approx(
        epsilon_of(segs, target_delta=1e-5), rel=1e-12)
    assert epsilon_of([], target_delta=1e-5) == 0.0
    assert math.isinf(epsilon_of([(0.0, 0.1, 5)], target_delta=1e-5))


def test_plan_reports_before_and_after() -> None:
    cfg, policy = _fixed(sigma=1.1, q=0.05, steps=30, budget=10.0)
    hist = PrivacyHistory([(1.1, 0.05, 30)])
    plan = plan_training(cfg, policy, n_train=N_TRAIN, spent=Spent(lifetime=hist), run_id="r", round_=1)
    assert (plan.sample_rate, plan.steps) == (0.05, 30)
    assert plan.epsilon_lifetime_before == pytest.approx(opacus_epsilon(hist.to_opacus(), delta=1e-5))
    assert plan.epsilon_lifetime_after == pytest.approx(opacus_epsilon(hist.to_opacus() * 2, delta=1e-5))
    assert plan.epsilon_lifetime_before < plan.epsilon_lifetime_after <= plan.budget


def test_plan_declines_when_budget_would_be_passed() -> None:
    hist = PrivacyHistory([(1.0, 0.05, 200)])
    spent = opacus_epsilon(hist.to_opacus(), delta=1e-5)
    cfg, policy = _fixed(sigma=1.0, q=0.05, steps=200, budget=spent * 1.05)
    with pytest.raises(BudgetExceededError) as info:
        plan_training(cfg, policy, n_train=N_TRAIN, spent=Spent(lifetime=hist), run_id="r", round_=1)
    err = info.value
    assert err.epsilon_spent == pytest.approx(spent) and err.epsilon_after > err.budget
    reply = declined_reply(err)
    assert is_budget_decline(reply)
    assert reply["status"] == "declined" and reply["reason"] == "privacy_budget_exhausted"
    # the epsilon the refused round would reach depends on the cohort size: it stays on site
    assert set(reply) == {"status", "reason", "epsilon_spent", "budget", "message"}
    assert f"{err.epsilon_after:.4f}" not in reply["message"]
    assert all(isinstance(reply[k], float) for k in ("epsilon_spent", "budget"))
    assert not is_budget_decline({"status": "ok"})


def _run_hospital(state: Path, *, budget: float, rounds: int, steps: int,
                  sigma: float, q: float) -> tuple[int, int, list[str]]:
    """Drive the client-side protocol: plan (decline = stop), 'train', record.

    Returns (rounds trained, rounds declined, event log). The 'training' is a marker in the
    log, so the test can check no training happened after a decline.
    """
    cfg, policy = _fixed(sigma=sigma, q=q, steps=steps, budget=budget)
    ledger = Ledger.open(state, hospital="h")
    trained = declined = 0
    log: list[str] = []
    for r in range(rounds):
        try:
            # one run per round: the lifetime budget, not the per-run cap, is what binds here
            plan = plan_training(cfg, policy, n_train=N_TRAIN,
                                 spent=Spent.from_ledger(ledger.read(), f"run-{r}"),
                                 run_id=f"run-{r}", round_=1)
        except BudgetExceededError as err:
            assert is_budget_decline(declined_reply(err))
            declined += 1
            log.append("decline")
            continue
        log.append("train")
        ledger.append(**plan.ledger_fields(), config_hash=CONFIG_HASH,
                      dataset_fingerprint=FINGERPRINT)
        trained += 1
    return trained, declined, log


def test_nearly_spent_hospital_declines_and_ledger_stays_within_budget(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one = opacus_epsilon([(1.0, 0.05, 50)], delta=1e-5)
    budget = opacus_epsilon([(1.0, 0.05, 150)], delta=1e-5) * 1.01  # room for 3 rounds
    trained, declined, log = _run_hospital(state, budget=budget, rounds=6, steps=50,
                                           sigma=1.0, q=0.05)
    assert (trained, declined) == (3, 3)
    assert log == ["train"] * 3 + ["decline"] * 3
    entries = Ledger(state).read()
    assert len(entries) == 3 and entries[0].epsilon == pytest.approx(one)
    assert all(e.epsilon <= budget for e in entries)
    assert verify_ledger(state / LEDGER_NAME, state / "ledger_ed25519.pub").ok
    # A second run on the same dataset is refused straight away: the history spans runs.
    trained2, declined2, _ = _run_hospital(state, budget=budget, rounds=2, steps=50,
                                           sigma=1.0, q=0.05)
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
                                               sigma=sigma, q=q)
        entries = Ledger(state).read()
        assert len(entries) == trained and trained + declined == 5
        assert all(e.epsilon <= budget for e in entries)
        # Independent check of the recorded history with Opacus itself.
        assert opacus_epsilon([e.segment for e in entries], delta=1e-5) <= budget * (1 + 1e-9) \
            if entries else True
        # Once declined, every later round declines too (same plan, nothing spent).
        if "decline" in log:
            assert "train" not in log[log.index("decline"):]
