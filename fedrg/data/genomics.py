"""Genomics readers: the expression table (gene panel) and the multi-sample VCF (mutations).

Both readers append every problem they find to a ``problems`` list (file + row, rows count
the header as row 1 like a spreadsheet) instead of stopping at the first one.
"""

from __future__ import annotations

import gzip
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrg.config import DEFAULT_GENE_PANEL
from fedrg.errors import Problem

# Approximate GRCh38 spans (chrom, start, end) used when a VCF record names no gene
# (INFO GENE=, SnpEff ANN= or VEP CSQ= are preferred). TERT includes its promoter.
GENE_SPANS_GRCH38: dict[str, tuple[str, int, int]] = {
    "IDH1": ("2", 208_236_227, 208_266_074),
    "IDH2": ("15", 90_083_045, 90_102_477),
    "TP53": ("17", 7_661_779, 7_687_538),
    "ATRX": ("X", 77_504_880, 77_786_233),
    "TERT": ("5", 1_253_167, 1_295_400),
    "EGFR": ("7", 55_019_017, 55_211_628),
    "PTEN": ("10", 87_863_113, 87_971_930),
    "CIC": ("19", 42_268_537, 42_297_903),
    "FUBP1": ("1", 77_944_055, 77_979_110),
    "NF1": ("17", 31_094_927, 31_382_116),
}


# --------------------------------------------------------------------------- expression

@dataclass
class ExpressionTable:
    """Raw panel values read from ``expression.tsv``.

    ``values[i, j]`` is the abundance of ``genes[j]`` for ``patient_ids[i]`` (NaN where the
    gene is missing from the table and imputation is allowed).
    """

    path: Path
    patient_ids: list[str]
    rows: dict[str, int]
    genes: list[str]
    values: np.ndarray
    genes_found: list[str] = field(default_factory=list)
    genes_missing: list[str] = field(default_factory=list)


def read_expression(
    path: Path,
    gene_panel: list[str],
    *,
    impute_missing_genes: bool,
    problems: list[Problem],
    display: str = "genomics/expression.tsv",
) -> ExpressionTable | None:
    """Read the panel genes of a patients x genes TSV (first column ``patient_id``).

    Values must be finite, non-negative abundances (TPM or counts); only panel columns are
    checked. Genes of the panel missing from the header are a problem unless
    ``impute_missing_genes``. Returns ``None`` when the header is unusable.
    """
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        problems.append(Problem(display, f"cannot read the file ({err})"))
        return None
    if not lines or not lines[0].strip():
        problems.append(Problem(display, "file is empty; expected a header 'patient_id<TAB>GENE...'", 1))
        return None
    header = [h.strip() for h in lines[0].split("\t")]
    if header[0] != "patient_id":
        problems.append(Problem(
            display, f"first header column is {header[0]!r}; it must be 'patient_id' "
            "(the file must be tab-separated)", 1,
        ))
        return None
    col: dict[str, int] = {}
    for j, gene in enumerate(header[1:], start=1):
        if gene in col:
            problems.append(Problem(display, f"gene column {gene!r} appears twice", 1))
        col.setdefault(gene, j)
    found = [g for g in gene_panel if g in col]
    missing = [g for g in gene_panel if g not in col]
    if missing and not impute_missing_genes:
        problems.append(Problem(
            display, f"{len(missing)} panel gene(s) missing from the header: "
            f"{', '.join(missing)}; add them or set data.impute_missing_genes = true", 1,
        ))
    ids: list[str] = []
    rows: dict[str, int] = {}
    values: list[list[float]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        pid = fields[0].strip()
        if len(fields) != len(header):
            problems.append(Problem(
                display, f"has {len(fields)} fields, header has {len(header)}", lineno,
            ))
            continue
        if not pid:
            problems.append(Problem(display, "empty patient_id", lineno))
            continue
        if pid in rows:
            problems.append(Problem(
                display, f"duplicate patient_id {pid!r} (first at row {rows[pid]})", lineno,
            ))
            continue
        row_vals = []
        for gene in gene_panel:
            at = col.get(gene)
            if at is None:
                row_vals.append(math.nan)
                continue
            raw = fields[at].strip()
            try:
                v = float(raw)
            except ValueError:
                v = None
            if v is None or not math.isfinite(v):
                problems.append(Problem(
                    display, f"patient {pid!r}, gene {gene}: value {raw!r} is not a finite "
                    "number", lineno,
                ))
                v = math.nan
            elif v < 0:
                problems.append(Problem(
                    display, f"patient {pid!r}, gene {gene}: negative value {raw}; expression "
                    "must be non-negative abundances (TPM or counts)", lineno,
                ))
                v = math.nan
            row_vals.append(v)
        ids.append(pid)
        rows[pid] = lineno
        values.append(row_vals)
    arr = np.asarray(values, dtype=np.float64).reshape(len(values), len(gene_panel))
    return ExpressionTable(path, ids, rows, list(gene_panel), arr, found, missing)


#: Public normalisation constants of ``log1p`` expression, per gene of the default panel. Measured once on public synthetic data (the generator of
#: :mod:`fedrg.data.synth` with the public seed 99, 4 hospitals x 100 patients, no patient
#: data; recompute with ``python -m fedrg.data.genomics``). Fixed, so they cost no privacy
#: and are identical at every hospital. Genes without constants are left at ``log1p``.
PUBLIC_EXPRESSION_CENTRE: dict[str, float] = dict(zip(DEFAULT_GENE_PANEL, (
    4.6572, 5.3102, 5.8076, 6.381, 5.8555, 6.6907, 3.3102, 3.7947, 4.5027, 4.3363, 2.9464,
    5.484, 4.1487, 2.945, 2.0439, 5.2374, 5.9222, 5.2676, 3.0373, 3.3469, 1.8264, 3.6486,
    2.5964, 4.5415, 4.4527, 4.9376, 2.0005, 4.3197, 4.051, 3.0954, 2.7552, 2.299,
), strict=True))
PUBLIC_EXPRESSION_SCALE: dict[str, float] = dict(zip(DEFAULT_GENE_PANEL, (
    1.3171, 1.2465, 1.3037, 1.2801, 1.2947, 1.3171, 1.3004, 1.2491, 1.1609, 1.1364, 1.1622,
    1.1289, 0.6203, 0.6116, 0.7309, 0.6587, 0.62, 0.7528, 0.6865, 0.7216, 0.7194, 0.7144,
    1.0216, 1.0186, 1.1517, 0.6608, 0.6073, 0.6066, 0.9804, 0.6899, 0.6145, 0.6398,
), strict=True))
PUBLIC_SEED = 99


def standardise_expression(values: np.ndarray, genes: list[str] | None = None) -> np.ndarray:
    """Normalise each patient's expression on its own, with public constants only.

    ``log1p``, then per gene subtract and divide by the public constants
    :data:`PUBLIC_EXPRESSION_CENTRE` / :data:`PUBLIC_EXPRESSION_SCALE` (0 and 1 for genes
    without constants). No statistic of other patients enters a record, so one patient never
    changes another patient's input (the DP argument needs this). NaN (imputed) entries
    become 0. (Centring each record on its own gene mean, median or housekeeping genes was
    measured too: it removes library shifts but lost 0.08-0.10 of 1p/19q AUROC of a
    logistic regression on expression, whose signal is a small shift of 8 of 32 genes.)

    Parameters
    ----------
    values : np.ndarray
        ``[N, G]`` non-negative abundances (NaN where imputed).
    genes : list[str] | None
        The ``G`` gene names (None: the default panel when ``G`` matches, else no constants).

    Returns
    -------
    np.ndarray
        ``[N, G]`` float32.
    """
    values = np.asarray(values, dtype=np.float64)
    if genes is None:
        genes = list(DEFAULT_GENE_PANEL) if values.shape[1] == len(DEFAULT_GENE_PANEL) else []
    centre = np.array([PUBLIC_EXPRESSION_CENTRE.get(g, 0.0) for g in genes] or [0.0] * values.shape[1])
    scale = np.array([PUBLIC_EXPRESSION_SCALE.get(g, 1.0) for g in genes] or [1.0] * values.shape[1])
    z = (np.log1p(values) - centre) / scale
    return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _measure_public_constants(seed: int = PUBLIC_SEED, hospitals: int = 4,
                              patients: int = 100) -> tuple[list[float], list[float]]:
    """Re-measure the public constants on synthetic data (the generator, no files)."""
    from fedrg.data import synth

    genes = list(DEFAULT_GENE_PANEL)
    rows = []
    for index in range(1, hospitals + 1):
        profile, pats = synth.simulate_hospital(seed, index, patients)
        baselines = synth.gene_baselines(sorted(genes))
        brng = np.random.default_rng([seed, index, 0xBA7C])
        batch = {g: float(brng.normal(0, 0.15)) for g in sorted(baselines)}
        for i, p in enumerate(pats):
            grng = np.random.default_rng([seed, index, i, 4])
            rows.append(synth.expression_row(p, profile, genes, baselines, batch, grng))
    v = np.log1p(np.round(np.asarray(rows), 3))
    return ([round(float(x), 4) for x in v.mean(0)], [round(float(x), 4) for x in v.std(0, ddof=1)])


# --------------------------------------------------------------------------- variants

@dataclass
class VariantCalls:
    """Per-sample mutation indicators from a VCF."""

    path: Path
    samples: list[str]
    genes: list[str]
    indicators: np.ndarray  # [samples, genes] 0/1
    records: int = 0


_GT_SPLIT = re.compile(r"[/|]")


def _norm_chrom(chrom: str) -> str:
    return chrom[3:] if chrom.lower().startswith("chr") else chrom


def gene_of_record(chrom: str, pos: int, info: str) -> set[str]:
    """Gene names a VCF record is annotated with (INFO GENE/ANN/CSQ), else by position."""
    genes: set[str] = set()
    for item in info.split(";"):
        key, _, val = item.partition("=")
        if key == "GENE":
            genes.update(v for v in val.split(",") if v)
        elif key == "ANN":
            for ann in val.split(","):
                parts = ann.split("|")
                if len(parts) > 3 and parts[3]:
                    genes.add(parts[3])
        elif key == "CSQ":
            for csq in val.split(","):
                genes.update(p for p in csq.split("|") if p in GENE_SPANS_GRCH38)
    if genes:
        return genes
    c = _norm_chrom(chrom)
    return {g for g, (gc, s, e) in GENE_SPANS_GRCH38.items() if gc == c and s <= pos <= e}


def _opener(path: Path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else path.open()


def read_variants(
    path: Path,
    mutation_genes: list[str],
    *,
    problems: list[Problem],
    display: str = "genomics/variants.vcf",
) -> VariantCalls | None:
    """Per-gene mutation indicators from a multi-sample VCF (sample names = patient ids).

    A sample carries a mutation in a gene when a record of that gene with FILTER ``PASS``
    or ``.`` has a genotype with a non-reference allele. Returns ``None`` when the file is
    unusable.
    """
    gene_index = {g: j for j, g in enumerate(mutation_genes)}
    samples: list[str] | None = None
    ind: np.ndarray | None = None
    n_records = 0
    try:
        with _opener(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                line = raw.rstrip("\n").rstrip("\r")
                if lineno == 1 and not line.startswith("##fileformat=VCF"):
                    problems.append(Problem(display, "first line must be ##fileformat=VCFv4.x", 1))
                    return None
                if line.startswith("##") or not line.strip():
                    continue
                fields = line.split("\t")
                if line.startswith("#CHROM"):
                    if len(fields) < 10 or fields[8] != "FORMAT":
                        problems.append(Problem(
                            display, "header line needs #CHROM..INFO, FORMAT and one column per "
                            "sample", lineno,
                        ))
                        return None
                    samples = [s.strip() for s in fields[9:]]
                    dupes = sorted({s for s in samples if samples.count(s) > 1})
                    if dupes:
                        problems.append(Problem(
                            display, f"duplicate sample name(s) {', '.join(dupes)}", lineno,
                        ))
                    ind = np.zeros((len(samples), len(mutation_genes)), dtype=np.float32)
                    continue
                if samples is None or ind is None:
                    problems.append(Problem(display, "data line before the #CHROM header", lineno))
                    return None
                n_records += 1
                if len(fields) != 9 + len(samples):
                    problems.append(Problem(
                        display, f"has {len(fields)} fields, expected {9 + len(samples)} "
                        "(truncated line?)", lineno,
                    ))
                    continue
                try:
                    pos = int(fields[1])
                except ValueError:
                    problems.append(Problem(display, f"POS {fields[1]!r} is not an integer", lineno))
                    continue
                if fields[6] not in ("PASS", "."):
                    continue
                genes = [g for g in gene_of_record(fields[0], pos, fields[7]) if g in gene_index]
                fmt = fields[8].split(":")
                if "GT" not in fmt:
                    problems.append(Problem(display, "FORMAT has no GT field", lineno))
                    continue
                gt_i = fmt.index("GT")
                for s_i, sample_field in enumerate(fields[9:]):
                    parts = sample_field.split(":")
                    gt = parts[gt_i] if gt_i < len(parts) else "."
                    alleles = [a for a in _GT_SPLIT.split(gt) if a not in (".", "")]
                    if not all(a.isdigit() for a in alleles):
                        problems.append(Problem(
                            display, f"sample {samples[s_i]!r}: bad genotype {gt!r}", lineno,
                        ))
                        continue
                    if any(int(a) > 0 for a in alleles):
                        for g in genes:
                            ind[s_i, gene_index[g]] = 1.0
    except (OSError, EOFError, UnicodeDecodeError) as err:
        problems.append(Problem(display, f"cannot read the file ({type(err).__name__}: {err})"))
        return None
    if samples is None or ind is None:
        problems.append(Problem(display, "no #CHROM header line"))
        return None
    return VariantCalls(path, samples, list(mutation_genes), ind, n_records)


if __name__ == "__main__":  # pragma: no cover - prints the constants to paste above
    c, sd = _measure_public_constants()
    print("centre", tuple(c))
    print("scale", tuple(sd))
