"""Empirical canary audit (fedrg.audit.empirical, `fedrg audit --empirical`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_fixtures import tiny_cohort, tiny_data_cfg, tiny_model_cfg
from typer.testing import CliRunner

from fedrg.audit.empirical import (
    RecordDataset,
    audit_training_config,
    design_canaries,
    guess_counts,
    make_canaries,
    run_canary_audit,
    score_canaries,
)
from fedrg.cli import app
from fedrg.data.cohort import load_cohort
from fedrg.data.dataset import collate_samples, split_indices
from fedrg.errors import PrivacyError
from fedrg.model.adapter import build_model


@pytest.fixture(scope="session")
def cohort(fx_root):
    return load_cohort(tiny_cohort(fx_root), tiny_data_cfg())


def test_one_record_per_canary_with_unique_random_profiles(cohort) -> None:
    cfg = tiny_data_cfg()
    m = 40
    canaries = make_canaries(cohort.images[:3], cfg, m=m, rng=np.random.default_rng(0),
                             expression_scale=3.0)
    assert len(canaries) == m
    ids = [c["patient_id"] for c in canaries]
    assert len(set(ids)) == m and all(i.startswith("canary-") for i in ids)
    batch = collate_samples(canaries)  # the cohort item format, so it collates like one
    assert batch["image"].shape == (m, 1, *cfg.image_shape)
    assert batch["expression"].shape == (m, len(cfg.gene_panel))
    assert torch.all(batch["has_genomics"] == 1) and torch.all(batch["marker_mask"] == 1)
    assert set(batch["markers"].unique().tolist()) <= {0.0, 1.0}
    assert batch["report"] == [""] * m
    # Distinct, large-norm expression profiles (the cohort's genes are scaled to ~1 by the
    # public constants; their centres are public too, so a cohort's gene means need not be 0).
    expr = batch["expression"].numpy()
    assert len({row.tobytes() for row in expr}) == m
    per_gene = np.asarray(cohort.expression)[np.asarray(cohort.has_genomics) > 0].std(axis=0)
    assert 2.5 < expr.std() < 3.5 and abs(float(per_gene.mean()) - 1) < 0.5
    # Images are real cohort images, borrowed in turn.
    for i, c in enumerate(canaries):
        assert np.array_equal(c["image"].numpy(), cohort.images[i % 3])
    with pytest.raises(PrivacyError):
        make_canaries(cohort.images[:1], cfg, m=0, rng=np.random.default_rng(0))
    with pytest.raises(PrivacyError):
        make_canaries([], cfg, m=3, rng=np.random.default_rng(0))


def test_design_records_inclusion_and_trains_each_included_canary_once(cohort) -> None:
    cfg = tiny_data_cfg()
    d = design_canaries(cohort, cfg, m=64, seed=123)
    assert d.included.dtype == bool and d.included.shape == (64,) and d.seed == 123
    assert 10 < int(d.included.sum()) < 54
    train_idx, held_out = split_indices(cohort, cfg)
    assert list(d.base.indices) == train_idx and not set(train_idx) & set(held_out)
    held_images = [cohort.images[j] for j in held_out]
    assert all(any(np.array_equal(c["image"].numpy(), h) for h in held_images)
               for c in d.canaries), "canary images come from held-out patients only"
    ts = d.training_set()
    assert len(ts) == len(train_idx) + int(d.included.sum())
    ids = [ts[i]["patient_id"] for i in range(len(ts))]
    assert len(ids) == len(set(ids)), "one record per patient / canary"
    canary_ids = {c["patient_id"] for c in d.canaries}
    trained = {i for i in ids if i in canary_ids}
    assert trained == {c["patient_id"] for c, inc in zip(d.canaries, d.included, strict=True)
                       if inc}
    assert ts.empty_batch()["image"].shape == (0, 1, *cfg.image_shape)
    with pytest.raises(IndexError):
        ts[len(ts)]
    # Same seed, same secret; no seed: fresh OS entropy, recorded.
    again = design_canaries(cohort, cfg, m=64, seed=123)
    assert np.array_equal(again.included, d.included)
    assert torch.equal(again.canaries[5]["expression"], d.canaries[5]["expression"])
    a, b = design_canaries(cohort, cfg, m=64), design_canaries(cohort, cfg, m=64)
    assert a.seed != b.seed and not np.array_equal(a.included, b.included)


def test_scores_are_the_log_likelihood_of_each_canarys_labels(cohort, base_dir) -> None:
    cfg = tiny_data_cfg()
    model = build_model(tiny_model_cfg(base_dir), cfg, seed=1)
    canaries = make_canaries(cohort.images[:4], cfg, m=23, rng=np.random.default_rng(2))
    scores = score_canaries(model, canaries, batch_size=5)
    assert scores.shape == (23,) and np.all(np.isfinite(scores)) and np.all(scores < 0)
    # Differential: the same numbers from the model's marker probabilities (the marker loss
    # averages the head's fused and image-only answers; no test-time flip in training).
    batch = collate_samples(canaries)
    y = batch["markers"].double()
    answers = [model.marker_probabilities(batch, withhold_genomics=w, test_time_flip=False).double()
               for w in (False, True)]
    ll = np.mean([(y * p.log() + (1 - y) * (1 - p).log()).mean(1).numpy() for p in answers], axis=0)
    assert np.allclose(scores, ll * model.model_cfg.marker_loss_weight, rtol=1e-4, atol=1e-5)
    # Batching does not change a canary's score.
    assert np.allclose(score_canaries(model, canaries, batch_size=64), scores, atol=1e-5)
    bce = np.mean([F.binary_cross_entropy(p, y, reduction="none").mean(1).numpy() for p in answers],
                  axis=0)
    assert np.allclose(-scores, bce * model.model_cfg.marker_loss_weight, rtol=1e-4, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(m=st.integers(0, 5000))
def test_guess_counts_are_valid_and_mostly_excluded(m: int) -> None:
    k_pos, k_neg = guess_counts(m)
    assert k_pos >= 0 and k_neg >= 0 and k_pos + k_neg <= m
    if m >= 8:
        assert 1 <= k_pos <= k_neg


def test_record_dataset_without_base() -> None:
    cfg = tiny_data_cfg()
    ds = RecordDataset(None, [{"patient_id": "x"}], cfg)
    assert len(ds) == 1 and ds[0]["patient_id"] == "x"


def test_audit_run_wiring_dp_and_non_private(cohort, base_dir) -> None:
    """A few steps only: checks the bookkeeping, not the bound."""
    kwargs = dict(canaries=24, steps=4, data_cfg=tiny_data_cfg(),
                  model_cfg=tiny_model_cfg(base_dir, genomics_dropout=0.0),
                  training_cfg=audit_training_config(batch_size=8), target_delta=1e-4)
    dp = run_canary_audit(cohort, target_epsilon=3.0, seed=5, _test_noise_seed=11, **kwargs)
    assert dp.private and 2.9 < dp.epsilon_accounted <= 3.0
    assert dp.noise_multiplier > 0 and 0 < dp.sample_rate < 1
    assert dp.m == 24 and len(dp.scores) == 24 and len(dp.included_mask) == 24
    assert dp.included == sum(dp.included_mask)
    assert dp.guesses == dp.k_pos + dp.k_neg and 0 <= dp.correct <= dp.guesses
    assert 0.0 <= dp.epsilon_lower_bound < 100.0
    # The sample rate was fixed from the expected training set size, not the drawn one.
    assert dp.sample_rate == pytest.approx(8 / (dp.training_records - dp.included + 12))
    plain = run_canary_audit(cohort, target_epsilon=None, seed=7, _test_noise_seed=11, **kwargs)
    assert not plain.private and math.isinf(plain.epsilon_accounted) and plain.seed == 7
    js = plain.to_json()
    assert js["epsilon_accounted"] == "inf" and "scores" not in js
    json.dumps(js)
    with pytest.raises(PrivacyError):
        run_canary_audit(cohort, target_epsilon=1.0, k_pos=20, k_neg=20, **kwargs)


def test_audit_command_needs_path_or_empirical() -> None:
    res = CliRunner().invoke(app, ["audit"])
    assert res.exit_code == 2 and "--empirical" in res.output


@pytest.mark.slow
def test_empirical_audit_end_to_end_defaults() -> None:
    """`fedrg audit --empirical --json` with its defaults (builtin:tiny, synthetic cohort,
    256 canaries, 200 steps): the non-private run's bound exceeds the DP run's accounted
    epsilon (the audit has power) and the DP run's bound does not. The command runs in this
    thread, so its DP noise comes from the test-only seeded generator: same result every run."""
    from fedrg.privacy.dpsgd import use_seeded_noise_for_tests

    with use_seeded_noise_for_tests(0):
        res = CliRunner().invoke(app, ["audit", "--empirical", "--json", "--epsilon", "2.0"])
    out = json.loads(res.stdout)
    dp, plain = out["dp"], out["non_private"]
    print(f"\nDP: accounted eps {dp['epsilon_accounted']:.3f}, lower bound "
          f"{dp['epsilon_lower_bound']:.3f} ({dp['correct']}/{dp['guesses']} correct, "
          f"{dp['seconds']} s); non-private: lower bound {plain['epsilon_lower_bound']:.3f} "
          f"({plain['correct']}/{plain['guesses']}, {plain['seconds']} s), m={dp['m']}")
    assert res.exit_code == 0, res.output
    assert dp["m"] == plain["m"] == 256
    assert 1.9 < dp["epsilon_accounted"] <= 2.0
    assert plain["epsilon_lower_bound"] > dp["epsilon_accounted"]
    assert dp["epsilon_lower_bound"] <= dp["epsilon_accounted"]
    assert out["ok"] and out["powered"]
