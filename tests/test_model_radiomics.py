"""First-order radiomic features, the two-answer marker head and test-time flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import tiny_cohort, tiny_data_cfg, tiny_model_cfg

from fedrg.config import DataConfig
from fedrg.model.adapter import build_model
from fedrg.model.encoders import ImageEncoder, MarkerHead
from fedrg.model.radiomics import (
    FEATURE_COUNT,
    HISTOGRAM_BINS,
    QUANTILES,
    radiomic_features,
    standardised_radiomic_features,
)
from fedrg.train.loop import collate


def _disc(size: int = 64, centre=(20.0, 40.0), radius: float = 6.0) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                                torch.arange(size, dtype=torch.float32), indexing="ij")
    img = torch.full((size, size), 0.4)
    img[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2] = 0.9
    return img[None]


def test_features_of_a_known_disc():
    f = radiomic_features(_disc()[None])[0]
    assert f.shape == (FEATURE_COUNT,)
    hist = f[:HISTOGRAM_BINS]
    assert float(hist.sum()) == pytest.approx(1.0)
    q = f[HISTOGRAM_BINS:HISTOGRAM_BINS + len(QUANTILES)]
    assert torch.all(q[1:] >= q[:-1])
    bright, cy, off_mid = (float(v) for v in f[HISTOGRAM_BINS + len(QUANTILES):][:3])
    area = float((_disc() > 0.5).float().mean())
    assert bright == pytest.approx(area)
    assert cy == pytest.approx(20.0 / 64, abs=1e-3)
    assert off_mid == pytest.approx(abs(40.0 / 64 - 0.5), abs=1e-3)
    assert float(f[-1]) == 1.0  # has a bright region


def test_constant_image_has_no_region_and_finite_features():
    f = radiomic_features(torch.full((1, 1, 32, 32), 0.5))[0]
    assert torch.isfinite(f).all()
    assert float(f[-1]) == 0.0
    assert torch.all(f[HISTOGRAM_BINS + len(QUANTILES):] == 0)


def test_features_are_per_image_whatever_the_batch():
    """DP needs each patient's features to depend on that patient only."""
    a = _disc()[None]
    others = torch.rand(5, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    alone = radiomic_features(a)
    together = radiomic_features(torch.cat([others[:2], a, others[2:]]))
    torch.testing.assert_close(together[2:3], alone)


def test_3d_uses_the_middle_slice():
    vol = torch.rand(1, 1, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(radiomic_features(vol), radiomic_features(vol[:, :, 4]))


def test_standardised_features_are_order_one_on_fresh_synthetic_images(fx_root):
    """The fixed constants were measured on other synthetic images (seed 99); a new
    cohort's standardised features stay centred and unit-scale."""
    from fedrg.data.cohort import load_cohort

    cfg = DataConfig()
    cohort = load_cohort(tiny_cohort(fx_root, patients=40, seed=11), cfg)
    f = standardised_radiomic_features(torch.from_numpy(np.stack(cohort.images)))
    varying = f.std(0) > 0
    assert varying.sum() >= FEATURE_COUNT - 2
    assert float(f.mean(0).abs().max()) < 1.5
    assert float(f.std(0)[varying].max()) < 3.0 and float(f.std(0)[varying].min()) > 0.2


def test_image_encoder_with_and_without_radiomics():
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    for radiomics in (False, True):
        enc = ImageEncoder("2d", 16, [32, 32], norm="none", radiomics=radiomics)
        assert enc(x).shape == (3, 16)
    with_r = ImageEncoder("2d", 16, [32, 32], norm="none", radiomics=True)
    without = ImageEncoder("2d", 16, [32, 32], norm="none", radiomics=False)
    assert with_r.out.in_features == without.out.in_features + FEATURE_COUNT


def test_marker_head_image_only_answer_is_the_fused_answer_without_genomics():
    torch.manual_seed(0)
    head = MarkerHead(8, 5, 16, 3, image_linear=6, genomics_linear=7)
    with torch.no_grad():  # a trained head: nothing at its zero initialisation
        for p in head.parameters():
            p.normal_()
    img, rad = torch.randn(4, 8), torch.randn(4, 6)
    fused, image_only = head(img, torch.zeros(4, 5), image_inputs=rad,
                             genomics_inputs=torch.zeros(4, 7))
    torch.testing.assert_close(fused, image_only)
    fused, image_only = head(img, torch.randn(4, 5), image_inputs=rad,
                             genomics_inputs=torch.randn(4, 7))
    assert not torch.allclose(fused, image_only)


def test_untrained_marker_head_answers_one_half_for_everyone():
    """The cause of DP's inverted multimodal AUROCs (docs/model.md): a randomly initialised
    genomics side ranked patients by a random projection of the informative genomic profile,
    and a few noisy steps never undid it. Untrained, the head now has no opinion at all."""
    torch.manual_seed(0)
    head = MarkerHead(8, 5, 16, 3, image_linear=6, genomics_linear=7)
    fused, image_only = head(torch.randn(10, 8), torch.randn(10, 5), image_inputs=torch.randn(10, 6),
                             genomics_inputs=torch.randn(10, 7))
    torch.testing.assert_close(fused, torch.zeros(10, 3))
    torch.testing.assert_close(image_only, torch.zeros(10, 3))
    with pytest.raises(ValueError, match="image_inputs"):
        head(torch.randn(2, 8), torch.randn(2, 5))


def test_marker_probabilities_average_the_mirror_image(base_dir, dataset):
    model = build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=0)
    model.eval()
    batch = collate([dataset[i] for i in range(3)])
    mirrored = dict(batch, image=batch["image"].flip(-1))
    for withhold in (False, True):
        torch.testing.assert_close(
            model.marker_probabilities(batch, withhold_genomics=withhold),
            model.marker_probabilities(mirrored, withhold_genomics=withhold),
        )
