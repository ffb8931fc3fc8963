"""Parameter-free first-order radiomic features of a prepared image, in torch.

Intensity histogram and quantiles, the size and position of the bright (lesion) region,
how much dark tissue lies inside its bounding box (necrosis), its very bright part (the
enhancing rim) and its texture. Hand-made features plus a small trainable layer learn far
more per patient than a CNN alone, and matter most under DP-SGD, where every trainable
parameter adds noise (Tramer & Boneh, "Differentially private learning needs better
features", ICLR 2021).

The features need no gradient: they are a fixed function of the input image.
:func:`standardised_radiomic_features` centres and scales them with fixed constants measured
once on public synthetic images (``fedrg synth --hospitals 4 --patients 100 --seed 99``, no
patient data; recompute with ``python -m fedrg.model.radiomics DIR...``): fixed, so they
cost no privacy and are identical at every hospital.
"""

from __future__ import annotations

import torch

HISTOGRAM_BINS = 12
QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99)
FEATURE_COUNT = HISTOGRAM_BINS + len(QUANTILES) + 8
FEATURE_MEAN = (
    0.2954, 0.064, 0.0526, 0.1199, 0.1461, 0.1225, 0.0959, 0.0463, 0.021, 0.0115, 0.0095, 0.0153,
    0.3458, 0.4506, 0.5637, 0.6467, 0.9164,
    0.0428, 0.4701, 0.1402, 0.1912, 0.1822, 0.0772, 0.2394, 1.0,
)
FEATURE_STD = (
    0.0433, 0.0357, 0.0394, 0.0789, 0.065, 0.0535, 0.0611, 0.0417, 0.0225, 0.0156, 0.0106, 0.0063,
    0.0738, 0.0875, 0.1027, 0.1175, 0.0904,
    0.0235, 0.1633, 0.061, 0.1022, 0.0811, 0.0888, 0.0518, 1.0,
)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last axis (0 when none)."""
    return mask.int().argmax(-1)


@torch.no_grad()
def radiomic_features(image: torch.Tensor) -> torch.Tensor:
    """``[B, FEATURE_COUNT]`` features of ``[B,1,H,W]`` or ``[B,1,D,H,W]`` images in ``[0, 1]``.

    3D images use their middle axial slice. The layout is: the histogram (``HISTOGRAM_BINS``
    fractions), ``QUANTILES``, then bright fraction, centroid row, distance of the centroid
    column from the midline, spread, dark fraction inside the bright box, very bright
    fraction inside it, its standard deviation, and a has-bright-region flag.
    """
    x = image[:, 0]
    if x.dim() == 4:
        x = x[:, x.shape[1] // 2]
    x = x.float()
    b, h, w = x.shape
    flat = x.reshape(b, -1)
    idx = (flat * HISTOGRAM_BINS).long().clamp(0, HISTOGRAM_BINS - 1)
    hist = torch.zeros(b, HISTOGRAM_BINS, dtype=x.dtype, device=x.device)
    hist.scatter_add_(1, idx, torch.ones_like(flat))
    hist = hist / flat.shape[1]
    q = torch.quantile(flat, torch.tensor(QUANTILES, dtype=x.dtype, device=x.device), dim=1).T
    thr = q[:, 1] + 0.5 * (q[:, 4] - q[:, 1])
    bright = x > thr[:, None, None]
    count = bright.flatten(1).sum(1).to(x.dtype)
    has = (count > 0).to(x.dtype)
    safe = count.clamp(min=1.0)
    rows = torch.arange(h, dtype=x.dtype, device=x.device)[None, :, None]
    cols = torch.arange(w, dtype=x.dtype, device=x.device)[None, None, :]
    bf = bright.to(x.dtype)
    cy = (bf * rows).flatten(1).sum(1) / safe
    cx = (bf * cols).flatten(1).sum(1) / safe
    var = (bf * ((rows - cy[:, None, None]) ** 2 + (cols - cx[:, None, None]) ** 2)).flatten(1).sum(1) / safe
    row_any, col_any = bright.any(2), bright.any(1)
    r0, c0 = _first_true(row_any), _first_true(col_any)
    r1, c1 = h - _first_true(row_any.flip(-1)), w - _first_true(col_any.flip(-1))
    in_rows = (rows[0, :, 0][None] >= r0[:, None]) & (rows[0, :, 0][None] < r1[:, None])
    in_cols = (cols[0, 0][None] >= c0[:, None]) & (cols[0, 0][None] < c1[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :]).to(x.dtype)
    box_n = box.flatten(1).sum(1).clamp(min=1.0)
    dark_inside = (box * (x < (q[:, 0] * 0.7)[:, None, None])).flatten(1).sum(1) / box_n
    very_bright = (box * (x > q[:, 4][:, None, None])).flatten(1).sum(1) / box_n
    mean_box = (box * x).flatten(1).sum(1) / box_n
    tex = ((box * (x - mean_box[:, None, None]) ** 2).flatten(1).sum(1) / box_n).sqrt()
    region = torch.stack([
        count / flat.shape[1], cy / h, (cx / w - 0.5).abs(), var.sqrt() / h,
        dark_inside, very_bright, tex,
    ], dim=1) * has[:, None]
    return torch.cat([hist, q, region, has[:, None]], dim=1)


def standardised_radiomic_features(image: torch.Tensor) -> torch.Tensor:
    """:func:`radiomic_features` minus ``FEATURE_MEAN``, divided by ``FEATURE_STD``."""
    f = radiomic_features(image)
    mean = torch.tensor(FEATURE_MEAN, dtype=f.dtype, device=f.device)
    std = torch.tensor(FEATURE_STD, dtype=f.dtype, device=f.device)
    return (f - mean) / std


if __name__ == "__main__":  # pragma: no cover - prints the constants for FEATURE_MEAN/STD
    import sys

    import numpy as np

    from fedrg.config import DataConfig
    from fedrg.data.cohort import load_cohort

    cfg = DataConfig()
    images = np.concatenate([np.stack(load_cohort(d, cfg).images) for d in sys.argv[1:]])
    feats = radiomic_features(torch.from_numpy(images)).double()
    print(len(images), "images")
    print("FEATURE_MEAN =", np.round(feats.mean(0).numpy(), 4).tolist())
    print("FEATURE_STD =", np.round(feats.std(0).clamp(min=1e-3).numpy(), 4).tolist())
