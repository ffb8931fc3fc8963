"""``fedrg import``: a GDC download + a folder of DICOM series -> a fedrg cohort.

Cases are matched on the GDC ``case_submitter_id`` (e.g. ``TCGA-02-0001``), which is the
DICOM ``PatientID`` of TCIA collections. A patient enters the cohort when it has a DICOM
series and, if the download holds expression files at all, a tumour expression file.
Every case that cannot be matched is listed in the :class:`ImportReport` (and
``import_report.json``) with the reason. Nothing is written unless every input file is
usable; the cohort is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedrg.config import DataConfig
from fedrg.data.importers.dicom import DicomSeries, choose_series, index_dicom
from fedrg.data.importers.gdc import (
    TUMOUR_RANK,
    ClinicalTable,
    MafVariant,
    SampleSheetRow,
    case_of_barcode,
    parse_marker_value,
    read_clinical,
    read_maf,
    read_sample_sheet,
    read_star_counts,
    sniff_tsv,
)
from fedrg.errors import DataImportError, Problem

__all__ = ["ImportReport", "Unmatched", "import_gdc", "one_problem_per_cause"]

IDH_GENES = ("IDH1", "IDH2")
REPORT_FILE = "import_report.json"


@dataclass(frozen=True)
class Unmatched:
    """A case (or DICOM patient) left out of the cohort, and why."""

    case: str
    source: str
    reason: str


@dataclass
class ImportReport:
    """What ``fedrg import`` wrote and what it could not match."""

    out_dir: str
    patients: list[str] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        """The report as indented JSON (written to ``import_report.json``)."""
        return json.dumps(asdict(self), indent=2)


@dataclass
class _Download:
    sample_sheet: list[SampleSheetRow] | None  # None: no usable sample sheet (said once)
    expression_files: dict[str, Path]  # file name -> path
    mafs: list[Path]
    clinical: Path | None
    sheet_path: Path | None = None


def _discover(gdc_dir: Path, sample_sheet: Path | None, clinical: Path | None,
              problems: list[Problem]) -> _Download:
    sheets: list[Path] = [sample_sheet] if sample_sheet else []
    clinicals: list[Path] = [clinical] if clinical else []
    expression: dict[str, Path] = {}
    mafs: list[Path] = []
    for path in sorted(p for p in gdc_dir.rglob("*") if p.is_file()):
        name = path.name.lower()
        if name.endswith((".maf", ".maf.gz")):
            mafs.append(path)
            continue
        if not name.endswith((".tsv", ".txt", ".tsv.gz")):
            continue
        kind = sniff_tsv(path)
        if kind == "star_counts":
            expression[path.name] = path
        elif kind == "sample_sheet" and not sample_sheet:
            sheets.append(path)
        elif kind == "clinical" and not clinical:
            clinicals.append(path)
        elif kind == "maf":
            mafs.append(path)
    for what, found, option in (("sample sheet", sheets, "--sample-sheet"),
                                ("clinical TSV", clinicals, "--clinical")):
        if len(found) > 1:
            problems.append(Problem(str(gdc_dir), f"{len(found)} {what}s found "
                                    f"({', '.join(p.name for p in found)}); pass one with {option}"))
    rows: list[SampleSheetRow] | None = None
    if sheets:
        rows = read_sample_sheet(sheets[0], problems)
    elif expression:
        problems.append(Problem(
            str(gdc_dir), f"{len(expression)} expression file(s) but no GDC sample sheet, the only "
            "link from a file to its case: download 'Sample Sheet' from the GDC cart into this "
            "folder or pass --sample-sheet"))
    else:
        rows = []  # nothing needs one
    return _Download(rows, expression, mafs, clinicals[0] if clinicals else None,
                     sheets[0] if sheets else None)


def _some(names: list[str], shown: int = 3) -> str:
    """``a, b, c and 7 more``."""
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head} and {len(names) - shown} more"


def _skip_reason(row: SampleSheetRow) -> str:
    tissue = row.kind.tissue
    if tissue == "normal":
        return f"{row.sample_type} expression file {row.file_name}"
    if tissue == "model":
        return (f"{row.sample_type} expression file {row.file_name} (a model grown from the "
                "tumour, not the patient's tissue)")
    if tissue == "not tumour":
        return f"{row.sample_type} expression file {row.file_name} (not tumour tissue)"
    return (f"expression file {row.file_name}: the sample sheet does not say it is a tumour "
            f"sample ({row.sample_type})")


def _preference(row: SampleSheetRow) -> tuple:
    """Primary before recurrence before metastasis; frozen before FFPE; then sample id."""
    return (TUMOUR_RANK.get(row.kind.descriptor, len(TUMOUR_RANK)), row.kind.ffpe, row.sample_ids)


def _expression_by_case(dl: _Download, report: ImportReport,
                        problems: list[Problem]) -> dict[str, tuple[SampleSheetRow, Path]]:
    chosen: dict[str, tuple[SampleSheetRow, Path]] = {}
    if dl.sample_sheet is None:  # said once already: no file's case can be known
        return chosen
    listed = set()
    absent: list[SampleSheetRow] = []
    for row in dl.sample_sheet:
        path = dl.expression_files.get(row.file_name)
        listed.add(row.file_name)
        if path is None:
            if "expression" in row.data_type.lower():
                absent.append(row)
            continue
        if len(row.case_ids) != 1:
            problems.append(Problem(
                row.file_name, f"sample sheet row {row.row} names {len(row.case_ids)} cases "
                f"({', '.join(row.case_ids)}); an expression file belongs to one case"))
            continue
        case = row.case_ids[0]
        if not row.is_tumour:
            report.notes.append(f"{case}: skipped {_skip_reason(row)}")
            continue
        if case in chosen:
            keep, drop = sorted([chosen[case], (row, path)], key=lambda rp: _preference(rp[0]))
            chosen[case] = keep
            report.notes.append(
                f"{case}: several tumour expression files; using sample "
                f"{','.join(keep[0].sample_ids)} ({keep[0].sample_type}), not "
                f"{','.join(drop[0].sample_ids)} ({drop[0].sample_type})")
            continue
        chosen[case] = (row, path)
    sheet = str(dl.sheet_path or "the sample sheet")
    if len(absent) == 1:
        problems.append(Problem(
            absent[0].file_name, f"listed in the sample sheet (row {absent[0].row}) but not in the "
            "download; re-run gdc-client download with the same manifest"))
    elif absent:
        problems.append(Problem(
            sheet, f"{len(absent)} expression files it lists are not in the download "
            f"({_some([r.file_name for r in absent])}); the download is incomplete: re-run "
            "gdc-client download with the same manifest"))
    unlisted = sorted(set(dl.expression_files) - listed)
    if len(unlisted) == 1:
        problems.append(Problem(
            str(dl.expression_files[unlisted[0]]), "expression file is not in the sample sheet, "
            "so its case is unknown; use the sample sheet of the same GDC cart"))
    elif unlisted:
        problems.append(Problem(
            sheet, f"{len(unlisted)} expression files of the download are not in this sample "
            f"sheet ({_some(unlisted)}), so their cases are unknown; use the sample sheet of "
            "the same GDC cart"))
    return chosen


def one_problem_per_cause(problems: list[Problem]) -> list[Problem]:
    """Merge problems that say the same thing about several files into one.

    A wrong ``--expression-column`` is one mistake, not one per STAR file: problems with the
    same message and row are listed once, naming how many files and the first few.
    """
    groups: dict[tuple[str, int | None], list[str]] = {}
    for p in problems:
        files = groups.setdefault((p.message, p.row), [])
        if p.file not in files:
            files.append(p.file)
    return [Problem(files[0] if len(files) == 1 else f"{len(files)} files ({_some(files)})",
                    message, row) for (message, row), files in groups.items()]


def _resolve_case(v: MafVariant | str, uuid_to_case: dict[str, str]) -> str:
    if isinstance(v, MafVariant):
        if v.case_uuid and v.case_uuid in uuid_to_case:
            return uuid_to_case[v.case_uuid]
        return case_of_barcode(v.barcode)
    return case_of_barcode(v)


def _marker_from_clinical(table: ClinicalTable, case: str, column: str,
                          problems: list[Problem]) -> float:
    values = set()
    for lineno, raw in table.values.get(case, {}).get(column, []):
        v = parse_marker_value(raw)
        if v is None:
            problems.append(Problem(
                str(table.path), f"column {column}, case {case}: value {raw!r} is not a marker "
                "status; use yes/no, positive/negative, mutant/wildtype, methylated/unmethylated, "
                "codeleted/non-codeleted, 1/0, or '-- for unknown", lineno))
        elif not math.isnan(v):
            values.add(v)
    if len(values) > 1:
        problems.append(Problem(str(table.path), f"column {column}, case {case}: rows disagree "
                                "(both positive and negative); correct the clinical file"))
        return math.nan
    return values.pop() if values else math.nan


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _write_vcf(path: Path, patients: list[str], variants: dict[tuple, set[str]],
               covered: set[str]) -> None:
    lines = ["##fileformat=VCFv4.2", "##source=fedrg import (from GDC masked somatic MAF)",
             '##INFO=<ID=GENE,Number=1,Type=String,Description="Hugo_Symbol of the MAF row">',
             '##INFO=<ID=VC,Number=1,Type=String,Description="MAF Variant_Classification">',
             '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype (./. = case not in a MAF)">',
             "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT",
                        *patients])]
    for (chrom, pos, ref, alt, gene, vc), carriers in sorted(variants.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2:])):
        if not re.fullmatch(r"[ACGTN]+", ref) or not re.fullmatch(r"[ACGTN]+", alt):
            ref, alt = "N", "<DEL>" if alt in ("-", "") else "<INS>"
        gts = ["0/1" if p in carriers else ("0/0" if p in covered else "./.") for p in patients]
        lines.append("\t".join([chrom, str(pos), ".", ref, alt, ".", "PASS", f"GENE={gene};VC={vc}",
                                "GT", *gts]))
    path.write_text("\n".join(lines) + "\n")


def import_gdc(gdc_dir: str | Path, dicom_dir: str | Path, out_dir: str | Path, data_cfg: DataConfig, *,
               expression_column: str = "tpm_unstranded", marker_columns: dict[str, str] | None = None,
               series_description: str | None = None, sample_sheet: str | Path | None = None,
               clinical: str | Path | None = None) -> ImportReport:
    """Turn a GDC download plus a folder of DICOM series into a fedrg cohort at ``out_dir``.

    Parameters
    ----------
    gdc_dir
        The GDC download (any layout, e.g. ``gdc-client``'s ``<file-uuid>/<file>``): STAR -
        Counts TSVs, MAFs, the sample sheet and the clinical TSV are found by their headers.
    dicom_dir
        DICOM series, matched to cases by ``PatientID`` == ``case_submitter_id``.
    out_dir
        The cohort folder to create (must not exist or be empty).
    data_cfg
        ``gene_panel`` (expression columns written), ``mutation_genes`` (VCF records
        written), ``markers`` (manifest columns).
    expression_column
        STAR - Counts column to use (``tpm_unstranded``, ``unstranded``, ``fpkm_unstranded``...).
    marker_columns
        ``marker -> clinical column`` for marker status; ``idh_mutant`` defaults to IDH1/IDH2
        non-silent calls in the MAF (unknown for cases no MAF covers).
    series_description
        Keep only series whose SeriesDescription contains this (e.g. ``FLAIR``).
    sample_sheet, clinical
        Explicit files when the download holds several or none.

    Returns
    -------
    ImportReport
        Patients written, every unmatched case with its reason, notes on choices made.

    Raises
    ------
    DataImportError
        Listing every unusable file (file, row, column, fix); nothing is written then.
    """
    gdc_dir, dicom_dir, out_dir = Path(gdc_dir), Path(dicom_dir), Path(out_dir)
    marker_columns = dict(marker_columns or {})
    problems: list[Problem] = []
    for what, d in (("GDC download", gdc_dir), ("DICOM folder", dicom_dir)):
        if not d.is_dir():
            raise DataImportError(str(d), [Problem(str(d), f"{what} folder does not exist")])
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataImportError(str(gdc_dir), [Problem(
            str(out_dir), "output folder exists and is not empty; fedrg import never overwrites: "
            "choose a new --out folder")])
    unknown = sorted(set(marker_columns) - set(data_cfg.markers))
    if unknown:
        raise DataImportError(str(gdc_dir), [Problem(
            "--marker", f"{', '.join(unknown)} not in data.markers ({', '.join(data_cfg.markers)})")])

    report = ImportReport(str(out_dir))
    dl = _discover(gdc_dir, Path(sample_sheet) if sample_sheet else None,
                   Path(clinical) if clinical else None, problems)
    table = read_clinical(dl.clinical, sorted(set(marker_columns.values())), problems) if dl.clinical else None
    if marker_columns and table is None and dl.clinical is None:
        problems.append(Problem(str(gdc_dir), "--marker names clinical columns but no clinical TSV "
                                "was found; add clinical.tsv or pass --clinical"))
    uuid_to_case = {u: c for c, u in (table.uuid_of.items() if table else []) if u}

    expr_files = _expression_by_case(dl, report, problems)
    genes_needed = sorted(set(data_cfg.mutation_genes) | set(IDH_GENES))
    variants: dict[tuple, set[str]] = {}
    idh_cases: set[str] = set()
    covered: set[str] = set()
    for maf in dl.mafs:
        got = read_maf(maf, genes_needed, problems)
        if got is None:
            continue
        kept, barcodes, uuids = got
        covered |= {case_of_barcode(b) for b in barcodes} | {uuid_to_case[u] for u in uuids if u in uuid_to_case}
        for v in kept:
            case = _resolve_case(v, uuid_to_case)
            if v.gene in IDH_GENES:
                idh_cases.add(case)
            if v.gene in data_cfg.mutation_genes:
                key = (v.chrom, v.pos, v.ref, v.alt, v.gene, v.classification)
                variants.setdefault(key, set()).add(case)

    series_by_patient = index_dicom(dicom_dir, problems)
    # Read every file in full before deciding anything, so one run lists every problem.
    expression: dict[str, dict[str, float]] = {}
    for case, (_row, path) in expr_files.items():
        values = read_star_counts(path, list(data_cfg.gene_panel), expression_column, problems)
        if values is not None:
            expression[case] = values
    gdc_cases = set(expr_files) | covered | set(table.cases if table else [])
    markers: dict[str, list[float]] = {}
    for case in sorted(gdc_cases):
        row = []
        for m in data_cfg.markers:
            if m in marker_columns and table is not None:
                row.append(_marker_from_clinical(table, case, marker_columns[m], problems))
            elif m == "idh_mutant" and dl.mafs:
                row.append(1.0 if case in idh_cases else (0.0 if case in covered else math.nan))
            else:
                row.append(math.nan)
        markers[case] = row
    if problems:
        raise DataImportError(str(gdc_dir), one_problem_per_cause(problems))

    patients: list[str] = []
    chosen: dict[str, DicomSeries] = {}
    for case in sorted(gdc_cases):
        if case not in series_by_patient:
            report.unmatched.append(Unmatched(case, "GDC", "no DICOM series with this PatientID"))
            continue
        series, note = choose_series(series_by_patient[case], series_description)
        if series is None:
            report.unmatched.append(Unmatched(case, "DICOM", note))
            continue
        if dl.expression_files and case not in expr_files:
            report.unmatched.append(Unmatched(case, "GDC", "no tumour expression file in the sample "
                                              "sheet (every patient of a cohort with genomics needs one)"))
            continue
        if note:
            report.notes.append(f"{case}: {note}")
        if dl.mafs and case not in covered:
            report.notes.append(f"{case}: in no MAF; mutations written as not called (./.)")
        patients.append(case)
        chosen[case] = series
    for pid in sorted(set(series_by_patient) - gdc_cases):
        report.unmatched.append(Unmatched(pid, "DICOM", "PatientID matches no GDC case "
                                          "(case_submitter_id) in the clinical TSV, sample sheet or MAF"))
    if not patients:
        raise DataImportError(str(gdc_dir), [Problem(
            str(dicom_dir), f"no case matched ({len(report.unmatched)} unmatched: "
            + "; ".join(f"{u.case}: {u.reason}" for u in report.unmatched[:10])
            + "); the DICOM PatientID must equal the GDC case_submitter_id")])
    expression = {c: v for c, v in expression.items() if c in chosen}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _write_cohort(tmp, patients, chosen, markers, expression, variants, covered, data_cfg,
                      report, with_variants=bool(dl.mafs))
        report.patients = patients
        (tmp / REPORT_FILE).write_text(report.to_json())
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _write_cohort(root: Path, patients: list[str], chosen: dict[str, DicomSeries],
                  markers: dict[str, list[float]], expression: dict[str, dict[str, float]],
                  variants: dict[tuple, set[str]], covered: set[str], data_cfg: DataConfig,
                  report: ImportReport, *, with_variants: bool) -> None:
    rows = []
    used: set[str] = set()
    for case in patients:
        folder = _SAFE.sub("_", case)
        while folder in used:
            folder += "_"
        used.add(folder)
        dest = root / "images" / folder
        dest.mkdir(parents=True)
        for k, src in enumerate(sorted(chosen[case].files), start=1):
            shutil.copyfile(src, dest / f"{k:04d}.dcm")
        rows.append([case, f"images/{folder}", "",
                     *["" if math.isnan(v) else str(int(v)) for v in markers[case]]])
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "image", "report", *data_cfg.markers])
        w.writerows(rows)
    report.files["images"] = len(patients)
    if expression:
        genes = [g for g in data_cfg.gene_panel if all(g in expression[c] for c in patients)]
        absent = [g for g in data_cfg.gene_panel if g not in genes]
        if absent:
            report.notes.append(f"panel gene(s) not in every expression file: {', '.join(absent)}")
        (root / "genomics").mkdir()
        lines = ["\t".join(["patient_id", *genes])]
        lines += ["\t".join([c, *(f"{expression[c][g]:.4f}" for g in genes)]) for c in patients]
        (root / "genomics" / "expression.tsv").write_text("\n".join(lines) + "\n")
        report.files["expression_genes"] = len(genes)
    if with_variants:
        (root / "genomics").mkdir(exist_ok=True)
        _write_vcf(root / "genomics" / "variants.vcf", patients, variants, covered)
        report.files["variant_records"] = len(variants)
