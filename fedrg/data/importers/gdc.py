"""Readers for files as the NCI Genomic Data Commons publishes them.

* **Sample sheet** (``gdc_sample_sheet.<date>.tsv``, from the GDC cart): ``File ID``,
  ``File Name``, ``Data Category``, ``Data Type``, ``Project ID``, ``Case ID``,
  ``Sample ID``, then what the sample is. Older sheets have ``Sample Type`` (the retired
  ``sample_type`` property: ``Primary Tumor``, ``Solid Tissue Normal``...); the current
  portal's have ``Tissue Type``, ``Tumor Descriptor``, ``Specimen Type`` and
  ``Preservation Method`` (the GDC dictionary's ``sample`` properties that replaced it).
  Both are read into the same :class:`SampleKind`. It is the only link from an expression
  file to its case.
* **Gene expression quantification**, workflow *STAR - Counts*
  (``*.rna_seq.augmented_star_gene_counts.tsv``): ``# gene-model: ...`` comment, header
  ``gene_id gene_name gene_type unstranded stranded_first stranded_second tpm_unstranded
  fpkm_unstranded fpkm_uq_unstranded``, four ``N_*`` summary rows, then one row per gene.
* **Masked somatic MAF** (``*.maf`` / ``*.maf.gz``): ``#version gdc-1.0.0`` comments, then
  the MAF columns (``Hugo_Symbol``, ``Chromosome``, ``Start_Position``,
  ``Variant_Classification``, ``Reference_Allele``, ``Tumor_Seq_Allele2``,
  ``Tumor_Sample_Barcode``, ... and GDC's ``case_id``).
* **Clinical TSV** (``clinical.tsv`` from the clinical download): one or more rows per case
  keyed by ``case_id`` / ``case_submitter_id`` (newer downloads: ``cases.case_id`` /
  ``cases.submitter_id``); ``'--`` marks an empty value.

Every reader appends problems (file, row, column, fix) to a list instead of stopping.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass, field
from pathlib import Path

from fedrg.errors import Problem

__all__ = [
    "NONSILENT",
    "ClinicalTable",
    "MafVariant",
    "SampleKind",
    "SampleSheetRow",
    "case_of_barcode",
    "kind_from_portal_columns",
    "kind_from_sample_type",
    "parse_marker_value",
    "read_clinical",
    "read_maf",
    "read_sample_sheet",
    "read_star_counts",
    "sniff_tsv",
]

SAMPLE_SHEET_COLUMNS = ("File Name", "Case ID", "Sample ID")
#: What the sample is: the older sheets' column, and the current portal's columns.
OLD_LAYOUT_COLUMN = "Sample Type"
NEW_LAYOUT_COLUMNS = ("Tissue Type", "Tumor Descriptor", "Specimen Type", "Preservation Method")
STAR_COLUMNS = ("gene_id", "gene_name", "gene_type", "unstranded")
MAF_COLUMNS = ("Hugo_Symbol", "Chromosome", "Start_Position", "Variant_Classification",
               "Reference_Allele", "Tumor_Seq_Allele2", "Tumor_Sample_Barcode")
#: Protein-changing MAF classes (as used by maftools/cBioPortal), plus promoter calls below.
NONSILENT = frozenset({
    "Frame_Shift_Del", "Frame_Shift_Ins", "In_Frame_Del", "In_Frame_Ins", "Missense_Mutation",
    "Nonsense_Mutation", "Nonstop_Mutation", "Splice_Site", "Translation_Start_Site",
})
#: Genes whose recurrent driver calls are promoter (5'Flank) variants.
PROMOTER_GENES = frozenset({"TERT"})
EMPTY_VALUES = frozenset({"", "'--", "--", "na", "n/a", "nan", "not reported", "unknown",
                          "not evaluated", "not applicable", "[not available]", "[unknown]"})
POSITIVE = frozenset({"1", "yes", "true", "positive", "mutant", "mutated", "methylated",
                      "codeleted", "codel", "co-deleted", "present"})
NEGATIVE = frozenset({"0", "no", "false", "negative", "wildtype", "wild type", "wild-type",
                      "wt", "unmethylated", "non-codeleted", "non-codel", "noncodel",
                      "not codeleted", "intact", "absent"})


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else path.open(
        encoding="utf-8-sig")


def _table(path: Path, display: str, problems: list[Problem]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(line number, fields)`` rows of a tab-separated file; ``#`` lines skipped."""
    header: list[str] = []
    rows: list[tuple[int, list[str]]] = []
    try:
        with _open_text(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                line = raw.rstrip("\n").rstrip("\r")
                if not line.strip() or line.startswith("#"):
                    continue
                fields = line.split("\t")
                if not header:
                    header = [h.strip() for h in fields]
                    continue
                if len(fields) != len(header):
                    problems.append(Problem(
                        display, f"has {len(fields)} tab-separated fields, the header has "
                        f"{len(header)}; the file is truncated or not tab-separated", lineno))
                    continue
                rows.append((lineno, fields))
    except (OSError, EOFError, UnicodeDecodeError) as err:
        problems.append(Problem(display, f"cannot read the file ({type(err).__name__}: {err})"))
    return header, rows


def sniff_tsv(path: Path) -> str | None:
    """Which GDC table ``path`` is, from its header: ``sample_sheet``, ``star_counts``,
    ``clinical``, ``maf``, or ``None``."""
    try:
        with _open_text(path) as fh:
            for _, raw in zip(range(50), fh, strict=False):
                if raw.startswith("#") or not raw.strip():
                    continue
                cols = {c.strip() for c in raw.rstrip("\n").split("\t")}
                if {"File Name", "Case ID"} <= cols:
                    return "sample_sheet"
                if {"gene_id", "gene_name"} <= cols:
                    return "star_counts"
                if "Hugo_Symbol" in cols and "Tumor_Sample_Barcode" in cols:
                    return "maf"
                if cols & {"case_submitter_id", "cases.submitter_id"}:
                    return "clinical"
                return None
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    return None


def _missing_columns(header: list[str], needed: tuple[str, ...], display: str, what: str,
                     problems: list[Problem]) -> bool:
    missing = [c for c in needed if c not in header]
    if missing:
        problems.append(Problem(
            display, f"header lacks column(s) {', '.join(missing)}; a GDC {what} has "
            f"{', '.join(needed)} (found: {', '.join(header[:12]) or 'nothing'}). Download the "
            f"file again from the GDC or pass the right file", 1))
    return bool(missing)


# --------------------------------------------------------------------------- sample sheet

#: Tumour kinds in the order the importer prefers them when a case has several tumour files.
TUMOUR_RANK = {"primary": 0, "recurrence": 1, "metastatic": 2, "other tumour": 3}
#: Specimen types of a model grown from the tumour, not the patient's own tissue.
_MODEL_WORDS = ("cell line", "organoid", "neurosphere", "reprogrammed", "xenograft",
                "cancer model", "original cells", "adherent suspension")
_UNKNOWN = frozenset({"", "unknown", "not reported", "not allowed to collect", "'--", "--",
                      "nos", "not applicable"})


@dataclass(frozen=True)
class SampleKind:
    """What one sample is, whichever sample-sheet layout said it.

    ``tissue`` is ``tumour``, ``normal``, ``model`` (a cell line, organoid or xenograft grown
    from the tumour), ``not tumour`` (peritumoral or abnormal tissue) or ``unknown``;
    ``descriptor`` (tumours only) is ``primary``, ``recurrence``, ``metastatic`` or
    ``other tumour``; ``ffpe`` is True for formalin-fixed, paraffin-embedded samples;
    ``label`` is the sheet's own wording, for messages.
    """

    tissue: str
    descriptor: str
    ffpe: bool
    label: str


def _is_model(text: str) -> bool:
    return any(w in text for w in _MODEL_WORDS)


def kind_from_sample_type(sample_type: str) -> SampleKind:
    """A retired GDC ``sample_type`` value (older sheets' ``Sample Type``) -> :class:`SampleKind`."""
    v = sample_type.strip().lower()
    ffpe = "ffpe" in v
    if "normal" in v:
        return SampleKind("normal", "", ffpe, sample_type.strip())
    if _is_model(v):
        return SampleKind("model", "", ffpe, sample_type.strip())
    if v in _UNKNOWN:
        return SampleKind("unknown", "", ffpe, sample_type.strip() or "empty Sample Type")
    if v.startswith("primary"):
        descriptor = "primary"
    elif v.startswith("recurrent") or "recurrent" in v:
        descriptor = "recurrence"
    elif "metastatic" in v:
        descriptor = "metastatic"
    else:  # Additional - New Primary, Blood Derived Cancer, Tumor, Post neo-adjuvant therapy...
        descriptor = "other tumour"
    return SampleKind("tumour", descriptor, ffpe, sample_type.strip())


def kind_from_portal_columns(tissue_type: str, tumor_descriptor: str, specimen_type: str = "",
                             preservation_method: str = "") -> SampleKind:
    """The current portal's ``Tissue Type`` / ``Tumor Descriptor`` / ``Specimen Type`` /
    ``Preservation Method`` (GDC dictionary ``sample.tissue_type`` etc.) -> :class:`SampleKind`.

    ``Tissue Type`` Tumor / Normal decides tumour or normal; Peritumoral and Abnormal tissue
    is not tumour; when it is Unknown or Not Reported, a Primary / Recurrence / Metastatic
    / New Primary ``Tumor Descriptor`` still marks a tumour. A cell-line, organoid or
    xenograft ``Specimen Type`` (or the Xenograft descriptor) is a model, not the patient.
    """
    tissue, desc = tissue_type.strip().lower(), tumor_descriptor.strip().lower()
    spec, pres = specimen_type.strip().lower(), preservation_method.strip().lower()
    parts = [p for p in (tissue_type.strip(), tumor_descriptor.strip(), specimen_type.strip(),
                         preservation_method.strip()) if p.lower() not in _UNKNOWN]
    label = ", ".join(parts) or "Tissue Type unknown"
    ffpe = pres == "ffpe"
    descriptor = {"primary": "primary", "recurrence": "recurrence",
                  "metastatic": "metastatic", "new primary": "other tumour"}.get(desc, "")
    if _is_model(spec) or desc == "xenograft":
        return SampleKind("model", "", ffpe, label)
    if tissue == "normal":
        return SampleKind("normal", "", ffpe, label)
    if tissue in ("peritumoral", "abnormal") or desc == "premalignant":
        return SampleKind("not tumour", "", ffpe, label)
    if tissue == "tumor" or tissue == "tumour":
        return SampleKind("tumour", descriptor or "other tumour", ffpe, label)
    if descriptor:
        return SampleKind("tumour", descriptor, ffpe, label)
    return SampleKind("unknown", "", ffpe, label)


@dataclass(frozen=True)
class SampleSheetRow:
    """One file of the GDC sample sheet (either layout).

    ``kinds`` holds one :class:`SampleKind` per entry of ``sample_ids`` (a multi-sample file
    such as a MAF lists its tumour and normal samples comma-separated).
    """

    row: int
    file_name: str
    data_type: str
    case_ids: tuple[str, ...]
    sample_ids: tuple[str, ...]
    kinds: tuple[SampleKind, ...]

    @property
    def kind(self) -> SampleKind:
        """The file's sample (the first tumour one of a multi-sample file)."""
        return next((k for k in self.kinds if k.tissue == "tumour"), self.kinds[0])

    @property
    def sample_type(self) -> str:
        """The sheet's own words for the sample (``Solid Tissue Normal``; ``Normal, Solid Tissue``)."""
        return self.kind.label

    @property
    def is_normal(self) -> bool:
        """Normal tissue or blood (not a tumour sample)."""
        return all(k.tissue == "normal" for k in self.kinds)

    @property
    def is_tumour(self) -> bool:
        """A sample of the patient's tumour (not normal tissue, not a model grown from it)."""
        return self.kind.tissue == "tumour"


def _split_ids(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _split_per_sample(value: str, n: int) -> list[str]:
    """A comma-separated per-sample column (``Tumor, Normal``) -> ``n`` values."""
    parts = [v.strip() for v in value.split(",")]
    if len(parts) == n:
        return parts
    return [value.strip()] * n  # one value for every sample (or a value holding a comma)


def read_sample_sheet(path: Path, problems: list[Problem],
                      display: str | None = None) -> list[SampleSheetRow] | None:
    """Parse a GDC sample sheet of either layout (see the module docstring).

    ``Case ID`` / ``Sample ID`` and the per-sample columns may hold comma-separated lists.

    Returns
    -------
    list of SampleSheetRow, or None
        ``None`` when the sheet itself is unusable (one problem says why); the caller then
        cannot tell any file's case and must not report each file again.
    """
    display = display or str(path)
    header, rows = _table(path, display, problems)
    if not header:
        problems.append(Problem(display, "file is empty; expected a GDC sample sheet"))
        return None
    if _missing_columns(header, SAMPLE_SHEET_COLUMNS, display, "sample sheet", problems):
        return None
    old = OLD_LAYOUT_COLUMN in header
    if not old and "Tissue Type" not in header and "Tumor Descriptor" not in header:
        problems.append(Problem(
            display, f"header says neither what each sample is ('{OLD_LAYOUT_COLUMN}' in "
            "older GDC sample sheets) nor 'Tissue Type' / 'Tumor Descriptor' (the current "
            f"portal's; found: {', '.join(header[:12])}). Download the sample sheet again "
            "from the GDC cart, or pass it with --sample-sheet", 1))
        return None
    idx = {c: i for i, c in enumerate(header)}

    def col(f: list[str], name: str) -> str:
        return f[idx[name]].strip() if name in idx else ""

    out = []
    for lineno, f in rows:
        name = col(f, "File Name")
        cases = _split_ids(col(f, "Case ID"))
        if not name or not cases:
            problems.append(Problem(display, "empty 'File Name' or 'Case ID'", lineno))
            continue
        samples = _split_ids(col(f, "Sample ID"))
        n = max(len(samples), 1)
        if old:
            kinds = tuple(kind_from_sample_type(v)
                          for v in _split_per_sample(col(f, OLD_LAYOUT_COLUMN), n))
        else:
            per = [_split_per_sample(col(f, c), n) for c in NEW_LAYOUT_COLUMNS]
            kinds = tuple(kind_from_portal_columns(*vals) for vals in zip(*per, strict=True))
        out.append(SampleSheetRow(lineno, name, col(f, "Data Type"), cases, samples, kinds))
    return out


# --------------------------------------------------------------------------- expression

def read_star_counts(path: Path, genes: list[str], column: str, problems: list[Problem],
                     display: str | None = None) -> dict[str, float] | None:
    """Values of ``column`` (e.g. ``tpm_unstranded``) for ``genes`` from a STAR - Counts file.

    Genes are matched on ``gene_name``; a name on several rows (e.g. PAR_Y copies) is summed.
    ``N_*`` summary rows are skipped. Returns ``None`` when the file is unusable.
    """
    display = display or str(path)
    header, rows = _table(path, display, problems)
    if not header:
        problems.append(Problem(display, "file is empty; expected a GDC STAR - Counts table"))
        return None
    if _missing_columns(header, STAR_COLUMNS, display, "STAR - Counts file", problems):
        return None
    if column not in header:
        values = [c for c in header if c not in STAR_COLUMNS]
        problems.append(Problem(
            display, f"header lacks column(s) {column} (--expression-column); this STAR - "
            f"Counts file has {', '.join(values)}: choose one of them", 1))
        return None
    g_col, v_col = header.index("gene_name"), header.index(column)
    wanted = set(genes)
    out: dict[str, float] = {}
    for lineno, f in rows:
        if f[0].startswith("N_"):
            continue
        gene = f[g_col].strip()
        if gene not in wanted:
            continue
        raw = f[v_col].strip()
        try:
            v = float(raw)
        except ValueError:
            v = math.nan
        if not math.isfinite(v) or v < 0:
            problems.append(Problem(
                display, f"column {column}, gene {gene}: value {raw!r} is not a non-negative "
                "number; the file is damaged, download it again", lineno))
            continue
        out[gene] = out.get(gene, 0.0) + v
    return out


# --------------------------------------------------------------------------- MAF

@dataclass(frozen=True)
class MafVariant:
    """One MAF row that fedrg keeps (a non-silent call in a gene of interest)."""

    gene: str
    chrom: str
    pos: int
    ref: str
    alt: str
    classification: str
    barcode: str
    case_uuid: str


def case_of_barcode(barcode: str) -> str:
    """The case (participant) part of a sample barcode: ``TCGA-02-0001-01A-...`` -> ``TCGA-02-0001``.

    Non-TCGA barcodes are returned unchanged.
    """
    parts = barcode.strip().split("-")
    if parts[0] in ("TCGA", "TARGET") and len(parts) >= 3:
        return "-".join(parts[:3])
    return barcode.strip()


def read_maf(path: Path, genes: list[str], problems: list[Problem],
             display: str | None = None) -> tuple[list[MafVariant], set[str], set[str]] | None:
    """Non-silent variants in ``genes`` from a (gzipped) MAF.

    A variant counts when ``Variant_Classification`` is in :data:`NONSILENT`, or is
    ``5'Flank`` in a gene of :data:`PROMOTER_GENES` (TERT promoter). GDC's masked somatic
    MAFs are already filtered, so ``FILTER`` is not re-applied.

    Returns
    -------
    (variants, barcodes, case_uuids) or None
        The kept variants, and every tumour barcode / GDC ``case_id`` the MAF covers (a
        covered case without a kept variant is wildtype for every gene).
    """
    display = display or str(path)
    header, rows = _table(path, display, problems)
    if not header:
        problems.append(Problem(display, "file is empty; expected a MAF with a Hugo_Symbol header"))
        return None
    if _missing_columns(header, MAF_COLUMNS, display, "MAF", problems):
        return None
    idx = {c: i for i, c in enumerate(header)}
    wanted = set(genes)
    variants: list[MafVariant] = []
    barcodes: set[str] = set()
    uuids: set[str] = set()
    for lineno, f in rows:
        def col(name: str, f: list[str] = f) -> str:
            return f[idx[name]].strip() if name in idx else ""

        barcode = col("Tumor_Sample_Barcode")
        if not barcode:
            problems.append(Problem(display, "column Tumor_Sample_Barcode is empty", lineno))
            continue
        barcodes.add(barcode)
        uuid = col("case_id")
        if uuid:
            uuids.add(uuid)
        gene, vc = col("Hugo_Symbol"), col("Variant_Classification")
        if gene not in wanted or not (vc in NONSILENT or (vc == "5'Flank" and gene in PROMOTER_GENES)):
            continue
        try:
            pos = int(col("Start_Position"))
        except ValueError:
            problems.append(Problem(
                display, f"column Start_Position: {col('Start_Position')!r} is not an integer "
                "(the file is damaged; download it again)", lineno))
            continue
        variants.append(MafVariant(gene, col("Chromosome"), pos, col("Reference_Allele"),
                                   col("Tumor_Seq_Allele2"), vc, barcode, uuid))
    return variants, barcodes, uuids


# --------------------------------------------------------------------------- clinical

@dataclass
class ClinicalTable:
    """Cases of a clinical TSV: submitter id -> GDC case UUID, and raw column values per case."""

    path: Path
    uuid_of: dict[str, str] = field(default_factory=dict)
    values: dict[str, dict[str, list[tuple[int, str]]]] = field(default_factory=dict)

    @property
    def cases(self) -> list[str]:
        return list(self.values)


def read_clinical(path: Path, columns: list[str], problems: list[Problem],
                  display: str | None = None) -> ClinicalTable | None:
    """Cases (``case_submitter_id``) and the raw values of ``columns`` (all rows of a case)."""
    display = display or str(path)
    header, rows = _table(path, display, problems)
    if not header:
        problems.append(Problem(display, "file is empty; expected a GDC clinical TSV"))
        return None
    sub = next((c for c in ("case_submitter_id", "cases.submitter_id") if c in header), None)
    uid = next((c for c in ("case_id", "cases.case_id") if c in header), None)
    if sub is None:
        problems.append(Problem(
            display, "header lacks case_submitter_id (or cases.submitter_id); a GDC clinical TSV "
            "is keyed by it. Pass the clinical.tsv of the GDC clinical download", 1))
        return None
    missing = [c for c in columns if c not in header]
    if missing:
        problems.append(Problem(
            display, f"header lacks column(s) {', '.join(missing)} named by --marker; "
            f"columns are: {', '.join(header[:30])}{' ...' if len(header) > 30 else ''}", 1))
        return None
    table = ClinicalTable(path)
    for lineno, f in rows:
        case = f[header.index(sub)].strip()
        if not case or case.lower() in EMPTY_VALUES:
            problems.append(Problem(display, f"column {sub} is empty", lineno))
            continue
        if uid is not None:
            table.uuid_of[case] = f[header.index(uid)].strip()
        per = table.values.setdefault(case, {})
        for c in columns:
            per.setdefault(c, []).append((lineno, f[header.index(c)].strip()))
    return table


def parse_marker_value(value: str) -> float | None:
    """A clinical value -> 1.0 / 0.0 / NaN (unknown); ``None`` when it is not understood."""
    v = value.strip().strip("'").lower() if value.strip() != "'--" else ""
    if v in EMPTY_VALUES:
        return math.nan
    if v in POSITIVE:
        return 1.0
    if v in NEGATIVE:
        return 0.0
    return None
