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


# ---------------------------------------------------------------- both sample-sheet layouts

@pytest.mark.parametrize("layout", ["old", "new"])
def test_both_sample_sheet_layouts_give_the_same_cohort(tmp_path, layout):
    """The current GDC portal's sheet (Tissue Type, Tumor Descriptor, Specimen Type,
    Preservation Method; no Sample Type) and the older one (Sample Type) mean the same:
    normal tissue is skipped, a primary tumour preferred over a recurrence."""
    gdc = write_gdc_download(tmp_path, CFG, layout=layout, recurrence=True)
    dicom = write_dicom_folder(tmp_path)
    header = next(gdc.glob("gdc_sample_sheet*.tsv")).read_text().splitlines()[0].split("\t")
    assert ("Sample Type" in header) == (layout == "old")
    out = tmp_path / "cohort"
    report = import_gdc(gdc, dicom, out, CFG, marker_columns={"mgmt_methylated": "mgmt_status"})
    assert report.patients == ["TCGA-AA-0001", "TCGA-AA-0002"]
    normal = "Solid Tissue Normal" if layout == "old" else "Normal, Solid Tissue, Frozen"
    assert any(n.startswith(f"TCGA-AA-0001: skipped {normal} expression file") for n in report.notes)
    chose = [n for n in report.notes if n.startswith("TCGA-AA-0002: several tumour")]
    assert len(chose) == 1 and "using sample TCGA-AA-0002-01A" in chose[0], report.notes
    assert ("Recurrent Tumor" if layout == "old" else "Recurrence") in chose[0]
    assert validate_cohort(out, CFG).ok

    rows = _manifest(out)
    assert rows["TCGA-AA-0001"]["idh_mutant"] == "1" and rows["TCGA-AA-0001"]["mgmt_methylated"] == "1"


def test_the_two_layouts_write_identical_files(tmp_path):
    made = {}
    for layout in ("old", "new"):
        root = tmp_path / layout
        gdc = write_gdc_download(root, CFG, layout=layout)
        import_gdc(gdc, write_dicom_folder(root), root / "cohort", CFG)
        made[layout] = {p.relative_to(root / "cohort"): p.read_bytes()
                        for p in sorted((root / "cohort").rglob("*")) if p.is_file()
                        and p.name != "import_report.json"}
    assert made["old"] == made["new"] and len(made["old"]) > 3


def test_sample_kinds_follow_the_gdc_dictionary():
    from fedrg.data.importers.gdc import kind_from_portal_columns, kind_from_sample_type

    old = {v: (k.tissue, k.descriptor) for v in (
        "Primary Tumor", "Recurrent Tumor", "Metastatic", "Solid Tissue Normal",
        "Blood Derived Normal", "Primary Blood Derived Cancer - Peripheral Blood",
        "Additional - New Primary", "Primary Xenograft Tissue", "FFPE Recurrent")
        for k in [kind_from_sample_type(v)]}
    assert old == {
        "Primary Tumor": ("tumour", "primary"), "Recurrent Tumor": ("tumour", "recurrence"),
        "Metastatic": ("tumour", "metastatic"), "Solid Tissue Normal": ("normal", ""),
        "Blood Derived Normal": ("normal", ""),
        "Primary Blood Derived Cancer - Peripheral Blood": ("tumour", "primary"),
        "Additional - New Primary": ("tumour", "other tumour"),
        "Primary Xenograft Tissue": ("model", ""), "FFPE Recurrent": ("tumour", "recurrence")}
    assert kind_from_sample_type("FFPE Recurrent").ffpe
    new = {cols: (k.tissue, k.descriptor) for cols in (
        ("Tumor", "Primary", "Solid Tissue", "Frozen"),
        ("Tumor", "Recurrence", "Solid Tissue", "FFPE"),
        ("Tumor", "Metastatic", "Solid Tissue", "OCT"),
        ("Normal", "Not Applicable", "Peripheral Whole Blood", "Unknown"),
        ("Peritumoral", "Not Applicable", "Solid Tissue", "Frozen"),
        ("Tumor", "Xenograft", "Solid Tissue", "Frozen"),
        ("Tumor", "Primary", "3D Organoid", "Frozen"),
        ("Not Reported", "Primary", "Solid Tissue", "Frozen"),
        ("Unknown", "Unknown", "Solid Tissue", "Unknown"))
        for k in [kind_from_portal_columns(*cols)]}
    assert list(new.values()) == [
        ("tumour", "primary"), ("tumour", "recurrence"), ("tumour", "metastatic"),
        ("normal", ""), ("not tumour", ""), ("model", ""), ("model", ""),
        ("tumour", "primary"), ("unknown", "")]
    assert kind_from_portal_columns("Tumor", "Recurrence", "Solid Tissue", "FFPE").ffpe


def test_a_sheet_without_sample_columns_is_one_error_not_one_per_file(tmp_path, download):
    """A sample sheet that says nothing about its samples is one mistake: one problem, not
    one per expression file it can no longer place (91 on a real download)."""
    gdc, dicom = download
    sheet = next(gdc.glob("gdc_sample_sheet*.tsv"))
    lines = [line.split("\t")[:-1] for line in sheet.read_text().splitlines()]  # no Sample Type
    sheet.write_text("\n".join("\t".join(f) for f in lines) + "\n")
    with pytest.raises(DataImportError) as err:
        import_gdc(gdc, dicom, tmp_path / "c", CFG)
    assert len(err.value.problems) == 1, [str(p) for p in err.value.problems]
    msg = str(err.value.problems[0])
    assert sheet.name in msg and "Sample Type" in msg and "Tissue Type" in msg
    assert not (tmp_path / "c").exists()


def test_one_cause_in_many_files_is_one_problem(tmp_path, download):
    gdc, dicom = download
    with pytest.raises(DataImportError) as err:  # a column no STAR file has
        import_gdc(gdc, dicom, tmp_path / "c", CFG, expression_column="tpm_stranded")
    assert len(err.value.problems) == 1, [str(p) for p in err.value.problems]
    assert str(err.value.problems[0]).startswith("3 files (")  # the tumour files (normal skipped)
    assert "header lacks column(s) tpm_stranded (--expression-column)" in str(err.value)
    assert "tpm_unstranded" in str(err.value)

    sheet = next(gdc.glob("gdc_sample_sheet*.tsv"))
    sheet.write_text(sheet.read_text().splitlines()[0] + "\n")  # a sheet of another cart
    with pytest.raises(DataImportError) as err:
        import_gdc(gdc, dicom, tmp_path / "c", CFG)
    assert len(err.value.problems) == 1, [str(p) for p in err.value.problems]
    assert "4 expression files of the download are not in this sample sheet" in str(err.value)


def test_cli_errors_show_no_markup(tmp_path, download):
    gdc, dicom = download
    next(gdc.glob("gdc_sample_sheet*.tsv")).unlink()
    res = CliRunner().invoke(app, ["import", str(gdc), "--dicom", str(dicom), "--out",
                                   str(tmp_path / "c"), "--set", "data.image_shape=[32,32]"])
    assert res.exit_code == 2
    assert "[red]" not in res.output and "[/red]" not in res.output
    assert res.output.startswith("error: cannot import") and "no GDC sample sheet" in res.output
    assert res.output.count("no GDC sample sheet") == 1 and "Traceback" not in res.output
