"""The local training loop, its privacy seam, and held-out evaluation."""

from __future__ import annotations

import math

import numpy as np
import torch
from model_fixtures import tiny_data_cfg, tiny_model_cfg

from fedrg.config import TrainingConfig
from fedrg.model.adapter import build_model
from fedrg.model.payload import get_adapter_arrays
from fedrg.train.evaluate import auroc, evaluate
from fedrg.train.loop import (
    PlainSGD,
    PrivacySeam,
    augment_images,
    collate,
    train_local,
    withhold_genomics,
)


def _model(base_dir, seed=0):
    return build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=seed)


def test_train_local_updates_only_the_adapter_and_is_deterministic(base_dir, dataset):
    cfg = TrainingConfig(batch_size=4, lr=5e-3, seed=11)
    a = _model(base_dir)
    frozen = {n: p.detach().clone() for n, p in a.named_parameters() if not p.requires_grad}
    start = get_adapter_arrays(a)
    metrics = train_local(a, dataset, cfg, steps=4)
    assert metrics["steps"] == 4 and metrics["examples"] == 16 and math.isfinite(metrics["loss_mean"])
    end = get_adapter_arrays(a)
    changed = [not np.array_equal(x, y) for x, y in zip(start, end, strict=True)]
    assert all(changed), "every adapter array should move (LoRA A and B, encoders, heads)"
    assert all(torch.equal(p, frozen[n]) for n, p in a.named_parameters() if not p.requires_grad)
    b = _model(base_dir)
    train_local(b, dataset, cfg, steps=4)
    assert all(np.array_equal(x, y) for x, y in zip(end, get_adapter_arrays(b), strict=True))


def test_local_steps_follow_epochs():
    from fedrg.train.schedule import local_steps

    assert local_steps(local_epochs=2, batch_size=16, n_records=100) == 13
    assert local_steps(local_epochs=2, batch_size=16, n_records=0) == 0


def test_plain_sgd_batches_cover_each_epoch(dataset):
    seam = PlainSGD(batch_size=5, seed=0)
    assert isinstance(seam, PrivacySeam)
    ids = [pid for b in seam.batches(dataset, steps=len(dataset) // 5) for pid in b["patient_id"]]
    assert len(ids) == len(set(ids)) == 5 * (len(dataset) // 5)


def test_withhold_genomics_and_augmentation(dataset):
    batch = collate([dataset[i] for i in range(len(dataset))])
    g = torch.Generator().manual_seed(0)
    out = withhold_genomics(batch, 0.5, g)
    dropped = (batch["has_genomics"] > 0) & (out["has_genomics"] == 0)
    assert 0 < int(dropped.sum()) < int((batch["has_genomics"] > 0).sum())
    assert float(out["expression"][dropped].abs().sum()) == 0.0
    again = withhold_genomics(batch, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again["has_genomics"], out["has_genomics"])
    assert withhold_genomics(batch, 0.0, g) is batch
    aug = augment_images(batch, torch.Generator().manual_seed(1))
    assert aug["image"].shape == batch["image"].shape
    assert torch.allclose(aug["image"].sum(), batch["image"].sum(), rtol=1e-4)  # flips/rolls


def test_dp_session_plugs_into_the_seam(base_dir, dataset):
    """Opacus DP-SGD (fedrg.privacy.dpsgd) through train_local: steps, accounting, movement."""
    from fedrg.privacy.dpsgd import DPSession

    model = _model(base_dir)
    start = get_adapter_arrays(model)
    session = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25,
                        expected_batch_size=0.25 * len(dataset), n_records=len(dataset), seed=3)
    cfg = TrainingConfig(lr=1e-3)
    metrics = train_local(model, dataset, cfg, steps=3, privacy=session)
    assert metrics["steps"] == 3 and session.steps_taken == 3
    assert session.history.total_steps == 3
    moved = [float(np.abs(a - b).max()) for a, b in zip(start, get_adapter_arrays(model),
                                                          strict=True)]
    # Adam: at most ~lr per step, the fastest group's lr under DP
    assert max(moved) > 0 and max(moved) < 3 * cfg.lr * cfg.lora_lr_scale * cfg.dp_lr_scale * 1.05
    assert not hasattr(next(p for p in model.parameters() if p.requires_grad), "grad_sample")


def test_frozen_under_dp_parts_stay_put_and_stay_trainable(base_dir, dataset):
    """privacy.frozen_under_dp: no noise and no update for the CNN during a DP round, group-wise
    clipping on, and the parameters are trainable (and in the payload) again afterwards."""
    import pytest

    from fedrg.config import PrivacyConfig
    from fedrg.privacy.dpsgd import DPSession, report_clip_groups

    model = _model(base_dir)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    cnn = [i for i, n in enumerate(names) if n.startswith("image_encoder.features")]
    assert cnn
    start = get_adapter_arrays(model)
    session = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25,
                        expected_batch_size=0.25 * len(dataset), n_records=len(dataset), seed=3,
                        grad_sample_mode="ew", clip_groups=report_clip_groups(PrivacyConfig()))
    train_local(model, dataset, TrainingConfig(lr=1e-3), steps=2, privacy=session,
                frozen=["image_encoder.features"])
    end = get_adapter_arrays(model)
    assert len(end) == len(start)
    assert all(np.array_equal(start[i], end[i]) for i in cnn)
    assert any(not np.array_equal(a, b) for i, (a, b) in enumerate(zip(start, end, strict=True))
               if i not in cnn)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names
    with pytest.raises(ValueError, match="frozen_under_dp.*'image_encoder.nope'"):
        train_local(model, dataset, TrainingConfig(), steps=1, frozen=["image_encoder.nope"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names


def test_auroc_handles_single_class_and_unknown():
    y = np.array([1.0, 1.0, 0.0, 0.0])
    s = np.array([0.9, 0.8, 0.1, 0.2])
    assert auroc(y, s, np.ones(4)) == 1.0
    assert auroc(y, s, np.array([1.0, 1.0, 0.0, 0.0])) is None
    assert auroc(y, s, np.zeros(4)) is None


def test_evaluate_reports_all_metrics(base_dir, dataset):
    model = _model(base_dir)
    part = torch.utils.data.Subset(dataset, list(range(10)))
    res = evaluate(model, part, batch_size=16)
    assert res["n"] == 10
    assert set(res["auroc"]) == set(tiny_data_cfg().markers) == set(res["auroc_multimodal"])
    assert all(v is None or 0.0 <= v <= 1.0 for v in res["auroc"].values())
    assert 0.0 <= res["rouge_l"] <= 1.0 and 0.0 <= res["findings_f1"] <= 1.0
    assert math.isfinite(res["loss"])
    assert model.training  # evaluate restores the mode
    assert evaluate(model, part, generate=False)["findings_f1"] is None


def test_dp_lr_scale_speeds_the_marker_side_under_dp_only(base_dir):
    """training.dp_lr_scale: under DP-SGD the marker side (encoders, marker head, linear paths)
    runs at the scaled rate; the report side (LoRA, prompt projectors) never does; without DP
    nothing changes."""
    from fedrg.train.loop import param_groups

    model = _model(base_dir)
    cfg = TrainingConfig(lr=1e-3, lora_lr_scale=5.0, dp_lr_scale=10.0)
    names = {id(p): n for n, p in model.named_parameters()}

    def rates(private):
        return {names[id(p)]: g["lr"] for g in param_groups(model, cfg, private=private)
                for p in g["params"]}

    plain, dp = rates(False), rates(True)
    assert set(plain) == set(dp) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in plain:
        report = any(k in name for k in ("lora_", "image_proj.", "genomics_proj."))
        linear = "_linear." in name and name.startswith("marker_head.")
        assert plain[name] == (5e-3 if report or linear else 1e-3), name
        assert dp[name] == (plain[name] if report else 10 * plain[name]), name
