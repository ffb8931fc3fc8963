"""Load a hospital cohort: :func:`load_cohort` (validate every file, or raise).

The manifest format and the :class:`Cohort` record live in :mod:`fedrg.data.manifest`,
validation in :mod:`fedrg.data.validate`; this module sits above both (no import cycle)
and re-exports the names callers use.
"""

from __future__ import annotations

from pathlib import Path

from fedrg.config import DataConfig
from fedrg.data.manifest import (
    EXPRESSION,
    MANIFEST,
    REQUIRED_COLUMNS,
    VARIANTS,
    Cohort,
    ManifestRow,
    parse_marker,
    read_manifest,
)
from fedrg.data.validate import validate_cohort
from fedrg.errors import CohortError

__all__ = [
    "EXPRESSION",
    "MANIFEST",
    "REQUIRED_COLUMNS",
    "VARIANTS",
    "Cohort",
    "ManifestRow",
    "load_cohort",
    "parse_marker",
    "read_manifest",
]


def load_cohort(path: str | Path, data_cfg: DataConfig) -> Cohort:
    """Read and validate a cohort directory.

    Raises
    ------
    CohortError
        Listing every problem found (file and row for each).
    """
    result = validate_cohort(path, data_cfg)
    if result.problems or result.cohort is None:
        raise CohortError(str(path), result.problems)
    return result.cohort
