"""Evaluation metrics as a DP release: sensitivity, zero-noise equality, noise, metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from fedrg.privacy.release import (
    BINS,
    auroc_from_histograms,
    exact_aggregates,
    metrics_from_release,
    noisy_release,
    sensitivity,
    sum_releases,
)

MARKERS = ["a", "b"]


@st.composite
def cohorts(draw, min_size=1):
    n = draw(st.integers(min_size, 25))
    floats = st.floats(0.0, 1.0, allow_nan=False)
    rows = draw(st.lists(st.tuples(floats, floats, floats, floats, st.booleans(), st.booleans(),
                                   st.booleans(), st.floats(0.0, 50.0), st.one_of(st.none(), floats)),
                         min_size=n, max_size=n))
    return rows


def _agg(rows):
    n = len(rows)
    pi = np.array([[r[0], r[1]] for r in rows]).reshape(n, 2)
    pm = np.array([[r[2], r[3]] for r in rows]).reshape(n, 2)
    y = np.array([[float(r[4]), float(r[5])] for r in rows]).reshape(n, 2)
    mask = np.array([[1.0, float(r[6])] for r in rows]).reshape(n, 2)
    loss = np.array([r[7] for r in rows])
    f1 = np.array([np.nan if r[8] is None else r[8] for r in rows])
    return exact_aggregates(markers=MARKERS, probs={"auroc": pi, "auroc_multimodal": pm},
                            labels=y, mask=mask, loss=loss, findings_f1=f1, rouge_l=f1)


def _l2(a, b):
    return float(np.sqrt(sum(((np.asarray(a[k]) - np.asarray(b[k])) ** 2).sum() for k in a)))


@settings(max_examples=80, deadline=None)
@given(cohorts(min_size=2), st.data())
def test_one_patient_moves_the_aggregates_by_at_most_the_sensitivity(rows, data):
    """Add/remove one patient: L2 change <= sqrt(2K + 5), the noise is calibrated to."""
    i = data.draw(st.integers(0, len(rows) - 1))
    full, without = _agg(rows), _agg(rows[:i] + rows[i + 1:])
    assert _l2(full, without) <= sensitivity(len(MARKERS)) + 1e-9


@settings(max_examples=60, deadline=None)
@given(cohorts())
def test_zero_noise_release_is_exact_and_matches_sklearn(rows):
    """At noise 0 the release equals the exact aggregates, and the server's AUROC equals
    sklearn's on the binned scores (differential test)."""
    exact = _agg(rows)
    released = noisy_release(exact, noise_multiplier=0.0, n_markers=2, seed=1)
    assert released.keys() == exact.keys()
    for k in exact:
        assert released[k] == list(exact[k])
    metrics = metrics_from_release(sum_releases([released]), MARKERS)
    assert metrics["n"] == len(rows)
    pm = np.array([[r[2], r[3]] for r in rows])
    for j, m in enumerate(MARKERS):
        known = np.ones(len(rows), bool) if j == 0 else np.array([r[6] for r in rows])
        y = np.array([r[4 + j] for r in rows])[known]
        scores = np.clip((pm[known, j] * BINS).astype(int), 0, BINS - 1)
        got = metrics["auroc_multimodal"][m]
        if len(set(y.tolist())) < 2:
            assert got is None
        else:
            assert got == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    clipped = np.clip([r[7] for r in rows], 0, 10.0)
    assert metrics["loss"] == pytest.approx(float(clipped.mean()))


def test_noise_has_the_calibrated_scale_and_comes_from_entropy_by_default():
    rows = [(0.2, 0.3, 0.4, 0.5, True, False, True, 1.0, 0.5)] * 10
    exact = _agg(rows)
    sigma = 2.0
    draws = np.concatenate([
        np.concatenate([np.asarray(v) - exact[k] for k, v in
                        noisy_release(exact, noise_multiplier=sigma, n_markers=2, seed=s).items()])
        for s in range(40)])
    assert np.std(draws) == pytest.approx(sigma * sensitivity(2), rel=0.05)
    a = noisy_release(exact, noise_multiplier=sigma, n_markers=2)
    b = noisy_release(exact, noise_multiplier=sigma, n_markers=2)
    assert a != b  # OS entropy: no two releases share noise
    assert noisy_release(exact, noise_multiplier=sigma, n_markers=2, seed=3) == noisy_release(
        exact, noise_multiplier=sigma, n_markers=2, seed=3)


@given(st.lists(st.floats(-5, 30), min_size=BINS, max_size=BINS),
       st.lists(st.floats(-5, 30), min_size=BINS, max_size=BINS))
def test_auroc_from_noisy_histograms_stays_a_probability(pos, neg):
    got = auroc_from_histograms(np.array(pos), np.array(neg))
    assert got is None or 0.0 <= got <= 1.0


def test_exact_release_bins_finely_and_sums_with_coarse_dp_releases() -> None:
    """An exact release (EXACT_BINS) gives the server nearly the exact AUROC even when scores
    sit close together; summed with a DP release (BINS) it is folded into the coarse bins."""
    from sklearn.metrics import roc_auc_score

    from fedrg.privacy.release import (
        BINS,
        EXACT_BINS,
        auroc_from_histograms,
        exact_aggregates,
        sum_releases,
    )

    rng = np.random.default_rng(0)
    labels = (rng.random((200, 1)) < 0.4).astype(float)
    probs = 0.40 + 0.05 * labels + 0.03 * rng.standard_normal((200, 1))  # within ~0.3-0.55
    kw = {"markers": ["m"], "probs": {"auroc": probs, "auroc_multimodal": probs}, "labels": labels,
          "mask": np.ones_like(labels), "loss": np.ones(200), "findings_f1": None, "rouge_l": None}
    fine, coarse = exact_aggregates(**kw, bins=EXACT_BINS), exact_aggregates(**kw)
    truth = roc_auc_score(labels[:, 0], probs[:, 0])
    got = auroc_from_histograms(fine["hist/auroc/m/pos"], fine["hist/auroc/m/neg"])
    assert abs(got - truth) < 0.01
    binned = auroc_from_histograms(coarse["hist/auroc/m/pos"], coarse["hist/auroc/m/neg"])
    assert abs(binned - truth) > abs(got - truth)  # ten bins lose resolution here
    total = sum_releases([fine, coarse])
    assert total["hist/auroc/m/pos"].shape == (BINS,)
    np.testing.assert_array_equal(total["hist/auroc/m/pos"], 2 * coarse["hist/auroc/m/pos"])


# ----------------------------------------------- issue 24: honest metrics (noise intervals)
def _hist_release(pos, neg):
    return {"hist/auroc/m/pos": np.asarray(pos, float), "hist/auroc/m/neg": np.asarray(neg, float)}


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 30), min_size=BINS, max_size=BINS).filter(lambda c: sum(c) >= 5),
       st.lists(st.integers(0, 30), min_size=BINS, max_size=BINS).filter(lambda c: sum(c) >= 5),
       st.sampled_from([0.05, 0.3, 1.0, 3.0]))
def test_auroc_interval_covers_the_exact_auroc_at_its_level(pos, neg, noise_multiplier):
    """Coverage: over 200 seeded releases of the same exact histograms, the 95 % interval
    (from the noise std the release reports) holds the exact AUROC at least 90 % of the time
    (200 draws: 95 % nominal minus 3.2 binomial standard deviations), and the point estimate
    lies inside its own interval. Seeded noise: the same draws every run."""
    from fedrg.privacy.release import metric_intervals, release_std, summed_std

    exact = _hist_release(pos, neg)
    truth = auroc_from_histograms(exact["hist/auroc/m/pos"], exact["hist/auroc/m/neg"])
    std = summed_std([release_std(noise_multiplier, n_markers=1)])
    covered = 0
    for seed in range(200):
        noisy = sum_releases([noisy_release(exact, noise_multiplier=noise_multiplier, n_markers=1,
                                            seed=seed)])
        lo, hi = metric_intervals(noisy, ["m"], noise_std=std)["auroc"]["m"]
        covered += lo <= truth <= hi
        point = auroc_from_histograms(noisy["hist/auroc/m/pos"], noisy["hist/auroc/m/neg"])
        assert point is None or lo - 1e-9 <= point <= hi + 1e-9 or (lo, hi) == (0.0, 1.0)
    assert covered >= 180, (covered, truth, noise_multiplier)


def test_exact_release_interval_is_the_point_and_sums_noise_of_dp_releases_only():
    from fedrg.federated.server import aggregate_evaluation
    from fedrg.privacy.release import release_std

    rows = [(0.9, 0.9, 0.9, 0.9, True, True, True, 1.0, None), (0.1, 0.1, 0.1, 0.1, False, False, True, 1.0, None)] * 10
    exact = _agg(rows)
    dp = {"site": "h1", "private": True, "markers": MARKERS, "noise_multiplier": 2.0,
          "release": noisy_release(exact, noise_multiplier=2.0, n_markers=2, seed=0)}
    plain = {"site": "h2", "private": False, "markers": MARKERS, "noise_multiplier": 0.0,
             "release": noisy_release(exact, noise_multiplier=0.0, n_markers=2)}
    only_exact = aggregate_evaluation([plain])
    assert only_exact["released"] == "exact" and only_exact["released_by"] == ["h2"]
    assert only_exact["interval"]["auroc"]["a"] == [1.0, 1.0] and not only_exact["interval"]["swamped"]
    mixed = aggregate_evaluation([dp, plain, {"site": "h3", "status": "declined"}])
    assert mixed["released"] == "dp+exact" and mixed["released_by"] == ["h1", "h2"]
    assert mixed["interval"]["noise_std"] == pytest.approx(release_std(2.0, n_markers=2))


def test_default_policy_release_of_a_small_split_is_swamped_and_never_printed_bare():
    """Issue 24: under the default policy (epsilon 0.5 per release) three 20-patient splits
    gave "AUROC 0.329" with no caveat. The row now carries the 95 % interval and names the
    release; the console says that the noise swamps it instead of showing a value."""
    from fedrg.federated.report import gain_line, metric_text, release_text, round_table
    from fedrg.federated.server import aggregate_evaluation
    from fedrg.hospital.plan import release_noise_multiplier
    from fedrg.policy import SitePolicy

    sigma = release_noise_multiplier(SitePolicy(), target_delta=1e-5)
    rows = [(0.8, 0.9, 0.8, 0.9, True, True, True, 1.0, 0.5), (0.2, 0.1, 0.2, 0.1, False, False, True, 1.0, 0.5)] * 10
    exact = _agg(rows)
    replies = [{"site": f"h{i}", "status": "ok", "private": True, "markers": MARKERS,
                "noise_multiplier": sigma,
                "release": noisy_release(exact, noise_multiplier=sigma, n_markers=2, seed=i)}
               for i in (1, 2, 3)]
    ev = aggregate_evaluation(replies)
    row = {"round": 1, "participants": 3, **ev}
    assert row["released"] == "dp" and row["released_by"] == ["h1", "h2", "h3"]
    for m in MARKERS:
        lo, hi = row["interval"]["auroc"][m]
        assert hi - lo > 0.5 and m in row["interval"]["swamped"]["auroc"]
        assert metric_text(row, "auroc", m).startswith("noise swamps [")
    assert "DP-released by h1, h2, h3" in release_text(row)
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=80).print(round_table([row], MARKERS))
    assert "swamped" in buf.getvalue() and f"{row['auroc']['a']:.3f}" not in buf.getvalue()
    line = gain_line([{**row, "round": 0}, row], MARKERS)
    assert line is not None and "noise swamps the release" in line and "+0." not in line
    from fedrg.deploy.watch import round_line

    server_line = round_line(row, MARKERS)  # the deployed server's progress line
    assert "AUROC a noise swamps [" in server_line and "DP-released by h1, h2, h3" in server_line


def test_a_dp_release_with_little_noise_prints_value_and_interval():
    from fedrg.federated.report import metric_text
    from fedrg.federated.server import aggregate_evaluation

    rows = [(0.8, 0.9, 0.8, 0.9, True, True, True, 1.0, 0.5), (0.2, 0.1, 0.2, 0.1, False, False, True, 1.0, 0.5)] * 200
    exact = _agg(rows)
    ev = aggregate_evaluation([{"site": "h1", "status": "ok", "private": True, "markers": MARKERS,
                                "noise_multiplier": 0.5,
                                "release": noisy_release(exact, noise_multiplier=0.5, n_markers=2, seed=4)}])
    row = {"round": 2, **ev}
    lo, hi = row["interval"]["auroc"]["a"]
    assert lo <= 1.0 <= hi and hi - lo < 0.1 and not row["interval"]["swamped"]
    assert metric_text(row, "auroc", "a") == f"{row['auroc']['a']:.3f} [{lo:.3f}, {hi:.3f}]"
