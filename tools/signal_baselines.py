"""How much marker signal the synthetic data carries: oracle and plain-baseline AUROCs.

* :func:`oracle_aurocs` fits classifiers on the generator's *latent* variables over a large
  simulated population (no files): the image-visible phenotype (what a perfect image model
  could recover) and the noiseless expression profile. This estimates the best AUROC each
  marker allows from each modality.
* :func:`baseline_aurocs` fits plain logistic regressions on what is actually on disk
  (hand-made image features, the expression panel) with a held-out split per hospital.

Used by docs/cohort-format.md and the tests; ``python tools/signal_baselines.py`` prints both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrg.config import DEFAULT_GENE_PANEL, DEFAULT_MARKERS, DataConfig
from fedrg.data.cohort import Cohort
from fedrg.data.reports import ENHANCEMENT, OEDEMA
from fedrg.data.synth import (
    _LOBES,
    Patient,
    expression_row,
    gene_baselines,
    simulate_hospital,
    site_batch,
)
from fedrg.data.worlds import PUBLIC_WORLD


def latent_image_features(p: Patient) -> list[float]:
    """Phenotype visible in the image: size, lobe, enhancement, necrosis, oedema, mismatch
    sign, calcification, heterogeneity, ventricle size (atrophy)."""
    f = p.findings
    return [
        float(f.size_cm or 0.0),
        *[float(f.location == lobe) for lobe in _LOBES],
        *[float(f.enhancement == e) for e in ENHANCEMENT],
        float(f.necrosis == "present"),
        *[float(f.oedema == o) for o in OEDEMA],
        float(f.mismatch_sign == "present"),
        float(f.calcification),
        p.heterogeneity,
        p.atrophy,
    ]


def _truth(p: Patient) -> list[int]:
    return [int(p.idh), int(p.codel), int(p.mgmt)]


def _fit_auroc(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
               flexible: bool = False) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if flexible:
        clf = HistGradientBoostingClassifier(max_depth=3, learning_rate=0.05, max_iter=200,
                                             random_state=0)
    else:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(x_tr, y_tr)
    return float(roc_auc_score(y_te, clf.predict_proba(x_te)[:, 1]))


def oracle_aurocs(seed: int = 1234, hospitals: int = 12, patients: int = 400,
                  world: str = PUBLIC_WORLD) -> dict[str, dict[str, float]]:
    """Best achievable AUROC per marker from the image phenotype and from expression.

    Fits on half of a large simulated population of ``world``, scores on the other half; the
    image oracle is the better of logistic regression and gradient boosting on the latents;
    expression is standardised within each hospital (its batch effects removed).
    """
    genes = list(DEFAULT_GENE_PANEL)
    baselines = gene_baselines(genes)
    img, expr, y = [], [], []
    for h in range(1, hospitals + 1):
        profile, pats = simulate_hospital(seed, h, patients, world)
        batch = site_batch(seed, h, sorted(baselines), world)
        rows = []
        for i, p in enumerate(pats):
            img.append(latent_image_features(p))
            y.append(_truth(p))
            rows.append(expression_row(p, profile, genes, baselines, batch,
                                       np.random.default_rng([seed, h, i, 4])))
        logv = np.log1p(np.asarray(rows))
        expr.extend(((logv - logv.mean(0)) / (logv.std(0) + 1e-9)).tolist())
    x_img, x_expr, y_arr = np.asarray(img), np.asarray(expr), np.asarray(y)
    rng = np.random.default_rng(seed)
    test = rng.random(len(y_arr)) < 0.5
    out: dict[str, dict[str, float]] = {"image": {}, "expression": {}}
    for k, m in enumerate(DEFAULT_MARKERS):
        yk = y_arr[:, k]
        out["image"][m] = max(
            _fit_auroc(x_img[~test], yk[~test], x_img[test], yk[test]),
            _fit_auroc(x_img[~test], yk[~test], x_img[test], yk[test], flexible=True),
        )
        out["expression"][m] = _fit_auroc(x_expr[~test], yk[~test], x_expr[test], yk[test])
    return out


def image_features(image: np.ndarray) -> np.ndarray:
    """Simple hand-made features of a prepared image (``[1,H,W]`` or ``[1,D,H,W]``).

    The model's own first-order radiomic features (:func:`fedrg.model.radiomics.radiomic_features`):
    intensity histogram and quantiles, the size and position of the bright (lesion) region,
    how much dark tissue lies inside it (necrosis), the bright rim, and its texture.
    """
    import torch

    from fedrg.model.radiomics import radiomic_features

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return radiomic_features(x)[0].double().numpy()


def baseline_aurocs(cohorts: Sequence[Cohort], data_cfg: DataConfig) -> dict[str, dict[str, float]]:
    """Held-out AUROC of logistic regressions on image features and on the expression panel.

    Train/validation follow :func:`fedrg.data.dataset.split_indices` within each hospital;
    the models are fitted on the pooled training parts and scored on the pooled held-out
    parts (patients with the marker unknown are left out).
    """
    from fedrg.data.dataset import split_indices

    parts = {"train": ([], [], []), "val": ([], [], [])}
    for c in cohorts:
        tr, va = split_indices(c, data_cfg)
        for name, idx in (("train", tr), ("val", va)):
            xi, xe, yy = parts[name]
            for i in idx:
                xi.append(image_features(c.images[i]))
                xe.append(c.expression[i])
                yy.append(c.markers[i])
    out: dict[str, dict[str, float]] = {"image": {}, "expression": {}}
    y_tr, y_va = np.asarray(parts["train"][2]), np.asarray(parts["val"][2])
    for modality, j in (("image", 0), ("expression", 1)):
        x_tr, x_va = np.asarray(parts["train"][j]), np.asarray(parts["val"][j])
        for k, m in enumerate(data_cfg.markers):
            ktr, kva = ~np.isnan(y_tr[:, k]), ~np.isnan(y_va[:, k])
            yt, yv = y_tr[ktr, k], y_va[kva, k]
            if len(set(yt)) < 2 or len(set(yv)) < 2:
                out[modality][m] = float("nan")
                continue
            out[modality][m] = _fit_auroc(x_tr[ktr], yt, x_va[kva], yv)
    return out


def cnn_auroc(cohorts: Sequence[Cohort], data_cfg: DataConfig, *, marker: str = "idh_mutant",
              epochs: int = 40, seed: int = 0) -> float:
    """Held-out AUROC of a tiny 2D CNN trained from scratch on the images (one marker).

    Same split as :func:`baseline_aurocs`; left-right flips as augmentation (the side of
    the tumour carries no signal). 2d mode only.
    """
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    from fedrg.data.dataset import split_indices

    if data_cfg.image_mode != "2d":
        raise ValueError("cnn_auroc needs data.image_mode = '2d'")
    k = data_cfg.markers.index(marker)
    xs = {"train": [], "val": []}
    ys = {"train": [], "val": []}
    for c in cohorts:
        tr, va = split_indices(c, data_cfg)
        for name, idx in (("train", tr), ("val", va)):
            for i in idx:
                if not np.isnan(c.markers[i, k]):
                    xs[name].append(c.images[i])
                    ys[name].append(c.markers[i, k])
    x_tr = torch.from_numpy(np.stack(xs["train"]))
    y_tr = torch.tensor(ys["train"], dtype=torch.float32)
    x_va = torch.from_numpy(np.stack(xs["val"]))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(128, 1),
        )
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
        loss_fn = nn.BCEWithLogitsLoss()
        for _ in range(epochs):
            net.train()
            order = torch.randperm(len(x_tr), generator=g)
            for start in range(0, len(order), 32):
                idx = order[start:start + 32]
                xb = x_tr[idx]
                flip = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                opt.zero_grad()
                loss_fn(net(xb).squeeze(1), y_tr[idx]).backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            score = (net(x_va) + net(x_va.flip(-1))).squeeze(1).numpy()
    return float(roc_auc_score(ys["val"], score))


if __name__ == "__main__":  # pragma: no cover - documentation helper
    import sys
    import tempfile

    import torch

    from fedrg.data.cohort import load_cohort
    from fedrg.data.synth import synthesize

    torch.set_num_threads(1)
    world = sys.argv[3] if len(sys.argv) > 3 else PUBLIC_WORLD  # tools/signal_baselines.py 3 160 shifted
    print(f"oracle (latent, 4800 simulated patients, {world} world):", oracle_aurocs(world=world))
    cfg = DataConfig()
    hosp, pats = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (3, 160)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = synthesize(tmp, hospitals=hosp, patients=pats, seed=0, data_cfg=cfg, world=world)
        cohorts = [load_cohort(d, cfg) for d in dirs]
        print(f"baseline ({hosp}x{pats}, seed 0, held-out):", baseline_aurocs(cohorts, cfg))
        print("tiny CNN on images, held-out:",
              {m: cnn_auroc(cohorts, cfg, marker=m, epochs=30) for m in cfg.markers})
