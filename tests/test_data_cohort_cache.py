"""The content-keyed cohort cache returns exactly what a fresh read returns."""

from __future__ import annotations

import csv
import io
import math
import stat

import numpy as np
import pytest

from fedrg.config import DataConfig
from fedrg.data import cohort_cache
from fedrg.data.cohort import load_cohort
from fedrg.data.cohort_cache import CACHE_DIR, load_cohort_cached
from fedrg.data.synth import synthesize
from fedrg.errors import CohortError


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cc"), hospitals=1, patients=10, seed=3)[0]


def _same(a, b) -> None:
    assert a.rows == b.rows or all(  # NaN markers compare unequal: check them field by field
        (x.row, x.patient_id, x.image, x.report) == (y.row, y.patient_id, y.image, y.report)
        and all((math.isnan(m) and math.isnan(n)) or m == n for m, n in zip(x.markers, y.markers, strict=True))
        for x, y in zip(a.rows, b.rows, strict=True))
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    for name in ("expression", "has_genomics", "mutations", "markers"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.root == b.root and a.data_cfg == b.data_cfg


def test_cached_cohort_equals_a_fresh_read_and_skips_parsing(cohort_dir, tmp_path, monkeypatch):
    cfg = DataConfig()
    fresh = load_cohort(cohort_dir, cfg)
    first = load_cohort_cached(cohort_dir, cfg, tmp_path)
    _same(first, fresh)
    (cached,) = (tmp_path / CACHE_DIR).glob("*.npz")
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / CACHE_DIR).stat().st_mode) == 0o700

    def refuse(*_a, **_k):
        raise AssertionError("parsed the cohort again despite an up-to-date cache")

    monkeypatch.setattr(cohort_cache, "load_cohort", refuse)
    _same(load_cohort_cached(cohort_dir, cfg, tmp_path), fresh)


def test_changed_file_or_config_is_read_again(cohort_dir, tmp_path):
    cfg = DataConfig()
    load_cohort_cached(cohort_dir, cfg, tmp_path)
    other = DataConfig(val_fraction=0.5)
    digest_a = cohort_cache.cohort_digest(cohort_dir, cfg)
    assert cohort_cache.cohort_digest(cohort_dir, other) != digest_a
    manifest = cohort_dir / "manifest.csv"
    original = manifest.read_bytes()
    try:
        rows = list(csv.DictReader(io.StringIO(original.decode())))
        rows[-1]["report"] = "edited report"  # same file name, same patients, new content
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        manifest.write_text(out.getvalue())
        assert cohort_cache.cohort_digest(cohort_dir, cfg) != digest_a
        got = load_cohort_cached(cohort_dir, cfg, tmp_path)
        _same(got, load_cohort(cohort_dir, cfg))
        assert got.rows[-1].report == "edited report"
        assert len(list((tmp_path / CACHE_DIR).glob("*.npz"))) == 1  # the stale copy is gone
    finally:
        manifest.write_bytes(original)


def test_damaged_cache_is_rebuilt(cohort_dir, tmp_path):
    cfg = DataConfig()
    load_cohort_cached(cohort_dir, cfg, tmp_path)
    (cached,) = (tmp_path / CACHE_DIR).glob("*.npz")
    cached.write_bytes(b"PK\x03\x04 not really a zip")
    _same(load_cohort_cached(cohort_dir, cfg, tmp_path), load_cohort(cohort_dir, cfg))
    np.load(cached, allow_pickle=False).close()  # rewritten as a valid archive


def test_bad_cohort_is_never_cached(cohort_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.csv").write_text("patient_id,image\np1,missing.nii.gz\n")
    state = tmp_path / "state"
    for _ in range(2):
        with pytest.raises(CohortError, match="missing"):
            load_cohort_cached(bad, DataConfig(), state)
    assert not list(state.glob(f"{CACHE_DIR}/*.npz"))
