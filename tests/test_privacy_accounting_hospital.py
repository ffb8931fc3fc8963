"""Hospital-level DP (fedrg.privacy.hospital_dp): clipping, noise shares and accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedrg.errors import PrivacyError
from fedrg.privacy.hospital_dp import (
    add_noise_share,
    add_server_noise,
    clip_update,
    hospital_level_epsilon,
    noise_share_std,
    privatize_update,
    update_norm,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


def update_strategy():
    return st.lists(
        hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 5)), elements=finite),
        min_size=1, max_size=3,
    )


@settings(max_examples=60, deadline=None)
@given(update=update_strategy(), clip=st.floats(1e-3, 100.0))
def test_clipped_update_norm_is_at_most_c_and_direction_kept(update, clip):
    clipped, norm = clip_update(update, hospital_clip=clip)
    assert norm == pytest.approx(update_norm(update))
    assert update_norm(clipped) <= clip * (1 + 1e-5)
    assert [a.shape for a in clipped] == [a.shape for a in update]
    assert all(c.dtype == a.dtype for c, a in zip(clipped, update, strict=True))
    if norm <= clip:
        for c, a in zip(clipped, update, strict=True):
            np.testing.assert_allclose(c, a, rtol=1e-6)
    else:
        scale = clip / norm
        for c, a in zip(clipped, update, strict=True):
            np.testing.assert_allclose(c, a * scale, rtol=1e-4, atol=1e-6 * clip)


@settings(max_examples=40, deadline=None)
@given(
    updates=st.lists(hnp.arrays(np.float64, (6,), elements=finite), min_size=2, max_size=6),
    who=st.integers(0, 5),
    clip=st.floats(1e-2, 10.0),
)
def test_one_hospital_moves_the_clipped_sum_by_at_most_c(updates, who, clip):
    who %= len(updates)
    clipped = [clip_update([u], hospital_clip=clip)[0][0] for u in updates]
    with_all = np.sum(clipped, axis=0)
    without = np.sum([c for i, c in enumerate(clipped) if i != who], axis=0)
    assert np.linalg.norm(with_all - without) <= clip * (1 + 1e-9)


def test_noise_shares_sum_to_sigma_c_on_the_aggregate():
    sigma, clip, m, dim = 1.3, 0.5, 4, 20_000
    rng = np.random.default_rng(0)
    zeros = [np.zeros(dim)]
    total = sum(add_noise_share(zeros, hospital_noise_multiplier=sigma, hospital_clip=clip,
                                min_contributors=m, rng=rng)[0] for _ in range(m))
    assert float(total.std()) == pytest.approx(sigma * clip, rel=0.03)
    share = add_noise_share(zeros, hospital_noise_multiplier=sigma, hospital_clip=clip,
                            min_contributors=m, rng=rng)[0]
    assert float(share.std()) == pytest.approx(sigma * clip / math.sqrt(m), rel=0.03)
    assert noise_share_std(hospital_noise_multiplier=sigma, hospital_clip=clip,
                           min_contributors=m) == pytest.approx(sigma * clip / 2)


def test_server_noise_on_the_mean_is_sigma_c_over_n():
    out = add_server_noise([np.zeros(20_000)], hospital_noise_multiplier=2.0, hospital_clip=0.3,
                           n_sampled=5, rng=np.random.default_rng(1))[0]
    assert float(out.std()) == pytest.approx(2.0 * 0.3 / 5, rel=0.03)


def test_privatize_clips_then_noises_and_uses_fresh_entropy():
    big = [np.full(1000, 10.0, dtype=np.float32)]
    a = privatize_update(big, hospital_noise_multiplier=0.0, hospital_clip=1.0, min_contributors=3)
    assert update_norm(a) == pytest.approx(1.0, rel=1e-5)
    b = privatize_update(big, hospital_noise_multiplier=1.0, hospital_clip=1.0, min_contributors=3)
    c = privatize_update(big, hospital_noise_multiplier=1.0, hospital_clip=1.0, min_contributors=3)
    assert b[0].dtype == np.float32 and not np.array_equal(b[0], c[0])


@pytest.mark.parametrize("sigma,rounds", [(0.8, 3), (1.5, 10), (4.0, 50)])
def test_hospital_level_epsilon_matches_an_independent_accountant(sigma, rounds):
    ours = hospital_level_epsilon(hospital_noise_multiplier=sigma, sample_rate=1.0, rounds=rounds,
                                  target_delta=1e-5)
    ref = RdpAccountant()
    ref.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), rounds))
    assert ours == pytest.approx(ref.get_epsilon(1e-5), rel=0.02)
    fewer = hospital_level_epsilon(hospital_noise_multiplier=sigma, sample_rate=1.0,
                                   rounds=max(1, rounds // 2), target_delta=1e-5)
    sampled = hospital_level_epsilon(hospital_noise_multiplier=sigma, sample_rate=0.3,
                                     rounds=rounds, target_delta=1e-5)
    assert fewer < ours and sampled < ours


def test_bad_hospital_dp_settings_are_refused():
    with pytest.raises(PrivacyError, match="hospital_clip"):
        clip_update([np.zeros(2)], hospital_clip=0.0)
    with pytest.raises(PrivacyError, match="min_contributors"):
        noise_share_std(hospital_noise_multiplier=1.0, hospital_clip=1.0, min_contributors=0)
    with pytest.raises(PrivacyError, match="fraction of hospitals"):
        hospital_level_epsilon(hospital_noise_multiplier=1.0, sample_rate=0.0, rounds=1,
                               target_delta=1e-5)
