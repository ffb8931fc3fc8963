"""``fedrg import``: GDC download + DICOM series -> a cohort that ``fedrg validate`` accepts."""

from __future__ import annotations

import csv
import json
import math

import pytest
from gdc_fixtures import star_counts, write_dicom_folder, write_gdc_download
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.config import DataConfig
from fedrg.data.genomics import read_variants
from fedrg.data.importers import import_gdc
from fedrg.data.validate import validate_cohort
from fedrg.errors import DataImportError

CFG = DataConfig(image_shape=[32, 32])


@pytest.fixture
def download(tmp_path):
    return write_gdc_download(tmp_path, CFG), write_dicom_folder(tmp_path)


def _manifest(cohort):
    with (cohort / "manifest.csv").open() as fh:
        return {r["patient_id"]: r for r in csv.DictReader(fh)}


def test_import_matches_cases_and_reports_every_unmatched_one(tmp_path, download):
    gdc, dicom = download
    out = tmp_path / "cohort"
    report = import_gdc(gdc, dicom, out, CFG, marker_columns={"mgmt_methylated": "mgmt_status"},
                        series_description="FLAIR")
    assert report.patients == ["TCGA-AA-0001", "TCGA-AA-0002"]
    unmatched = {(u.case, u.source): u.reason for u in report.unmatched}
    assert set(unmatched) == {("TCGA-AA-0003", "GDC"), ("TCGA-ZZ-9999", "DICOM")}
    assert "no DICOM series" in unmatched[("TCGA-AA-0003", "GDC")]
    assert "matches no GDC case" in unmatched[("TCGA-ZZ-9999", "DICOM")]
    assert any("Solid Tissue Normal" in n for n in report.notes)
    assert any("TCGA-AA-0001: 2 series; chose 'AX FLAIR'" in n for n in report.notes)
    saved = json.loads((out / "import_report.json").read_text())
    assert [u["case"] for u in saved["unmatched"]] == ["TCGA-AA-0003", "TCGA-ZZ-9999"]

    rows = _manifest(out)
    # IDH from the MAF (IDH1 R132H in case 1; case 2 covered, no IDH call); MGMT from clinical
    assert rows["TCGA-AA-0001"]["idh_mutant"] == "1" and rows["TCGA-AA-0002"]["idh_mutant"] == "0"
    assert rows["TCGA-AA-0001"]["mgmt_methylated"] == "1" and rows["TCGA-AA-0002"]["mgmt_methylated"] == ""
    assert rows["TCGA-AA-0001"]["codeletion_1p19q"] == ""
    assert len(list((out / rows["TCGA-AA-0001"]["image"]).iterdir())) == 3  # the FLAIR series only

    problems: list = []
    calls = read_variants(out / "genomics" / "variants.vcf", list(CFG.mutation_genes), problems=problems)
    assert not problems
    got = {s: {g for g, v in zip(calls.genes, calls.indicators[i], strict=True) if v}
           for i, s in enumerate(calls.samples)}
    # silent ATRX and EGFR calls are dropped, the frame-shift ATRX and the TERT promoter kept
    assert got == {"TCGA-AA-0001": {"IDH1", "TP53", "ATRX"}, "TCGA-AA-0002": {"TERT"}}

    result = validate_cohort(out, CFG)
    assert result.ok, [str(p) for p in result.problems]
    assert result.summary.patients == 2 and result.summary.genes_found == list(CFG.gene_panel)
    tpm = result.cohort.expression  # standardised: finite, centred
    assert tpm.shape == (2, len(CFG.gene_panel)) and not any(math.isnan(v) for v in tpm.ravel())


def test_cli_import_then_validate(tmp_path, download):
    gdc, dicom = download
    out = tmp_path / "cli-cohort"
    runner = CliRunner()
    res = runner.invoke(app, ["import", str(gdc), "--dicom", str(dicom), "--out", str(out),
                              "--marker", "mgmt_methylated=mgmt_status", "--set", "data.image_shape=[32,32]"])
    assert res.exit_code == 0, res.output
    assert "2 patients" in res.output and "TCGA-ZZ-9999 (DICOM)" in res.output
    assert "TCGA-AA-0003 (GDC): no DICOM series" in res.output
    res = runner.invoke(app, ["validate", str(out), "--set", "data.image_shape=[32,32]"])
    assert res.exit_code == 0, res.output
    assert "cohort is valid" in res.output


def test_a_star_file_without_the_value_column_names_file_and_column(tmp_path, download):
    gdc, dicom = download
    star = sorted(gdc.rglob("*.augmented_star_gene_counts.tsv"))[0]
    star.write_text(star_counts({"EGFR": 1.0}, drop_column="tpm_unstranded"))
    with pytest.raises(DataImportError) as err:
        import_gdc(gdc, dicom, tmp_path / "c", CFG)
    msg = str(err.value)
    assert star.name in msg and "tpm_unstranded" in msg and "download the\nfile again" not in msg
    assert "header lacks column(s) tpm_unstranded" in msg
    assert not (tmp_path / "c").exists()


def test_bad_values_name_file_row_column_and_fix(tmp_path):
    gdc = write_gdc_download(tmp_path, CFG, start_position="7675O88",
                             clinical_mgmt={"TCGA-AA-0002": "maybe"})
    dicom = write_dicom_folder(tmp_path)
    star = next(p for p in sorted(gdc.rglob("*.tsv")) if "star" in p.name)
    star.write_text(star_counts({g: 2.0 for g in CFG.gene_panel}, bad="-3"))
    with pytest.raises(DataImportError) as err:
        import_gdc(gdc, dicom, tmp_path / "c", CFG, marker_columns={"mgmt_methylated": "mgmt_status"})
    msg = str(err.value)
    assert "maf.gz, row 6: column Start_Position: '7675O88' is not an integer" in msg
    assert f"{star}, row" in msg and "column tpm_unstranded, gene EGFR: value '-3'" in msg
    assert "clinical.tsv, row" in msg and "column mgmt_status, case TCGA-AA-0002: value 'maybe'" in msg
    assert "use yes/no" in msg
    assert not (tmp_path / "c").exists()


def test_missing_sample_sheet_and_unlisted_files_are_errors(tmp_path, download):
    gdc, dicom = download
    sheet = next(gdc.glob("gdc_sample_sheet*.tsv"))
    lines = sheet.read_text().splitlines()
    sheet.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # drop the first expression file
    with pytest.raises(DataImportError, match="is not in the sample sheet, so its case is unknown"):
        import_gdc(gdc, dicom, tmp_path / "c", CFG)
    sheet.unlink()
    with pytest.raises(DataImportError, match="no GDC sample sheet"):
        import_gdc(gdc, dicom, tmp_path / "c", CFG)


def test_never_overwrites_an_existing_folder(tmp_path, download):
    gdc, dicom = download
    out = tmp_path / "taken"
    out.mkdir()
    (out / "manifest.csv").write_text("keep me\n")
    with pytest.raises(DataImportError, match="never overwrites"):
        import_gdc(gdc, dicom, out, CFG)
    assert (out / "manifest.csv").read_text() == "keep me\n"


def test_a_corrupt_dicom_file_is_named(tmp_path, download):
    gdc, dicom = download
    victim = sorted(dicom.rglob("*.dcm"))[0]
    victim.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(7, 250)) * 3)  # preamble, then garbage
    # pydicom parses what it can of a damaged file; the importer then names it for its empty tags
    with pytest.raises(DataImportError, match=rf"{victim.name}: DICOM tag PatientID is empty"):
        import_gdc(gdc, dicom, tmp_path / "c", CFG)
