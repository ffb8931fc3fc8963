"""Accounting across rounds and runs (fedrg.privacy.accounting): property tests."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant, create_accountant

from fedrg.errors import PrivacyError
from fedrg.privacy.accounting import (
    CALIBRATION_RTOL,
    PrivacyHistory,
    calibrate_noise_multiplier,
    check_delta,
    epsilon_after_planned,
    epsilon_of,
    suggest_delta,
)
from fedrg.train.schedule import local_steps, poisson_sample_rate

sigmas = st.floats(0.5, 4.0)
rates = st.floats(0.005, 0.2)  # RDP at large q is slow to compute in Opacus; keep tests quick


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    runs=st.lists(
        st.tuples(sigmas, rates, st.lists(st.integers(0, 40), min_size=1, max_size=4)),
        min_size=1, max_size=2,
    ),
    delta=st.sampled_from([1e-5, 1e-6, 1e-3]),
)
def test_history_carried_across_rounds_equals_one_accountant(runs, delta):
    """Round by round, through JSON and an Opacus state_dict, as one accountant stepping."""
    reference = RDPAccountant()
    carried = PrivacyHistory()
    for sigma, q, rounds in runs:  # each run: one sigma and sample rate, several rounds
        for steps in rounds:
            acc = RDPAccountant()  # a fresh accountant each round, loaded from disk
            stored = json.loads(json.dumps(carried.to_json()))
            if stored:
                acc.load_state_dict(PrivacyHistory.from_json(stored).to_state_dict("rdp"))
            for _ in range(steps):
                acc.step(noise_multiplier=sigma, sample_rate=q)
                reference.step(noise_multiplier=sigma, sample_rate=q)
            carried = PrivacyHistory.from_state_dict(acc.state_dict())
    assert carried.to_opacus() == reference.history
    got = epsilon_of(carried, target_delta=delta, accountant="rdp")
    want = reference.get_epsilon(delta=delta) if reference.history else 0.0
    assert got == pytest.approx(want, rel=1e-12)


@settings(max_examples=6, deadline=None)
@given(sigma=sigmas, q=rates, a=st.integers(1, 300), b=st.integers(1, 300))
def test_split_and_extended_histories_agree(sigma, q, a, b):
    split = PrivacyHistory([(sigma, q, a)]).extended(noise_multiplier=sigma, sample_rate=q, steps=b)
    assert split == PrivacyHistory([(sigma, q, a + b)])
    planned = epsilon_after_planned(PrivacyHistory([(sigma, q, a)]), noise_multiplier=sigma,
                                    sample_rate=q, steps=b, target_delta=1e-5)
    assert planned == pytest.approx(epsilon_of([(sigma, q, a + b)], target_delta=1e-5))
    assert planned > epsilon_of([(sigma, q, a)], target_delta=1e-5)


def test_prv_accountant_on_a_carried_history_matches_one_run():
    carried = PrivacyHistory([(1.0, 0.05, 100)]).extended(noise_multiplier=1.0, sample_rate=0.05,
                                                         steps=100)
    acc = create_accountant("prv")
    for _ in range(200):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
    assert epsilon_of(carried, target_delta=1e-5, accountant="prv") == pytest.approx(
        acc.get_epsilon(delta=1e-5))


def test_epsilon_agrees_with_dp_accounting_for_a_multi_run_history():
    """Independent accountant (Google's dp_accounting) over the same segments."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant as GoogleRdp

    hist = PrivacyHistory([(1.1, 0.05, 120), (0.9, 0.1, 40), (1.1, 0.05, 60)])
    ref = GoogleRdp()
    for s in hist:
        ref.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(s.sample_rate, dp_event.GaussianDpEvent(s.noise_multiplier)),
            s.steps))
    assert epsilon_of(hist, target_delta=1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=0.02)


def test_known_values_from_facts():
    # FACTS.md: q=0.05, sigma=1.0, 200 steps, delta=1e-5: rdp 5.37
    assert epsilon_of([(1.0, 0.05, 200)], target_delta=1e-5) == pytest.approx(5.37, abs=0.01)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    eps=st.floats(0.5, 20.0),
    q=st.floats(0.01, 0.2),
    rounds=st.integers(1, 10),
    local=st.integers(1, 50),
    delta=st.sampled_from([1e-5, 1e-6]),
)
def test_calibrated_sigma_meets_target_over_whole_federation(eps, q, rounds, local, delta):
    total = rounds * local
    sigma = calibrate_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q,
                                       steps=total, accountant="rdp")
    spent = epsilon_of([(sigma, q, total)], target_delta=delta)
    assert spent <= eps
    assert spent >= eps * (1 - CALIBRATION_RTOL) - 1e-9  # under-spends by < 1% (0.5%)
    # calibrating per round would overspend: one round's sigma run for all rounds
    if rounds > 1:
        per_round = calibrate_noise_multiplier(target_epsilon=eps, target_delta=delta,
                                               sample_rate=q, steps=local)
        assert epsilon_of([(per_round, q, total)], target_delta=delta) > eps


def test_calibration_with_prior_spend_meets_the_cumulative_target():
    prior = PrivacyHistory([(1.5, 0.1, 50)])
    spent = epsilon_of(prior, target_delta=1e-5)
    sigma = calibrate_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.1,
                                       steps=100, prior=prior)
    after = epsilon_after_planned(prior, noise_multiplier=sigma, sample_rate=0.1, steps=100,
                                  target_delta=1e-5)
    assert spent < after <= 8.0 and after >= 8.0 * (1 - CALIBRATION_RTOL)
    with pytest.raises(PrivacyError, match="already spent"):
        calibrate_noise_multiplier(target_epsilon=spent / 2, target_delta=1e-5, sample_rate=0.1,
                                   steps=10, prior=prior)


@pytest.mark.slow
def test_calibration_for_prv_meets_target():
    sigma = calibrate_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.1,
                                       steps=30, accountant="prv")
    spent = epsilon_of([(sigma, 0.1, 30)], target_delta=1e-5, accountant="prv")
    assert 8.0 * (1 - 0.01) <= spent <= 8.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 10_000_000), factor=st.floats(1.0, 1000.0))
def test_delta_at_or_above_one_over_n_is_refused(n, factor):
    with pytest.raises(PrivacyError, match=r"1/n") as err:
        check_delta(target_delta=min(factor / n, 0.999), n_patients=n)
    assert "privacy.target_delta" in str(err.value)
    suggestion = suggest_delta(n)
    assert suggestion * n < 0.1 + 1e-12
    check_delta(target_delta=suggestion, n_patients=n)  # the suggested value is accepted


def test_default_delta_is_accepted_for_typical_cohorts():
    check_delta(target_delta=1e-5, n_patients=160)
    with pytest.raises(PrivacyError, match="1e-05"):
        check_delta(target_delta=0.01, n_patients=160)


def test_json_round_trip_and_canonical_form():
    h = PrivacyHistory([(1.0, 0.1, 5), (1.0, 0.1, 0), (1.0, 0.1, 7), (2.0, 0.1, 3)])
    assert h.to_opacus() == [(1.0, 0.1, 12), (2.0, 0.1, 3)]
    assert PrivacyHistory.from_json(h.dumps()) == h
    assert PrivacyHistory.from_json(h.to_json()) == h
    assert h.total_steps == 15 and len(h) == 2
    assert h.to_state_dict("prv") == {"history": [(1.0, 0.1, 12), (2.0, 0.1, 3)], "mechanism": "prv"}


@pytest.mark.parametrize("bad", ["{", '{"a": 1}', "[[1.0, 0.1]]", "[[1.0, 1.5, 3]]",
                                 "[[-1.0, 0.1, 3]]", "[[1.0, 0.1, 2.5]]"])
def test_malformed_histories_are_refused(bad):
    with pytest.raises(PrivacyError):
        PrivacyHistory.from_json(bad)


def test_edge_cases():
    assert epsilon_of(PrivacyHistory(), target_delta=1e-5) == 0.0
    assert math.isinf(epsilon_of([(0.0, 0.1, 3)], target_delta=1e-5))
    with pytest.raises(PrivacyError, match="accountant"):
        epsilon_of([(1.0, 0.1, 3)], target_delta=1e-5, accountant="moments")
    with pytest.raises(PrivacyError, match="gdp"):
        epsilon_of([(1.0, 0.1, 3), (2.0, 0.1, 3)], target_delta=1e-5, accountant="gdp")
    with pytest.raises(PrivacyError, match="sample_rate"):
        calibrate_noise_multiplier(target_epsilon=1, target_delta=1e-5, sample_rate=0, steps=3)
    assert poisson_sample_rate(batch_size=16, n_records=8) == 1.0
    assert poisson_sample_rate(batch_size=16, n_records=160) == 0.1
    assert local_steps(local_epochs=1.0, batch_size=16, n_records=160) == 10
    assert local_steps(local_epochs=0.01, batch_size=16, n_records=160) == 1


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 5000), batch=st.integers(1, 256), epochs=st.floats(0.05, 5.0))
def test_local_steps_cover_the_epochs(n, batch, epochs):
    """``local_steps`` steps at batch ``batch`` see ``epochs`` passes in expectation, never
    fewer and less than one step more."""
    steps = local_steps(local_epochs=epochs, batch_size=batch, n_records=n)
    assert steps >= 1
    assert steps * batch >= epochs * n - 1e-9
    assert steps == 1 or (steps - 1) * batch < epochs * n


def test_wide_rdp_orders_remove_the_largest_alpha_warning() -> None:
    """Issue 15: at small epsilon Opacus's default orders put the optimum at the largest
    one and warn every round; fedrg searches up to 1024, warns not, and is never looser."""
    import warnings

    from opacus.accountants import RDPAccountant

    from fedrg.audit.verify import RDP_ORDERS
    from fedrg.privacy.accounting import RDP_ALPHAS, epsilon_of

    assert tuple(RDP_ORDERS) == tuple(RDP_ALPHAS)  # the audit's own copy stays in step
    hist = [(6.0, 0.01, 10)]
    acc = RDPAccountant()
    acc.history = list(hist)
    with pytest.warns(UserWarning, match="largest alpha"):
        default = acc.get_epsilon(delta=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = epsilon_of(hist, target_delta=1e-5, accountant="rdp")
    assert 0 < ours < default


@settings(max_examples=25, deadline=None)
@given(
    history=st.lists(st.tuples(st.floats(0.3, 5.0), st.floats(0.001, 1.0), st.integers(1, 500)),
                     min_size=1, max_size=6),
    delta=st.sampled_from([1e-5, 1e-6, 1 / 1210]),
)
def test_memoised_rdp_epsilon_is_bit_identical_to_opacus(history, delta):
    """The per-step RDP vectors are memoised per (sigma, q); the epsilon must be exactly
    what Opacus's RDPAccountant gives for the same history and orders."""
    from fedrg.privacy.accounting import RDP_ALPHAS, clear_accounting_caches

    clear_accounting_caches()
    acc = create_accountant(mechanism="rdp")
    acc.history = [tuple(h) for h in history]
    want = float(acc.get_epsilon(delta=delta, alphas=list(RDP_ALPHAS)))
    hist = PrivacyHistory(history)
    first = epsilon_of(hist, target_delta=delta, accountant="rdp")
    clear_accounting_caches()
    epsilon_of(PrivacyHistory(history[:1]), target_delta=delta, accountant="rdp")  # warm one vector
    again = epsilon_of(hist, target_delta=delta, accountant="rdp")
    assert first == want and again == want
