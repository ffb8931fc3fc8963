"""Readers: expression table, VCF, image registry, resampling and normalisation."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedrg.config import DEFAULT_GENE_PANEL, DataConfig
from fedrg.data import images
from fedrg.data.genomics import (
    PUBLIC_EXPRESSION_CENTRE,
    PUBLIC_EXPRESSION_SCALE,
    _measure_public_constants,
    gene_of_record,
    read_expression,
    read_variants,
    standardise_expression,
)
from fedrg.errors import ImageReadError, Problem


def test_expression_reads_panel_in_order_and_reports_rows(tmp_path):
    p = tmp_path / "e.tsv"
    p.write_text("patient_id\tB\tA\tX\na\t1\t2\t-\nb\t3\tx\t5\nc\t-1\t4\t1\na\t1\t1\t1\n")
    problems: list[Problem] = []
    t = read_expression(p, ["A", "B", "C"], impute_missing_genes=False, problems=problems, display="e.tsv")
    assert t is not None and t.patient_ids == ["a", "b", "c"]
    assert t.values[0].tolist()[:2] == [2.0, 1.0] and np.isnan(t.values[0, 2])
    msgs = [str(q) for q in problems]
    assert any("e.tsv, row 1" in m and "C" in m and "impute_missing_genes" in m for m in msgs)
    assert any("e.tsv, row 3" in m and "'x'" in m for m in msgs)
    assert any("e.tsv, row 4" in m and "negative" in m for m in msgs)
    assert any("e.tsv, row 5" in m and "duplicate" in m for m in msgs)
    assert not any("'-'" in m for m in msgs)  # non-panel column X is not checked


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 20), st.integers(1, 6)),
              elements=st.floats(0, 1e5, allow_nan=False)),
       st.data())
def test_standardise_is_per_record_public_constants(values, data):
    """Each record is normalised on its own: log1p and public constants per gene; one
    patient's values never change another patient's record."""
    genes = list(DEFAULT_GENE_PANEL[: values.shape[1]])
    z = standardise_expression(values, genes)
    assert z.dtype == np.float32 and np.isfinite(z).all()
    logv = np.log1p(values)
    centre = np.array([PUBLIC_EXPRESSION_CENTRE[g] for g in genes])
    scale = np.array([PUBLIC_EXPRESSION_SCALE[g] for g in genes])
    expected = (logv - centre) / scale
    assert np.allclose(z, expected, atol=1e-4, rtol=1e-5)
    # differential: change (or drop) one patient; every other record stays identical
    i = data.draw(st.integers(0, values.shape[0] - 1))
    other = values.copy()
    other[i] = data.draw(arrays(np.float64, values.shape[1], elements=st.floats(0, 1e5, allow_nan=False)))
    z2 = standardise_expression(other, genes)
    keep = [k for k in range(values.shape[0]) if k != i]
    assert np.array_equal(z[keep], z2[keep])
    assert np.array_equal(standardise_expression(np.delete(values, i, 0), genes), z[keep])


def test_public_expression_constants_are_reproducible():
    """The constants in code are what the public synthetic generator gives (seed 99)."""
    centre, scale = _measure_public_constants()
    assert centre == [PUBLIC_EXPRESSION_CENTRE[g] for g in DEFAULT_GENE_PANEL]
    assert scale == [PUBLIC_EXPRESSION_SCALE[g] for g in DEFAULT_GENE_PANEL]


def test_vcf_genotypes_filters_and_gene_lookup(tmp_path):
    vcf = tmp_path / "v.vcf.gz"
    body = (
        "##fileformat=VCFv4.2\n"
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\ts1\ts2\ts3\n"
        "2\t208248389\t.\tC\tT\t.\t.\t.\tGT\t0|1\t0/0\t./.\n"  # IDH1 by coordinate, no chr
        "chr17\t7673802\t.\tC\tT\t50\tPASS\tANN=T|missense|MODERATE|TP53|x\tDP:GT\t9:0/0\t9:1/1\t9:0\n"
        "chr7\t55152546\t.\tC\tT\t5\tLowQual\tGENE=EGFR\tGT\t1/1\t1/1\t1/1\n"
        "chr5\t1295113\t.\tG\tA\t50\tPASS\tGENE=TERT\tGT\t0/0\t0/0\n"  # truncated line
    )
    vcf.write_bytes(gzip.compress(body.encode(), mtime=0))
    problems: list[Problem] = []
    calls = read_variants(vcf, ["IDH1", "TP53", "EGFR", "TERT"], problems=problems, display="v")
    assert calls is not None and calls.samples == ["s1", "s2", "s3"]
    assert calls.indicators.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert [str(p) for p in problems] == ["v, row 6: has 11 fields, expected 12 (truncated line?)"]


def test_gene_of_record_prefers_annotation():
    assert gene_of_record("chr2", 208248389, "GENE=FOO") == {"FOO"}
    assert gene_of_record("chr2", 208248389, ".") == {"IDH1"}
    assert gene_of_record("chr2", 1, ".") == set()


def test_vcf_bad_header(tmp_path):
    p = tmp_path / "v.vcf"
    p.write_text("not a vcf\n")
    problems: list[Problem] = []
    assert read_variants(p, ["IDH1"], problems=problems) is None
    assert "fileformat" in str(problems[0])


# --------------------------------------------------------------------------- images

def test_registry_is_pluggable(tmp_path):
    p = tmp_path / "img.raw16"
    np.arange(64 * 48, dtype=np.uint16).reshape(64, 48).tofile(p)
    with pytest.raises(ImageReadError, match="no reader"):
        images.read_image(p)
    images.register_reader([".raw16"], lambda q: np.fromfile(q, np.uint16).reshape(64, 48))
    try:
        out = images.load_image(p, DataConfig())
        assert out.shape == (1, 64, 64) and out.max() == 1.0 and out.min() == 0.0
    finally:
        images._READERS.pop(".raw16")


def test_png_npy_and_corrupt_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((30, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / "c.png")
    assert images.read_image(tmp_path / "c.png").shape == (30, 20)
    png = (tmp_path / "c.png").read_bytes()
    (tmp_path / "t.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        images.read_image(tmp_path / "t.png")
    np.save(tmp_path / "v.npy", np.full((3, 4, 5), np.nan))
    with pytest.raises(ImageReadError, match="NaN"):
        images.read_image(tmp_path / "v.npy")
    (tmp_path / "bad.nii").write_bytes(b"\x00" * 100)
    with pytest.raises(ImageReadError, match="bad.nii"):
        images.read_image(tmp_path / "bad.nii")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="empty"):
        images.read_image(tmp_path / "empty")


def test_dicom_folder_with_two_series_is_refused(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    d = tmp_path / "s"
    d.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), d / "a.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), d / "b.dcm")
    with pytest.raises(ImageReadError, match="2 DICOM series|mixes slice shapes"):
        images.read_image(d)


def test_prepare_image_modes_and_middle_slice():
    vol = np.zeros((9, 20, 30), np.float32)
    vol[4, 5:15, 10:20] = 100.0  # only the middle axial slice has the lesion
    two = images.prepare_image(vol, DataConfig(image_mode="2d", image_shape=[20, 30]))
    assert two.shape == (1, 20, 30) and two.max() == 1.0
    three = images.prepare_image(vol, DataConfig(image_mode="3d", image_shape=[9, 20, 30]))
    assert three.shape == (1, 9, 20, 30) and three[0, 0].max() == 0.0
    flat = images.prepare_image(np.ones((10, 10)), DataConfig(image_mode="3d", image_shape=[8, 8, 8]))
    assert flat.shape == (1, 8, 8, 8) and not flat.any()


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 1000), st.floats(-500, 500))
def test_normalisation_removes_scale_and_offset(scale, offset):
    x = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    a = images.normalise_intensity(x)
    b = images.normalise_intensity(x * np.float32(scale) + np.float32(offset))
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_supported_suffixes_cover_the_format():
    s = images.supported_suffixes()
    for suffix in (".nii", ".nii.gz", ".dcm", ".png", ".npy"):
        assert suffix in s
    assert images.reader_for(Path("x.NII.GZ")) is images.read_nifti
