"""Evaluation metrics as an accounted DP release (a Gaussian mechanism on aggregates).

A hospital never sends exact metrics. It sends, once per release, noisy *aggregates* of its
fixed validation split, from which the server computes loss, AUROC (image only and
multimodal, per marker), findings F1 and ROUGE-L over the sum of all hospitals' releases:

* per marker and mode, two histograms of the predicted probability (``BINS`` equal bins)
  over known positives and known negatives: each patient adds 1 to one bin of one of them;
* the sums over patients of the loss divided by ``loss_clip`` (clipped to [0, 1]), of the
  per-patient findings F1 and ROUGE-L (in [0, 1], patients with a reference only), the
  count of patients and the count of patients with a reference.

Adding or removing one patient changes at most ``2 K`` histogram cells by 1 and the five
sums by at most 1 each, so the L2 sensitivity is ``sqrt(2 K + 5)`` (K markers). Every
coordinate gets Gaussian noise of standard deviation ``noise_multiplier * sensitivity``:
a Gaussian mechanism with noise multiplier ``noise_multiplier``, i.e. one RDP segment
``(noise_multiplier, sample_rate=1, steps=1)`` in the ledger's history, composed with the
DP-SGD rounds by the same accountant.

Every released metric comes with a confidence interval for the noise (:func:`metric_intervals`):
the noise's standard deviation is public (``noise_multiplier * sensitivity``, summed in
quadrature over the hospitals' releases), so the server can say how far the noise may have
moved each number. The interval covers the noise only, not the sampling of the validation
patients: it is an interval for the metric of *these* patients (binned as released).

Pure NumPy: no torch, no I/O. The noise generator comes from OS entropy unless a test
passes a seed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

BINS = 10
#: Bins of an exact (not noised) release: noise-free cells cost nothing, and fine bins keep
#: the server's AUROC close to the exact one (a multiple of ``BINS``, so mixed releases sum).
EXACT_BINS = 1000
MODES = ("auroc", "auroc_multimodal")
SUMS = ("count", "loss", "findings_f1", "rouge_l", "count_ref")
DEFAULT_LOSS_CLIP = 10.0


def sensitivity(n_markers: int) -> float:
    """L2 sensitivity (one patient added or removed) of :func:`exact_aggregates`."""
    return math.sqrt(2 * n_markers + len(SUMS))


def release_std(noise_multiplier: float, *, n_markers: int) -> float:
    """Standard deviation of the Gaussian noise on every coordinate of one release (the one
    definition: :func:`noisy_release` draws with it, :func:`metric_intervals` reads it)."""
    return float(noise_multiplier) * sensitivity(n_markers)


def summed_std(stds: Sequence[float]) -> float:
    """Noise std of a coordinate summed over releases with independent noise ``stds``."""
    return math.sqrt(sum(float(s) ** 2 for s in stds))


def _bins(p: np.ndarray, bins: int = BINS) -> np.ndarray:
    return np.clip((np.asarray(p, dtype=np.float64) * bins).astype(np.int64), 0, bins - 1)


def exact_aggregates(
    *,
    markers: Sequence[str],
    probs: dict[str, np.ndarray],
    labels: np.ndarray,
    mask: np.ndarray,
    loss: np.ndarray,
    findings_f1: np.ndarray | None,
    rouge_l: np.ndarray | None,
    loss_clip: float = DEFAULT_LOSS_CLIP,
    bins: int = BINS,
) -> dict[str, np.ndarray]:
    """The exact (not yet noised) aggregates of one validation split.

    Parameters
    ----------
    markers : sequence of str
        The K marker names.
    probs : dict
        ``{"auroc": [N, K] image-only probabilities, "auroc_multimodal": [N, K]}``.
    labels, mask : np.ndarray
        ``[N, K]`` marker values and known-mask (1 known).
    loss : np.ndarray
        ``[N]`` per-patient loss.
    findings_f1, rouge_l : np.ndarray | None
        ``[N]`` per-patient scores in [0, 1], NaN where the patient has no reference.
    loss_clip : float
        Per-patient loss bound (larger losses count as ``loss_clip``).
    bins : int
        Histogram bins (``BINS`` for a DP release; the sensitivity does not depend on it).

    Returns
    -------
    dict[str, np.ndarray]
        ``hist/<mode>/<marker>/pos`` and ``.../neg`` (``BINS`` counts) and the ``SUMS``
        (shape ``[1]``), all float64.
    """
    n = int(np.asarray(loss).shape[0])
    out: dict[str, np.ndarray] = {}
    labels = np.asarray(labels, dtype=np.float64).reshape(n, len(markers))
    known = np.asarray(mask, dtype=np.float64).reshape(n, len(markers)) > 0.5
    for mode in MODES:
        p = np.asarray(probs[mode], dtype=np.float64).reshape(n, len(markers))
        for j, m in enumerate(markers):
            b = _bins(p[:, j], bins)
            pos = known[:, j] & (labels[:, j] > 0.5)
            neg = known[:, j] & (labels[:, j] <= 0.5)
            out[f"hist/{mode}/{m}/pos"] = np.bincount(b[pos], minlength=bins).astype(np.float64)
            out[f"hist/{mode}/{m}/neg"] = np.bincount(b[neg], minlength=bins).astype(np.float64)
    lc = np.clip(np.nan_to_num(np.asarray(loss, dtype=np.float64), nan=loss_clip,
                               posinf=loss_clip), 0.0, loss_clip) / loss_clip
    f1 = np.full(n, np.nan) if findings_f1 is None else np.asarray(findings_f1, dtype=np.float64)
    rl = np.full(n, np.nan) if rouge_l is None else np.asarray(rouge_l, dtype=np.float64)
    has_ref = ~np.isnan(f1)
    out["count"] = np.array([float(n)])
    out["loss"] = np.array([float(lc.sum())])
    out["findings_f1"] = np.array([float(np.clip(f1[has_ref], 0, 1).sum())])
    out["rouge_l"] = np.array([float(np.clip(np.nan_to_num(rl[has_ref]), 0, 1).sum())])
    out["count_ref"] = np.array([float(has_ref.sum())])
    return out


def noisy_release(
    aggregates: dict[str, np.ndarray],
    *,
    noise_multiplier: float,
    n_markers: int,
    seed: int | None = None,
) -> dict[str, list[float]]:
    """Add Gaussian noise (std ``noise_multiplier * sensitivity``) to every coordinate.

    Parameters
    ----------
    aggregates : dict
        From :func:`exact_aggregates`.
    noise_multiplier : float
        Noise relative to the L2 sensitivity (0: exact, tests only).
    n_markers : int
        K (fixes the sensitivity).
    seed : int | None
        Tests only; ``None`` draws the generator's seed from OS entropy (whoever knows the
        seed can subtract the noise).

    Returns
    -------
    dict[str, list[float]]
        The noisy aggregates, JSON-able.
    """
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    std = release_std(noise_multiplier, n_markers=n_markers)
    out: dict[str, list[float]] = {}
    for key in sorted(aggregates):
        v = np.asarray(aggregates[key], dtype=np.float64)
        noise = rng.normal(0.0, std, size=v.shape) if std > 0 else np.zeros_like(v)
        out[key] = [float(x) for x in v + noise]
    return out


def sum_releases(releases: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Coordinate-wise sum of several hospitals' releases (keys they all share)."""
    if not releases:
        return {}
    keys = set(releases[0])
    for r in releases[1:]:
        keys &= set(r)
    out = {}
    for k in sorted(keys):
        arrays = [np.asarray(r[k], dtype=np.float64) for r in releases]
        coarse = min(a.size for a in arrays)  # an exact release's fine histogram is summed
        arrays = [a.reshape(coarse, -1).sum(axis=1) if a.size != coarse and a.size % coarse == 0
                  else a for a in arrays]  # into the coarser bins of a DP release
        out[k] = np.sum(arrays, axis=0)
    return out


def _pair_weights(bins: int) -> np.ndarray:
    """``M`` with ``pos @ M @ neg`` = pairs (positive above negative) + ties / 2."""
    return np.tril(np.ones((bins, bins)), -1) + 0.5 * np.eye(bins)


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUROC of binned scores: P(pos > neg) + P(tie) / 2, clipped to [0, 1].

    Computed as ``U / D`` with ``U = pos @ M @ neg`` (pairs in order, ties half) and
    ``D = sum(pos) * sum(neg)``, on the noisy counts as released (negative cells kept):
    with independent zero-mean noise on the two histograms both ``U`` and ``D`` are unbiased,
    whereas clipping noisy cells at 0 would add positive mass to every empty bin and pull the
    estimate towards 0.5. It is the point estimate of :func:`auroc_interval`. None when a
    (noisy) class count is not positive.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos <= 0 or n_neg <= 0:
        return None
    return float(np.clip(pos @ _pair_weights(pos.size) @ neg / (n_pos * n_neg), 0.0, 1.0))


#: Confidence level of the intervals in ``metrics.json`` (``interval``).
INTERVAL_LEVEL = 0.95
#: A DP metric whose interval is wider than this (half the range of an AUROC or F1) says
#: nothing about the model: "noise swamps this release".
SWAMP_WIDTH = 0.5
_GRID = np.linspace(0.0, 1.0, 1001)


def _hull(grid: np.ndarray, ok: np.ndarray, *, hi: float) -> tuple[float, float]:
    """The accepted grid points' hull, widened by one grid step on each side (the true value
    may lie between two grid points), within [0, ``hi``]."""
    step = float(grid[1] - grid[0])
    return (round(max(0.0, float(grid[ok].min()) - step), 6),
            round(min(hi, float(grid[ok].max()) + step), 6))


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def auroc_interval(pos: np.ndarray, neg: np.ndarray, *, noise_std: float,
                   level: float = INTERVAL_LEVEL) -> tuple[float, float] | None:
    """Confidence interval for the AUROC of the exact histograms, from noisy ones.

    Fieller's method (test inversion of a ratio). Released are ``p = p0 + e`` and
    ``n = n0 + f`` with independent ``e, f ~ N(0, s^2 I)``, ``s = noise_std``. For a
    candidate AUROC ``t`` let ``W(t) = M - t J`` (``J`` all ones). Then
    ``T(t) = p @ W(t) @ n`` has mean ``U0 - t D0``, zero exactly at the true AUROC ``t0``,
    and variance ``s^2 (|W n0|^2 + |W' p0|^2) + s^4 |W|_F^2``; estimated from the noisy
    counts (``E |W n|^2 = |W n0|^2 + s^2 |W|_F^2``) it is
    ``s^2 (|W n|^2 + |W' p|^2) - s^4 |W|_F^2``, floored at ``s^4 |W|_F^2``. The interval
    is the hull (widened by one step) of every ``t`` in [0, 1] (step 0.001) with ``|T(t)| <= z sqrt(var)``: the
    AUROCs the release cannot reject at ``level``. When the release rejects them all (it is
    inconsistent with any AUROC at that level, which happens under heavy noise) it says
    nothing: [0, 1]. Noise only: the sampling of the validation patients is not included.

    Parameters
    ----------
    pos, neg : np.ndarray
        The summed (noisy) histograms of positives and negatives, same number of bins.
    noise_std : float
        Noise std of each summed cell (:func:`summed_std` of the releases'
        :func:`release_std`); 0 for exact releases (the interval is the point).
    level : float
        Confidence level.

    Returns
    -------
    tuple[float, float] | None
        ``(low, high)``; None when there is no AUROC to bound (exact release without both
        classes).
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if noise_std <= 0:
        point = auroc_from_histograms(pos, neg)
        return None if point is None else (point, point)
    s2 = float(noise_std) ** 2
    w = _pair_weights(pos.size)[None] - _GRID[:, None, None]  # [t, bins, bins]
    stat = np.einsum("i,tij,j->t", pos, w, neg)
    frob = (w ** 2).sum(axis=(1, 2))
    var = s2 * ((np.einsum("tij,j->ti", w, neg) ** 2).sum(1)
                + (np.einsum("i,tij->tj", pos, w) ** 2).sum(1)) - s2 ** 2 * frob
    var = np.maximum(var, s2 ** 2 * frob)
    ok = np.abs(stat) <= _z(level) * np.sqrt(var)
    if not ok.any():
        return (0.0, 1.0)
    return _hull(_GRID, ok, hi=1.0)


def ratio_interval(num: float, den: float, *, noise_std: float, level: float = INTERVAL_LEVEL,
                   hi: float = 1.0) -> tuple[float, float] | None:
    """Fieller interval for ``num0 / den0`` in [0, ``hi``] from ``num = num0 + N(0, s^2)``,
    ``den = den0 + N(0, s^2)`` (independent): every ``t`` with
    ``|num - t den| <= z s sqrt(1 + t^2)``; [0, ``hi``] when none is. None when no ratio is
    reported (exact release with ``den < 1``)."""
    if noise_std <= 0:
        if den < 1.0:
            return None
        v = float(np.clip(num / den, 0.0, hi))
        return (v, v)
    grid = _GRID * hi
    ok = np.abs(num - grid * den) <= _z(level) * noise_std * np.sqrt(1 + grid ** 2)
    if not ok.any():
        return (0.0, hi)
    return _hull(grid, ok, hi=hi)


def noise_swamps(interval: Sequence[float] | None, *, span: float = 1.0) -> bool:
    """The one rule for "noise swamps this release": an interval wider than
    :data:`SWAMP_WIDTH` of the metric's range ``span``."""
    return interval is not None and interval[1] - interval[0] > SWAMP_WIDTH * span


def metric_intervals(summed: dict[str, np.ndarray], markers: Sequence[str], *, noise_std: float,
                     loss_clip: float = DEFAULT_LOSS_CLIP,
                     level: float = INTERVAL_LEVEL) -> dict[str, Any]:
    """The :data:`INTERVAL_LEVEL` intervals of :func:`metrics_from_release`'s metrics.

    Returns
    -------
    dict
        ``level``, ``noise_std``, ``auroc`` / ``auroc_multimodal`` (marker -> ``[low, high]``
        or None), ``loss``, ``findings_f1``, ``rouge_l`` (``[low, high]`` or None), and
        ``swamped``: per AUROC mode the markers whose interval is wider than
        :data:`SWAMP_WIDTH`.
    """
    def ratio(num: str, den: str, scale: float = 1.0) -> list[float] | None:
        if num not in summed or den not in summed:
            return None
        iv = ratio_interval(float(np.asarray(summed[num]).sum()), float(np.asarray(summed[den]).sum()),
                            noise_std=noise_std, level=level)
        return None if iv is None else [iv[0] * scale, iv[1] * scale]

    out: dict[str, Any] = {
        "level": level, "noise_std": float(noise_std),
        "loss": ratio("loss", "count", scale=loss_clip),
        "findings_f1": ratio("findings_f1", "count_ref"),
        "rouge_l": ratio("rouge_l", "count_ref"),
    }
    swamped: dict[str, list[str]] = {}
    for mode in MODES:
        ivs: dict[str, list[float] | None] = {}
        for m in markers:
            key = f"hist/{mode}/{m}/pos"
            iv = (auroc_interval(summed[key], summed[f"hist/{mode}/{m}/neg"], noise_std=noise_std,
                                 level=level) if key in summed else None)
            ivs[m] = None if iv is None else [iv[0], iv[1]]
            if noise_swamps(iv):
                swamped.setdefault(mode, []).append(m)
        out[mode] = ivs
    out["swamped"] = swamped
    return out


def metrics_from_release(
    summed: dict[str, np.ndarray], markers: Sequence[str], *, loss_clip: float = DEFAULT_LOSS_CLIP
) -> dict[str, Any]:
    """The metrics ``metrics.json`` reports, from (summed) noisy aggregates.

    Returns
    -------
    dict
        ``n`` (noisy count), ``loss`` (mean clipped loss), ``auroc`` and
        ``auroc_multimodal`` (marker -> AUROC or None), ``findings_f1``, ``rouge_l``.
    """
    def ratio(num: str, den: str, scale: float = 1.0, hi: float = 1.0) -> float | None:
        if num not in summed or den not in summed:
            return None
        d = float(np.asarray(summed[den]).sum())
        if d < 1.0:
            return None
        return float(np.clip(float(np.asarray(summed[num]).sum()) / d, 0.0, hi) * scale)

    out: dict[str, Any] = {
        "n": max(0.0, float(np.asarray(summed.get("count", [0.0])).sum())),
        "loss": ratio("loss", "count", scale=loss_clip),
        "findings_f1": ratio("findings_f1", "count_ref"),
        "rouge_l": ratio("rouge_l", "count_ref"),
    }
    for mode in MODES:
        out[mode] = {m: (auroc_from_histograms(summed[f"hist/{mode}/{m}/pos"],
                                               summed[f"hist/{mode}/{m}/neg"])
                         if f"hist/{mode}/{m}/pos" in summed else None) for m in markers}
    return out
