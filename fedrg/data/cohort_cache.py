"""A validated cohort cached in the hospital's state directory, keyed by its content.

Reading and validating a cohort (decoding every DICOM/NIfTI image) costs seconds per
process. A simulated hospital is answered by several Ray actors and a deployed one by a
fresh process per Flower message, so each used to parse every cohort again. This module
keeps the *validated* result (decoded arrays, manifest rows) as one ``.npz`` file in the
hospital's own state directory (``cohort-cache/``, mode 0700; files 0600) and reuses it
only while every file under the cohort directory is byte-for-byte the same (SHA-256 over
relative path, size and content) and the data config is the same.

The cache holds derived patient data: it lives in the state directory, which stays on site
and is never sent anywhere (the public ledger copy names its files explicitly). It is loaded
with ``allow_pickle=False``: a damaged or foreign file is ignored and rebuilt, never executed.
A cohort with problems is never cached, so every problem is reported on every load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from fedrg.config import DataConfig
from fedrg.data.cohort import Cohort, ManifestRow, load_cohort

log = logging.getLogger("fedrg.data")

CACHE_DIR = "cohort-cache"
FORMAT = 2  # 2: expression normalised with public per-gene constants
_ARRAYS = ("expression", "has_genomics", "mutations", "markers")


def cohort_digest(path: str | Path, data_cfg: DataConfig) -> str:
    """SHA-256 over every file under the cohort (relative path, size, bytes) and the data config."""
    root = Path(path)
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "data": data_cfg.model_dump(mode="json")},
                        sort_keys=True).encode())
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(root).as_posix()
        data = p.read_bytes()
        h.update(f"\0{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _save(cohort: Cohort, target: Path) -> None:
    rows = [[r.row, r.patient_id, r.image, r.report, list(r.markers)] for r in cohort.rows]
    arrays = {f"image_{i}": np.asarray(img) for i, img in enumerate(cohort.images)}
    arrays.update({name: np.asarray(getattr(cohort, name)) for name in _ARRAYS})
    arrays["rows_json"] = np.array(json.dumps(rows))
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _load(target: Path, root: Path, data_cfg: DataConfig) -> Cohort:
    with np.load(target, allow_pickle=False) as z:
        rows = [ManifestRow(row=int(r[0]), patient_id=str(r[1]), image=str(r[2]),
                            report=str(r[3]), markers=tuple(float(m) for m in r[4]))
                for r in json.loads(str(z["rows_json"]))]
        images = [z[f"image_{i}"] for i in range(len(rows))]
        arrays = {name: z[name] for name in _ARRAYS}
    if any(len(a) != len(rows) for a in arrays.values()):
        raise ValueError("cached cohort arrays disagree with its rows")
    return Cohort(root=root, data_cfg=data_cfg, rows=rows, images=images, **arrays)


def load_cohort_cached(path: str | Path, data_cfg: DataConfig,
                       state_dir: str | Path | None) -> Cohort:
    """:func:`fedrg.data.cohort.load_cohort`, reusing a cached result of identical content.

    Parameters
    ----------
    path
        The cohort directory.
    data_cfg
        The data config it is read with (part of the cache key).
    state_dir
        The hospital's state directory; ``None`` reads the cohort without a cache.

    Returns
    -------
    Cohort
        Equal to what :func:`~fedrg.data.cohort.load_cohort` returns for the same files.

    Raises
    ------
    CohortError
        As :func:`~fedrg.data.cohort.load_cohort` (problems are never cached).
    """
    if state_dir is None:
        return load_cohort(path, data_cfg)
    root = Path(path)
    try:
        digest = cohort_digest(root, data_cfg)
    except OSError:
        return load_cohort(path, data_cfg)  # reports the unreadable file properly
    target = Path(state_dir) / CACHE_DIR / f"{digest[:40]}.npz"
    if target.is_file():
        try:
            return _load(target, root, data_cfg)
        except Exception as err:  # damaged cache: rebuild it from the cohort
            log.warning("ignoring the damaged cohort cache %s (%s); reading the cohort", target, err)
    cohort = load_cohort(path, data_cfg)
    try:
        for old in target.parent.glob("*.npz"):  # one cached version per state dir
            if old != target:
                old.unlink()
        _save(cohort, target)
    except OSError as err:
        log.warning("could not write the cohort cache %s (%s); it is rebuilt next time", target, err)
    return cohort
