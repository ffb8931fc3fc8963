"""A cohort assembled by hand from real files shipped in the pydicom and nibabel wheels, and
every kind of bad input, through the ``fedrg validate`` CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.config import DataConfig
from fedrg.data.cohort import load_cohort
from fedrg.data.dataset import CohortDataset, collate_samples, split_indices
from fedrg.errors import CohortError

runner = CliRunner()
NIB_DATA = Path(nibabel.__file__).parent / "tests" / "data"
CFG = DataConfig()

# patient_id, image, report, idh, codel, mgmt   (manifest rows 2..7)
ROWS = [
    ("pat-01", "images/MR_small.dcm", "Left frontal lobe mass. No enhancement.", "1", "0", "1"),
    ("pat-02", "images/CT_small.dcm", "", "0", "", "0"),
    ("pat-03", "images/anatomical.nii", "Ring enhancement. Central necrosis is present.", "0", "0", ""),
    ("pat-04", "images/example4d.nii.gz", "There is a 3.1 cm intra-axial mass.", "", "", "1"),
    ("pat-05", "images/series-05", "Mild surrounding oedema.", "1", "1", "1"),
    ("pat-06", "images/slice.png", "Positive T2-FLAIR mismatch sign.", "1", "0", "0"),
    ("pat-07", "images/volume.npy", "", "0", "0", "0"),
]
VCF = """##fileformat=VCFv4.2
##reference=GRCh38
#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t{samples}
chr2\t208248389\t.\tC\tT\t60\tPASS\t.\tGT\t{idh}
chr17\t7673802\t.\tC\tT\t60\tPASS\tGENE=TP53\tGT:DP\t{tp53}
chr7\t55152546\t.\tC\tT\t5\tLowQual\tGENE=EGFR\tGT\t{egfr}
"""


def build_cohort(root: Path) -> Path:
    """Write the hand-made cohort (real DICOM/NIfTI from the wheels, PNG, NPY, TSV, VCF)."""
    img = root / "images"
    img.mkdir(parents=True)
    shutil.copy(get_testdata_file("MR_small.dcm"), img / "MR_small.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), img / "CT_small.dcm")
    shutil.copy(NIB_DATA / "anatomical.nii", img / "anatomical.nii")
    shutil.copy(NIB_DATA / "example4d.nii.gz", img / "example4d.nii.gz")
    (img / "series-05").mkdir()
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # pat-01's file: not its bytes
    ds.PatientID = "pat-05"
    ds.save_as(img / "series-05" / "slice1")  # no suffix
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 50)) * 255).astype(np.uint8)).save(img / "slice.png")
    np.save(img / "volume.npy", rng.random((6, 20, 24)).astype(np.float32))
    lines = ["patient_id,image,report,idh_mutant,codeletion_1p19q,mgmt_methylated"]
    lines += [",".join(f'"{v}"' if "," in v else v for v in r) for r in ROWS]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    (root / "genomics").mkdir()
    expr = ["\t".join(["patient_id", *CFG.gene_panel, "EXTRA_GENE"])]
    for r in ROWS:
        expr.append("\t".join([r[0], *(f"{v:.2f}" for v in rng.gamma(2.0, 20.0, len(CFG.gene_panel) + 1))]))
    (root / "genomics" / "expression.tsv").write_text("\n".join(expr) + "\n")
    ids = [r[0] for r in ROWS]
    (root / "genomics" / "variants.vcf").write_text(VCF.format(
        samples="\t".join(ids),
        idh="\t".join("0/1" if r[3] == "1" else "0/0" for r in ROWS),
        tp53="\t".join(["1|1:30", "0/0:30", "./.:0", "0/0:20", "0/1:40", "0/0:31", "0/0:10"]),
        egfr="\t".join(["0/1"] * len(ROWS)),
    ))
    return root


@pytest.fixture
def cohort_dir(tmp_path) -> Path:
    return build_cohort(tmp_path / "cohort")


def test_hand_made_cohort_validates(cohort_dir):
    res = runner.invoke(app, ["validate", str(cohort_dir)])
    assert res.exit_code == 0, res.output
    assert "7" in res.output and "NIfTI" in res.output and "DICOM" in res.output


@pytest.mark.parametrize(("mode", "shape"), [("2d", [64, 64]), ("3d", [8, 32, 32])])
def test_hand_made_cohort_loads_through_dataset(cohort_dir, mode, shape):
    cfg = DataConfig(image_mode=mode, image_shape=shape)
    cohort = load_cohort(cohort_dir, cfg)
    assert cohort.patient_ids == [r[0] for r in ROWS]
    ds = CohortDataset(cohort, cfg)
    batch = collate_samples([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (7, 1, *shape)
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    assert batch["marker_mask"][1].tolist() == [1.0, 0.0, 1.0]  # pat-02: codeletion unknown
    assert batch["markers"][3].tolist() == [0.0, 0.0, 1.0]  # pat-04: unknown -> 0
    g = CFG.mutation_genes
    assert batch["mutations"][:, g.index("IDH1")].tolist() == [1, 0, 0, 0, 1, 1, 0]
    assert batch["mutations"][:, g.index("TP53")].tolist() == [1, 0, 0, 0, 1, 0, 0]
    assert batch["mutations"][:, g.index("EGFR")].sum() == 0  # LowQual is filtered
    expr = batch["expression"]
    assert expr.shape == (7, len(CFG.gene_panel))
    assert bool(np.isfinite(expr.numpy()).all()) and float(expr.abs().max()) < 20  # per-record, public constants
    assert batch["report"][1] == "" and batch["patient_id"][0] == "pat-01"
    train, val = split_indices(cohort, cfg)
    assert train and val


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _truncate_dicom(d: Path) -> None:
    shutil.copy(get_testdata_file("MR_truncated.dcm"), d / "images" / "MR_small.dcm")


def _truncate_nifti_gz(d: Path) -> None:
    p = d / "images" / "example4d.nii.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _nan_expression(d: Path) -> None:
    p = d / "genomics" / "expression.tsv"
    lines = p.read_text().splitlines()
    fields = lines[3].split("\t")
    fields[5] = "NaN"
    lines[3] = "\t".join(fields)
    p.write_text("\n".join(lines) + "\n")


def _duplicate_patient(d: Path) -> None:
    p = d / "manifest.csv"
    p.write_text(p.read_text() + "pat-03,images/anatomical.nii,,0,0,0\n")


def _missing_image(d: Path) -> None:
    (d / "images" / "anatomical.nii").unlink()


def _maybe_marker(d: Path) -> None:
    _edit(d / "manifest.csv", "pat-06,images/slice.png,Positive T2-FLAIR mismatch sign.,1",
          "pat-06,images/slice.png,Positive T2-FLAIR mismatch sign.,maybe")


def _missing_from_expression(d: Path) -> None:
    p = d / "genomics" / "expression.tsv"
    p.write_text("".join(line for line in p.read_text().splitlines(True) if not line.startswith("pat-05")))


def _non_numeric_expression(d: Path) -> None:
    p = d / "genomics" / "expression.tsv"
    lines = p.read_text().splitlines()
    fields = lines[7].split("\t")
    fields[2] = "high"
    lines[7] = "\t".join(fields)
    p.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("damage", "file", "row", "words"),
    [
        (_truncate_dicom, "images/MR_small.dcm", "manifest.csv row 2", "truncated or corrupt"),
        (_truncate_nifti_gz, "images/example4d.nii.gz", "manifest.csv row 5", "truncated or corrupt"),
        (_nan_expression, "genomics/expression.tsv", "row 4", "is not a finite number"),
        (_duplicate_patient, "manifest.csv", "row 9", "duplicate patient_id 'pat-03'"),
        (_missing_image, "images/anatomical.nii", "manifest.csv row 4", "does not exist"),
        (_maybe_marker, "manifest.csv", "row 7", "'maybe'"),
        (_missing_from_expression, "genomics/expression.tsv", "manifest.csv row 6",
         "'pat-05'"),
        (_non_numeric_expression, "genomics/expression.tsv", "row 8", "'high'"),
    ],
    ids=["truncated-dicom", "truncated-nii-gz", "nan-expression", "duplicate-patient",
         "missing-image", "marker-maybe", "missing-from-expression", "non-numeric"],
)
def test_bad_input_exits_nonzero_naming_file_and_row(cohort_dir, damage, file, row, words):
    damage(cohort_dir)
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 1, res.output
    problems = [ln for ln in res.output.splitlines() if ln.strip().startswith("- ")]
    assert any(file in ln and row in ln and words in ln for ln in problems), res.output
    with pytest.raises(CohortError) as err:
        load_cohort(cohort_dir, CFG)
    assert file in str(err.value) and err.value.problems


def test_all_problems_are_listed_at_once(cohort_dir):
    for damage in (_truncate_dicom, _nan_expression, _duplicate_patient, _maybe_marker,
                   _missing_image):
        damage(cohort_dir)
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 1
    assert "5 problem(s)" in res.output, res.output


def test_subprocess_cli_exit_code(cohort_dir):
    import subprocess
    import sys

    _maybe_marker(cohort_dir)
    proc = subprocess.run([sys.executable, "-m", "fedrg.cli", "validate", str(cohort_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "manifest.csv, row 7" in proc.stdout and "maybe" in proc.stdout


def test_missing_panel_gene_is_error_unless_imputed(cohort_dir):
    p = cohort_dir / "genomics" / "expression.tsv"
    _edit(p, "\tCHI3L1\t", "\tNOTAGENE\t")
    with pytest.raises(CohortError, match="CHI3L1"):
        load_cohort(cohort_dir, CFG)
    cfg = DataConfig(impute_missing_genes=True)
    cohort = load_cohort(cohort_dir, cfg)
    j = cfg.gene_panel.index("CHI3L1")
    assert np.all(cohort.expression[:, j] == 0.0)
    assert np.any(cohort.expression[:, j + 1] != 0.0)


def test_cohort_without_genomics_has_zero_expression(cohort_dir):
    shutil.rmtree(cohort_dir / "genomics")
    cohort = load_cohort(cohort_dir, CFG)
    item = CohortDataset(cohort, CFG)[0]
    assert item["has_genomics"].item() == 0.0
    assert item["expression"].abs().sum().item() == 0.0


def test_ids_only_in_expression_or_vcf_are_problems(cohort_dir):
    p = cohort_dir / "genomics" / "expression.tsv"
    extra = "\t".join(["ghost", *["1.0"] * (len(CFG.gene_panel) + 1)])
    p.write_text(p.read_text() + extra + "\n")
    _edit(cohort_dir / "genomics" / "variants.vcf", "\tpat-07\n", "\tpat-99\n")
    with pytest.raises(CohortError) as err:
        load_cohort(cohort_dir, CFG)
    text = str(err.value)
    assert "genomics/expression.tsv, row 9" in text and "'ghost'" in text
    assert "genomics/variants.vcf, row 3" in text and "'pat-99'" in text
    assert "'pat-07'" in text


def test_multiline_quoted_report_and_crlf(cohort_dir):
    p = cohort_dir / "manifest.csv"
    text = p.read_text().replace(
        "Left frontal lobe mass. No enhancement.", '"Left frontal lobe mass.\nNo enhancement."'
    ).replace("\n", "\r\n").replace("pat-06,images/slice.png,Positive T2-FLAIR mismatch sign.,1",
                                   "pat-06,images/slice.png,Positive T2-FLAIR mismatch sign.,maybe")
    p.write_bytes(text.encode())
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 1 and "manifest.csv, row 7" in res.output, res.output
    _edit(p, "maybe", "1")
    cohort = load_cohort(cohort_dir, CFG)
    assert cohort.reports[0] == "Left frontal lobe mass.\nNo enhancement."


# ----------------------------------------------------------------- issue 15: bad input up front

def _series(folder: Path, numbers: list[int], positions: list[float]) -> None:
    """A real DICOM series: CT_small.dcm re-saved with these instance numbers and z."""
    import pydicom

    folder.mkdir(parents=True)
    for i, (num, z) in enumerate(zip(numbers, positions, strict=True)):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.InstanceNumber = num
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.save_as(folder / f"slice-{i:03d}.dcm")


def _point_row_at(d: Path, image: str) -> None:
    _edit(d / "manifest.csv", "pat-06,images/slice.png,", f"pat-06,{image},")


@pytest.mark.parametrize(
    ("numbers", "positions", "words"),
    [
        ([1, 2, 3, 4], [0.0, 2.5, 5.0, 7.5], None),
        ([1, 2, 4, 5], [0.0, 2.5, 7.5, 10.0], "instance number(s) 3 absent"),
        ([1, 2, 2, 3], [0.0, 2.5, 2.5, 5.0], "instance number(s) 2 appear more than once"),
        ([1, 2, 3, 4], [0.0, 2.5, 7.5, 10.0], "a missing slice"),
        ([1, 2, 3, 4], [0.0, 2.5, 2.5, 5.0], "a duplicated slice"),
    ],
    ids=["complete", "missing-instance", "duplicate-instance", "position-gap",
         "position-duplicate"],
)
def test_dicom_series_with_missing_or_duplicated_slice_is_refused(cohort_dir, numbers,
                                                                   positions, words):
    _series(cohort_dir / "images" / "series-ct", numbers, positions)
    _point_row_at(cohort_dir, "images/series-ct")
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    if words is None:
        assert res.exit_code == 0, res.output
        return
    assert res.exit_code == 1, res.output
    problems = [ln for ln in res.output.splitlines() if ln.strip().startswith("- ")]
    assert any("images/series-ct" in ln and "manifest.csv row 7" in ln and words in ln
               and "re-export the complete series" in ln for ln in problems), res.output


def test_misspelt_manifest_column_names_the_unknown_one(cohort_dir):
    _edit(cohort_dir / "manifest.csv", "mgmt_methylated", "mgmt_methylatd")
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 1
    assert "lacks column(s) mgmt_methylated" in res.output
    assert "unknown column(s) 'mgmt_methylatd'" in res.output


def test_symlink_leaving_the_cohort_is_refused(cohort_dir, tmp_path):
    outside = tmp_path / "elsewhere.png"
    shutil.copy(cohort_dir / "images" / "slice.png", outside)
    (cohort_dir / "images" / "link.png").symlink_to(outside)
    _point_row_at(cohort_dir, "images/link.png")
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 1
    assert "outside the cohort directory" in res.output and "images/link.png" in res.output
    # A link that stays inside the cohort is fine.
    (cohort_dir / "images" / "link.png").unlink()
    (cohort_dir / "images" / "link.png").symlink_to(cohort_dir / "images" / "slice.png")
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 0, res.output


def test_image_above_the_voxel_limit_is_refused_from_its_header(cohort_dir):
    """A NIfTI header announcing 2048 x 2048 x 256 voxels: refused before reading data."""
    import nibabel as nib

    from fedrg.data.images import MAX_VOXELS

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 256))
    hdr.set_data_dtype(np.uint8)
    assert MAX_VOXELS < 2048 * 2048 * 256
    path = cohort_dir / "images" / "huge.nii"
    with open(path, "wb") as fh:  # header only: the data would be 1 GiB
        hdr.write_to(fh)
    _point_row_at(cohort_dir, "images/huge.nii")
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 1
    assert "more than the limit" in res.output and "images/huge.nii" in res.output


# ----------------------------------------------------------------- issue 24: real data

@pytest.mark.parametrize(("source", "copy"), [("images/slice.png", "images/renamed.png"),
                                              ("images/series-05", "images/series-copy")])
def test_a_byte_identical_image_under_a_new_name_is_refused(cohort_dir, source, copy):
    """The same image copied under another name for a second patient id is one patient
    counted as two privacy units: found by content, whatever the file is called."""
    src, dst = cohort_dir / source, cohort_dir / copy
    if src.is_dir():
        shutil.copytree(src, dst)
        (dst / "slice1").rename(dst / "IM-0001.dcm")
    else:
        shutil.copy(src, dst)
    _edit(cohort_dir / "manifest.csv", "pat-07,images/volume.npy,", f"pat-07,{copy},")
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 1, res.output
    owner = "pat-06" if src.suffix == ".png" else "pat-05"
    line = next(ln for ln in res.output.splitlines() if "byte-identical" in ln)
    assert copy in line and "'pat-07'" in line and f"'{owner}'" in line and source in line
    assert "row 8" in line and "merge the rows" in line


def test_the_same_picture_in_another_file_is_not_a_duplicate(cohort_dir):
    """Only identical bytes count: a re-saved copy with another PatientID is not flagged."""
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = "pat-07"
    ds.save_as(cohort_dir / "images" / "CT_again.dcm")
    _edit(cohort_dir / "manifest.csv", "pat-07,images/volume.npy,", "pat-07,images/CT_again.dcm,")
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 0, res.output


def test_a_marker_without_labels_is_a_warning(cohort_dir):
    from fedrg.data.validate import validate_cohort

    text = (cohort_dir / "manifest.csv").read_text().splitlines()
    rows = [line.rsplit(",", 1)[0] + "," for line in text[1:]]  # empty mgmt_methylated
    (cohort_dir / "manifest.csv").write_text("\n".join([text[0], *rows]) + "\n")
    result = validate_cohort(cohort_dir, CFG)
    assert result.ok and len(result.warnings) == 1, [str(w) for w in result.warnings]
    assert "mgmt_methylated has no labels" in str(result.warnings[0])
    res = runner.invoke(app, ["validate", str(cohort_dir)], terminal_width=400)
    assert res.exit_code == 0, res.output
    assert "warning: manifest.csv: marker column mgmt_methylated has no labels" in res.output
    assert "valid (1 warning(s) above)" in res.output
