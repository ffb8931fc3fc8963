"""The data seam: :class:`CohortLoader` gives a hospital its training and validation data.

A loader returns a :class:`SiteData`: two sized datasets whose items are dict records that
satisfy the model's declared schema (:mod:`fedrg.data.schema`; a missing field is a
:class:`~fedrg.errors.RecordSchemaError` naming it when training starts, never a skipped
batch), and a fingerprint of the data recorded in the privacy ledger. The built-in user is
:class:`DiskCohortLoader` (the validated on-disk cohort of ``site.cohort``).

A loader never decides privacy: the hospital's site policy sets DP-SGD and secure
aggregation, and the sample rate comes from ``len(train)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from fedrg.config import DataConfig, SiteConfig
from fedrg.data.schema import RecordDataset

__all__ = ["DEFAULT_COHORT_LOADER", "CohortLoader", "DiskCohortLoader", "SiteData"]


@dataclass
class SiteData:
    """One hospital's data for one data config.

    Parameters
    ----------
    train, val
        Sized datasets of dict records (:class:`~fedrg.data.schema.RecordDataset`: ``len``
        and ``__getitem__``). Datasets that also offer ``empty_batch()`` keep empty Poisson
        batches shaped.
    fingerprint
        Identifies the data (e.g. a hash of the manifest); recorded in the ledger.
    """

    train: RecordDataset
    val: RecordDataset
    fingerprint: str


@runtime_checkable
class CohortLoader(Protocol):
    """Loads a hospital's data; called once per data config and cached by the site."""

    def load(self, site: SiteConfig, data_cfg: DataConfig) -> SiteData:
        """Return the site's train/validation datasets for ``data_cfg``."""
        ...


class DiskCohortLoader:
    """The built-in loader: validate ``site.cohort`` on disk (cached in the site's state
    directory by content), split it by the site policy's ``val_fraction`` / ``split_seed``."""

    def load(self, site: SiteConfig, data_cfg: DataConfig) -> SiteData:
        """Load and validate the cohort directory, split with the site policy's seed and fraction.

        Raises
        ------
        CohortError
            Listing every problem in the cohort directory.
        """
        from fedrg.data.cohort_cache import load_cohort_cached
        from fedrg.data.dataset import CohortDataset, split_indices

        # parsed once per content: a cache in the state dir serves later processes
        cohort = load_cohort_cached(site.cohort, data_cfg, site.state_dir)
        # the site's own split (its policy; a hash of the patient id, never the labels)
        train_idx, val_idx = split_indices(cohort, data_cfg, val_fraction=site.policy.val_fraction,
                                           split_seed=site.policy.split_seed)
        manifest = Path(site.cohort) / "manifest.csv"
        fingerprint = hashlib.sha256(manifest.read_bytes()).hexdigest()
        return SiteData(CohortDataset(cohort, data_cfg, train_idx),
                        CohortDataset(cohort, data_cfg, val_idx), fingerprint)

    def __repr__(self) -> str:
        return "DiskCohortLoader()"


#: What :class:`~fedrg.hospital.site.HospitalSite` uses when given no loader.
DEFAULT_COHORT_LOADER: CohortLoader = DiskCohortLoader()
