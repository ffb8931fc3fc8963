"""Torch dataset, collate and the deterministic train/validation split over a cohort."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedrg.config import DataConfig
from fedrg.data.manifest import Cohort

TENSOR_KEYS = ("image", "expression", "mutations", "has_genomics", "markers", "marker_mask")
LIST_KEYS = ("report", "patient_id")


class CohortDataset(Dataset):
    """One item per patient of a validated :class:`~fedrg.data.cohort.Cohort`.

    Items are dicts: ``image`` float32 ``[1,H,W]`` / ``[1,D,H,W]`` (intensities in [0, 1]),
    ``expression`` ``[G]``, ``mutations`` ``[M]``, ``has_genomics`` scalar, ``markers`` ``[K]``
    (0 where unknown), ``marker_mask`` ``[K]`` (1 known, 0 unknown), ``report`` str,
    ``patient_id`` str.

    Parameters
    ----------
    cohort:
        From :func:`fedrg.data.cohort.load_cohort`.
    data_cfg:
        Must describe the same shapes the cohort was loaded with.
    indices:
        Subset of patients (positions in the cohort); ``None`` = all.
    """

    def __init__(self, cohort: Cohort, data_cfg: DataConfig,
                 indices: Sequence[int] | None = None):
        self.cohort = cohort
        self.data_cfg = data_cfg
        n = len(cohort)
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"indices {bad[:5]} out of range for a cohort of {n} patients")
        if cohort.images and list(cohort.images[0].shape[1:]) != list(data_cfg.image_shape):
            raise ValueError(
                f"cohort images have shape {list(cohort.images[0].shape[1:])} but "
                f"data.image_shape={data_cfg.image_shape}; load the cohort with this data config"
            )
        if cohort.expression.shape[1] != len(data_cfg.gene_panel):
            raise ValueError("cohort gene panel differs from data.gene_panel; reload the cohort")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.indices[i]
        c = self.cohort
        markers = c.markers[j]
        known = ~np.isnan(markers)
        return {
            "image": torch.from_numpy(np.array(c.images[j], dtype=np.float32)),
            "expression": torch.from_numpy(np.array(c.expression[j], dtype=np.float32)),
            "mutations": torch.from_numpy(np.array(c.mutations[j], dtype=np.float32)),
            "has_genomics": torch.tensor(float(c.has_genomics[j]), dtype=torch.float32),
            "markers": torch.from_numpy(np.where(known, markers, 0.0).astype(np.float32)),
            "marker_mask": torch.from_numpy(known.astype(np.float32)),
            "report": c.rows[j].report,
            "patient_id": c.rows[j].patient_id,
        }

    def empty_batch(self) -> dict[str, Any]:
        """A collated batch of size 0 with the right trailing shapes (for empty Poisson batches)."""
        return empty_batch(self.data_cfg)

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        """How this dataset's items become a batch (:func:`collate_samples`); the DP-SGD
        session and the training loop ask the dataset, never check its type."""
        return collate_samples(items)

    def markers_array(self) -> np.ndarray:
        """``[len, K]`` marker values with NaN for unknown (for metrics)."""
        return self.cohort.markers[self.indices]


def empty_batch(data_cfg: DataConfig) -> dict[str, Any]:
    """A collated batch of size 0 for ``data_cfg``'s shapes."""
    g, m, k = len(data_cfg.gene_panel), len(data_cfg.mutation_genes), len(data_cfg.markers)
    return {
        "image": torch.zeros((0, 1, *data_cfg.image_shape), dtype=torch.float32),
        "expression": torch.zeros((0, g), dtype=torch.float32),
        "mutations": torch.zeros((0, m), dtype=torch.float32),
        "has_genomics": torch.zeros((0,), dtype=torch.float32),
        "markers": torch.zeros((0, k), dtype=torch.float32),
        "marker_mask": torch.zeros((0, k), dtype=torch.float32),
        "report": [],
        "patient_id": [],
    }


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack item tensors into a batch; ``report`` and ``patient_id`` become lists of str.

    An empty list cannot know its shapes: use :meth:`CohortDataset.empty_batch` instead.
    """
    if not items:
        raise ValueError("collate_samples got no items; use CohortDataset.empty_batch()")
    out: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in TENSOR_KEYS}
    for k in LIST_KEYS:
        out[k] = [str(it[k]) for it in items]
    return out


def split_indices(cohort: Cohort, data_cfg: DataConfig, *, val_fraction: float | None = None,
                  split_seed: int | None = None) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split that depends on patient ids only, never on labels.

    Patient ``p`` goes to validation when ``sha256(f"{split_seed}:{p}")``, read as a number in
    [0, 1), is below ``val_fraction``: each patient's side depends on its own id and the
    site's seed alone, so adding, removing or relabelling one patient moves no other patient
    (the DP argument needs this). Only in a cohort of >= 2 patients where one side would be
    empty does the patient with the smallest (or largest) hash move over.

    Parameters
    ----------
    cohort : Cohort
        The validated cohort.
    data_cfg : DataConfig
        Default ``val_fraction`` and ``split_seed`` (a site passes its policy's instead).
    val_fraction, split_seed : optional
        Override the data config (the hospital's policy fixes both).

    Returns
    -------
    tuple[list[int], list[int]]
        Sorted train and validation positions.
    """
    frac = data_cfg.val_fraction if val_fraction is None else float(val_fraction)
    seed = data_cfg.split_seed if split_seed is None else int(split_seed)
    u = [split_point(seed, pid) for pid in cohort.patient_ids]
    n = len(u)
    val = {i for i in range(n) if u[i] < frac}
    if n >= 2:
        if not val:
            val = {min(range(n), key=u.__getitem__)}
        elif len(val) == n:
            val.discard(max(range(n), key=u.__getitem__))
    train = [i for i in range(n) if i not in val]
    return train, sorted(val)


def split_point(split_seed: int, patient_id: str) -> float:
    """Where patient ``patient_id`` falls in [0, 1) under ``split_seed`` (sha256 of both)."""
    digest = hashlib.sha256(f"{int(split_seed)}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
