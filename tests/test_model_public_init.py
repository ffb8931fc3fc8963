"""Public pre-training: the initial global adapter from public synthetic data only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import tiny_data_cfg, tiny_model_cfg

from fedrg.config import TrainingConfig
from fedrg.errors import ModelError
from fedrg.model.adapter import build_model
from fedrg.model.payload import get_adapter_arrays
from fedrg.train.public_init import (
    ARRAYS_FILE,
    PublicInitRecipe,
    apply_public_init,
    cache_key,
    ensure_public_init,
)

# small enough for the fast suite, large enough to learn the genomic markers
RECIPE = PublicInitRecipe(hospitals=2, patients=32, encoder_epochs=12, full_epochs=0.5,
                          batch_size=16)


def _cfgs(base_dir, **model):
    return tiny_model_cfg(base_dir, public_init="synthetic", **model), tiny_data_cfg(), TrainingConfig()


@pytest.fixture(scope="module")
def built(base_dir, tmp_path_factory):
    mcfg, dcfg, tcfg = _cfgs(base_dir)
    root = tmp_path_factory.mktemp("public-init")
    return ensure_public_init(mcfg, dcfg, tcfg, recipe=RECIPE, root=root), root


def test_none_keeps_the_seeded_random_start(base_dir):
    mcfg = tiny_model_cfg(base_dir, public_init="none")
    model = build_model(mcfg, tiny_data_cfg(), seed=0)
    before = get_adapter_arrays(model)
    assert apply_public_init(model, mcfg, tiny_data_cfg(), TrainingConfig()) == "none"
    assert all(np.array_equal(a, b) for a, b in zip(before, get_adapter_arrays(model), strict=True))


def test_synthetic_build_is_cached_and_reproducible(base_dir, built, tmp_path):
    directory, root = built
    mcfg, dcfg, tcfg = _cfgs(base_dir)
    assert directory.name == cache_key(mcfg, dcfg, recipe=RECIPE, training_cfg=tcfg)
    stamp = (directory / ARRAYS_FILE).stat().st_mtime_ns
    assert ensure_public_init(mcfg, dcfg, tcfg, recipe=RECIPE, root=root) == directory
    assert (directory / ARRAYS_FILE).stat().st_mtime_ns == stamp  # not rebuilt
    assert not (directory / "cohorts").exists()  # the public cohorts are not kept
    # a second build elsewhere gives the same bytes (one public artifact per configuration)
    again = ensure_public_init(mcfg, dcfg, tcfg, recipe=RECIPE, root=tmp_path)
    assert (again / ARRAYS_FILE).read_bytes() == (directory / ARRAYS_FILE).read_bytes()


def test_cache_key_follows_the_model_not_the_run(base_dir):
    mcfg, dcfg, tcfg = _cfgs(base_dir)
    key = cache_key(mcfg, dcfg, recipe=RECIPE, training_cfg=tcfg)
    assert cache_key(mcfg, dcfg.model_copy(update={"val_fraction": 0.4}), recipe=RECIPE,
                     training_cfg=tcfg.model_copy(update={"lr": 0.1, "seed": 9})) == key
    assert cache_key(mcfg.model_copy(update={"lora_rank": 2}), dcfg, recipe=RECIPE) != key
    assert cache_key(mcfg, dcfg, recipe=RECIPE,
                     training_cfg=tcfg.model_copy(update={"train_lr": 0.1})) != key
    assert cache_key(mcfg, dcfg, recipe=PublicInitRecipe(encoder_epochs=1)) != key


def test_applied_adapter_is_pretrained_and_predicts_markers(base_dir, built, tmp_path):
    """The applied weights are the cached ones, and they rank held-out patients (a public
    cohort from another seed) far better than chance on IDH from the genomic profile."""
    from sklearn.metrics import roc_auc_score

    from fedrg.data.cohort import load_cohort
    from fedrg.data.dataset import CohortDataset
    from fedrg.data.synth import synthesize
    from fedrg.train.loop import collate

    directory, root = built
    mcfg, dcfg, tcfg = _cfgs(base_dir)
    fresh = build_model(mcfg, dcfg, seed=0)
    model = build_model(mcfg, dcfg, seed=0)
    applied = apply_public_init(model, mcfg, dcfg, tcfg, recipe=RECIPE, root=root)
    assert applied == f"synthetic:{directory.name}"
    changed = [not np.array_equal(a, b) for a, b in zip(get_adapter_arrays(fresh),
                                                         get_adapter_arrays(model), strict=True)]
    assert sum(changed) > 0.9 * len(changed)  # LoRA, projectors, encoders and head all trained

    held_out = synthesize(tmp_path / "held-out", hospitals=1, patients=60, seed=4242, data_cfg=dcfg)[0]
    ds = CohortDataset(load_cohort(held_out, dcfg), dcfg)
    batch = collate([ds[i] for i in range(len(ds))])
    scores = {}
    for name, m in (("fresh", fresh), ("pretrained", model)):
        m.eval()
        with torch.no_grad():
            fused, _ = m.marker_logits(batch["image"], batch["expression"], batch["mutations"],
                                       batch["has_genomics"])
        known = batch["marker_mask"][:, 0] > 0
        scores[name] = roc_auc_score(batch["markers"][known, 0].numpy(), fused[known, 0].numpy())
    assert scores["pretrained"] > 0.85, scores


def test_adapter_directory_is_loaded_exactly(base_dir, tmp_path):
    from fedrg.model.io import save_adapter

    mcfg, dcfg, tcfg = _cfgs(base_dir)
    source = build_model(mcfg, dcfg, seed=7)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(0.01)
    save_adapter(source, tmp_path / "adapter")
    cfg = mcfg.model_copy(update={"public_init": str(tmp_path / "adapter")})
    model = build_model(cfg, dcfg, seed=0)
    assert apply_public_init(model, cfg, dcfg, tcfg) == str(tmp_path / "adapter")
    assert all(np.array_equal(a, b) for a, b in zip(get_adapter_arrays(source),
                                                     get_adapter_arrays(model), strict=True))


def test_bad_public_init_names_the_setting(base_dir, tmp_path):
    from fedrg.model.io import save_adapter

    mcfg, dcfg, tcfg = _cfgs(base_dir)
    missing = mcfg.model_copy(update={"public_init": str(tmp_path / "nowhere")})
    with pytest.raises(ModelError, match=r"model.public_init=.*nowhere.*not found"):
        apply_public_init(build_model(missing, dcfg), missing, dcfg, tcfg)
    save_adapter(build_model(mcfg.model_copy(update={"lora_rank": 2}), dcfg), tmp_path / "other")
    other = mcfg.model_copy(update={"public_init": str(tmp_path / "other")})
    with pytest.raises(ModelError, match=r"model.public_init=.*does not fit this model"):
        apply_public_init(build_model(other, dcfg), other, dcfg, tcfg)
