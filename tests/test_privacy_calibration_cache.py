"""Memoised accounting and the on-disk calibration cache: a cached value is a fresh value."""

from __future__ import annotations

import json
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedrg.errors import PrivacyError
from fedrg.privacy.accounting import (
    CALIBRATION_RTOL,
    RDP_ALPHAS,
    PrivacyHistory,
    calibrate_noise_multiplier,
    clear_accounting_caches,
    epsilon_of,
)
from fedrg.privacy.calibration import CACHE_NAME, cached_noise_multiplier

PLAN = {"target_epsilon": 4.0, "target_delta": 1e-5, "sample_rate": 0.05, "steps": 60,
        "accountant": "rdp"}


def _fresh(**plan) -> float:
    """Opacus directly, no fedrg cache involved (the reference)."""
    return float(get_noise_multiplier(
        target_epsilon=plan["target_epsilon"], target_delta=plan["target_delta"],
        sample_rate=plan["sample_rate"], steps=plan["steps"], accountant=plan["accountant"],
        epsilon_tolerance=CALIBRATION_RTOL * plan["target_epsilon"]))


@pytest.fixture(autouse=True)
def _clean_caches():
    clear_accounting_caches()
    yield
    clear_accounting_caches()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segments=st.lists(st.tuples(st.floats(0.6, 3.0), st.floats(0.01, 0.2),
                                   st.integers(1, 50)), min_size=1, max_size=3),
       delta=st.sampled_from([1e-5, 1e-6]),
       accountant=st.sampled_from(["rdp", "prv"]))
def test_memoised_epsilon_equals_a_fresh_accountant(segments, delta, accountant):
    """Differential: first call, repeated (cached) call and Opacus itself agree exactly."""
    hist = PrivacyHistory(segments)
    acc = create_accountant(mechanism=accountant)
    acc.history = hist.to_opacus()
    # fedrg searches a wider range of RDP orders than Opacus's default (RDP_ALPHAS)
    orders = {"alphas": list(RDP_ALPHAS)} if accountant == "rdp" else {}
    reference = float(acc.get_epsilon(delta=delta, **orders))
    assert epsilon_of(hist, target_delta=delta, accountant=accountant) == reference
    assert epsilon_of(hist, target_delta=delta, accountant=accountant) == reference
    # the same history given as plain tuples hits the same entry
    assert epsilon_of(list(segments), target_delta=delta, accountant=accountant) == reference


def test_memo_keeps_gdp_refusal():
    hist = PrivacyHistory([(1.0, 0.05, 10), (2.0, 0.05, 10)])
    for _ in range(2):
        with pytest.raises(PrivacyError, match="gdp"):
            epsilon_of(hist, target_delta=1e-5, accountant="gdp")


def test_memoised_calibration_equals_fresh():
    assert calibrate_noise_multiplier(**PLAN) == _fresh(**PLAN)
    assert calibrate_noise_multiplier(**PLAN) == _fresh(**PLAN)
    for _ in range(2):  # invalid input raises every time, never a cached number
        with pytest.raises(PrivacyError, match="sample_rate"):
            calibrate_noise_multiplier(**dict(PLAN, sample_rate=0.0))


def test_disk_cache_equals_fresh_and_survives_a_new_process(tmp_path):
    sigma = cached_noise_multiplier(tmp_path, **PLAN)
    assert sigma == _fresh(**PLAN)
    path = tmp_path / CACHE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    clear_accounting_caches()  # as a new process would start
    assert cached_noise_multiplier(tmp_path, **PLAN) == sigma
    # another plan gets its own entry; the first one stays
    other = dict(PLAN, steps=90)
    assert cached_noise_multiplier(tmp_path, **other) == _fresh(**other)
    assert len(json.loads(path.read_text())) == 2


def test_disk_cache_hit_skips_the_calibration(tmp_path, monkeypatch):
    sigma = cached_noise_multiplier(tmp_path, **PLAN)
    clear_accounting_caches()
    import fedrg.privacy.calibration as calibration

    def refuse(**_kw):
        raise AssertionError("calibrated again despite a valid cache entry")

    monkeypatch.setattr(calibration, "calibrate_noise_multiplier", refuse)
    assert cached_noise_multiplier(tmp_path, **PLAN) == sigma


@pytest.mark.parametrize("tamper", ["lower", "higher", "garbage", "not-json", "nan"])
def test_tampered_cache_is_recomputed_never_trusted(tmp_path, tamper):
    """A cached sigma below the calibrated one would overspend: it is checked and replaced."""
    sigma = cached_noise_multiplier(tmp_path, **PLAN)
    path = tmp_path / CACHE_NAME
    entries = json.loads(path.read_text())
    (key,) = entries
    if tamper == "not-json":
        path.write_text("{not json")
    elif tamper == "garbage":
        path.write_text(json.dumps({key: "0.1"}))
    elif tamper == "nan":
        path.write_text(json.dumps({key: float("nan")}))
    else:
        entries[key] = sigma * (0.5 if tamper == "lower" else 3.0)
        path.write_text(json.dumps(entries))
    clear_accounting_caches()
    assert cached_noise_multiplier(tmp_path, **PLAN) == sigma
    assert json.loads(path.read_text())[key] == sigma
    eps = epsilon_of([(sigma, PLAN["sample_rate"], PLAN["steps"])], target_delta=1e-5)
    assert (1 - CALIBRATION_RTOL) * PLAN["target_epsilon"] <= eps <= PLAN["target_epsilon"]


def test_unwritable_cache_costs_time_not_the_round(tmp_path):
    (tmp_path / CACHE_NAME).mkdir()  # neither readable nor replaceable as a file (even as root)
    assert cached_noise_multiplier(tmp_path, **PLAN) == _fresh(**PLAN)
    assert (tmp_path / CACHE_NAME).is_dir()
