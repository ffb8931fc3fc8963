"""Torch dataset, collate and the deterministic train/validation split over a cohort."""

from __future__ import annotations

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


def split_indices(cohort: Cohort, data_cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split of one cohort, stratified on IDH when known.

    Each stratum (IDH 0, IDH 1, IDH unknown; the first marker when ``idh_mutant`` is not
    configured) is shuffled with ``data_cfg.split_seed`` and ``round(val_fraction * size)``
    of it goes to validation. Both parts are non-empty when the cohort has >= 2 patients.

    Returns
    -------
    tuple[list[int], list[int]]
        Sorted train and validation positions.
    """
    n = len(cohort)
    k = data_cfg.markers.index("idh_mutant") if "idh_mutant" in data_cfg.markers else 0
    col = cohort.markers[:, k] if n else np.zeros(0)
    strata = np.where(np.isnan(col), 2, col).astype(int)
    rng = np.random.default_rng([data_cfg.split_seed, 0x5917])
    val: list[int] = []
    for s in (0, 1, 2):
        members = np.flatnonzero(strata == s)
        if members.size == 0:
            continue
        members = members[rng.permutation(members.size)]
        take = round(data_cfg.val_fraction * members.size)
        val.extend(int(i) for i in members[:take])
    if n >= 2:
        order = [int(i) for i in rng.permutation(n)]
        if not val:
            val = [order[0]]
        elif len(val) == n:
            val.remove(order[0])
    val_set = set(val)
    train = [i for i in range(n) if i not in val_set]
    return train, sorted(val_set)
