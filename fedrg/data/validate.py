"""Cohort validation: read every file, collect ALL problems (file + row), summarise.

:func:`validate_cohort` never stops at the first problem; :func:`fedrg.data.cohort.load_cohort`
raises :class:`~fedrg.errors.CohortError` when the list is not empty. Warnings (a marker
without labels, a cohort without reports) do not make a cohort invalid; ``fedrg validate``
prints them.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrg.config import DataConfig
from fedrg.data.genomics import read_expression, read_variants, standardise_expression
from fedrg.data.images import prepare_image, read_image
from fedrg.data.manifest import EXPRESSION, MANIFEST, VARIANTS, Cohort, read_manifest
from fedrg.errors import ImageReadError, Problem
from fedrg.files import file_sha256


@dataclass
class CohortSummary:
    """What a cohort holds (printed by ``fedrg validate``)."""

    patients: int = 0
    marker_prevalence: dict[str, tuple[int, int]] = field(default_factory=dict)  # pos, known
    genes_found: list[str] = field(default_factory=list)
    genes_missing: list[str] = field(default_factory=list)
    has_expression: bool = False
    has_variants: bool = False
    mutation_counts: dict[str, int] = field(default_factory=dict)
    image_formats: dict[str, int] = field(default_factory=dict)
    image_shapes: dict[str, int] = field(default_factory=dict)  # raw shapes
    tensor_shape: list[int] = field(default_factory=list)
    empty_reports: int = 0


@dataclass
class ValidationResult:
    """Problems, summary, the cohort itself when there were no problems, and warnings
    (true of a valid cohort, but worth knowing before training on it)."""

    root: Path
    problems: list[Problem]
    summary: CohortSummary
    cohort: Cohort | None = None
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _image_format(path: Path) -> str:
    if path.is_dir():
        return "DICOM series"
    name = path.name.lower()
    for suffix, label in ((".nii.gz", "NIfTI"), (".nii", "NIfTI"), (".dcm", "DICOM"),
                          (".dicom", "DICOM"), (".png", "PNG"), (".npy", "NumPy")):
        if name.endswith(suffix):
            return label
    return path.suffix or "?"


def image_digest(path: Path) -> str:
    """SHA-256 of an image's bytes, the same whatever the file is called: a file's own
    digest; for a DICOM series folder, the digest of its files' sorted digests."""
    if not path.is_dir():
        return file_sha256(path)
    parts = sorted(file_sha256(f) for f in path.iterdir() if f.is_file())
    return parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()


def _duplicate_images(rows: list, digests: dict[int, str],
                      problems: list[Problem]) -> None:
    """A byte-identical image under two patient ids (copied under a new name) is one
    patient counted as two privacy units."""
    first: dict[str, Any] = {}
    for i, r in enumerate(rows):
        d = digests.get(i)
        if d is None:
            continue
        if d in first:
            o = first[d]
            problems.append(Problem(
                r.image, f"patient {r.patient_id!r} ({MANIFEST} row {r.row}): this image is "
                f"byte-identical to patient {o.patient_id!r}'s image {o.image!r} (row {o.row}); "
                "one patient under two ids would count as two privacy units: merge the rows "
                "into one patient, or replace the wrong image"))
        else:
            first[d] = r


def _marker_warnings(summary: CohortSummary, n: int) -> list[Problem]:
    out = []
    for m, (pos, known) in summary.marker_prevalence.items():
        if known == 0:
            out.append(Problem(MANIFEST, f"marker column {m} has no labels (every value empty): "
                               f"the marker head learns nothing for {m} and its AUROC is "
                               "undefined; fill the column, or drop the marker from data.markers"))
        elif pos in (0, known) and n > 1:
            which = "positive" if pos else "negative"
            out.append(Problem(MANIFEST, f"marker column {m}: all {known} labelled patient(s) "
                               f"are {which}: its AUROC is undefined on this cohort"))
    if n and summary.empty_reports == n:
        out.append(Problem(MANIFEST, "no patient has a report (column report empty): training "
                           "uses the marker loss only, and reports `fedrg predict` writes for "
                           "these patients are generated, with no reference to compare"))
    return out


def leaves_cohort(path: Path, root: Path) -> Path | None:
    """Where ``path`` really lies when a symbolic link takes it (or, for a DICOM series
    folder, one of its files) outside the cohort directory ``root``; ``None`` otherwise."""
    base = root.resolve()
    candidates = [path]
    if path.is_dir():
        candidates += sorted(path.iterdir())
    for c in candidates:
        real = c.resolve()
        if real != base and base not in real.parents:
            return real
    return None


def validate_cohort(path: str | Path, data_cfg: DataConfig) -> ValidationResult:
    """Read every file of a cohort directory and check it.

    Parameters
    ----------
    path:
        The cohort directory.
    data_cfg:
        Markers, gene panel, mutation genes and image shape to check against.

    Returns
    -------
    ValidationResult
        ``problems`` (every one found, each naming file and row), a ``summary``, and the
        loaded :class:`Cohort` when ``problems`` is empty.
    """
    root = Path(path)
    problems: list[Problem] = []
    summary = CohortSummary(tensor_shape=[1, *data_cfg.image_shape])
    if not root.is_dir():
        problems.append(Problem(str(root), "cohort directory does not exist"))
        return ValidationResult(root, problems, summary)
    manifest = root / MANIFEST
    if not manifest.is_file():
        problems.append(Problem(MANIFEST, f"missing; every cohort needs {root / MANIFEST}"))
        return ValidationResult(root, problems, summary)

    rows = read_manifest(manifest, data_cfg.markers, problems)
    summary.patients = len(rows)
    summary.empty_reports = sum(1 for r in rows if not r.report)

    # ---- images: read every one
    images: list[np.ndarray | None] = []
    digests: dict[int, str] = {}
    formats: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    for i, r in enumerate(rows):
        p = root / r.image
        where = f"patient {r.patient_id!r}, {MANIFEST} row {r.row}"
        if not p.exists():
            problems.append(Problem(r.image, f"image file does not exist ({where})"))
            images.append(None)
            continue
        outside = leaves_cohort(p, root)
        if outside is not None:
            problems.append(Problem(
                r.image, f"image path resolves to {outside}, outside the cohort directory "
                f"(a symbolic link leaves the cohort); copy the file into the cohort ({where})"))
            images.append(None)
            continue
        try:
            arr = read_image(p)
        except ImageReadError as err:
            msg = str(err).replace(f"image {p}", "image").replace(str(p), "image")
            problems.append(Problem(r.image, f"{msg} ({where})"))
            images.append(None)
            continue
        formats[_image_format(p)] += 1
        shapes["x".join(map(str, arr.shape))] += 1
        images.append(prepare_image(arr, data_cfg))
        digests[i] = image_digest(p)
    summary.image_formats = dict(formats)
    summary.image_shapes = dict(shapes)
    _duplicate_images(rows, digests, problems)

    # ---- markers
    marker_arr = np.asarray([r.markers for r in rows], dtype=np.float32).reshape(
        len(rows), len(data_cfg.markers)
    )
    for k, m in enumerate(data_cfg.markers):
        col = marker_arr[:, k]
        known = ~np.isnan(col)
        summary.marker_prevalence[m] = (int(np.nansum(col)), int(known.sum()))

    ids = [r.patient_id for r in rows]
    id_set = set(ids)
    row_of = {r.patient_id: r.row for r in rows}

    # ---- expression
    n, g = len(rows), len(data_cfg.gene_panel)
    expression = np.zeros((n, g), dtype=np.float32)
    has_genomics = np.zeros(n, dtype=np.float32)
    expr_path = root / EXPRESSION
    if expr_path.is_file():
        summary.has_expression = True
        table = read_expression(
            expr_path, data_cfg.gene_panel,
            impute_missing_genes=data_cfg.impute_missing_genes, problems=problems,
        )
        if table is not None:
            summary.genes_found = table.genes_found
            summary.genes_missing = table.genes_missing
            for pid in ids:
                if pid not in table.rows:
                    problems.append(Problem(
                        EXPRESSION, f"patient {pid!r} ({MANIFEST} row {row_of[pid]}) is missing "
                        "from the expression table; add a row or remove the patient",
                    ))
            for pid in table.patient_ids:
                if pid not in id_set:
                    problems.append(Problem(
                        EXPRESSION, f"patient {pid!r} is not in {MANIFEST}; add it there or "
                        "remove the row", table.rows[pid],
                    ))
            order = [table.patient_ids.index(pid) for pid in ids if pid in table.rows]
            if len(order) == n and n > 0:
                raw = table.values[order]
                bad_cells = np.isnan(raw[:, [j for j, gname in enumerate(table.genes)
                                             if gname in table.genes_found]])
                if not bad_cells.any():
                    expression = standardise_expression(raw, table.genes)
                    has_genomics[:] = 1.0

    # ---- variants
    m_genes = data_cfg.mutation_genes
    mutations = np.zeros((n, len(m_genes)), dtype=np.float32)
    for rel in VARIANTS:
        vcf = root / rel
        if not vcf.is_file():
            continue
        summary.has_variants = True
        calls = read_variants(vcf, m_genes, problems=problems, display=rel)
        if calls is None:
            break
        sample_idx = {s: i for i, s in enumerate(calls.samples)}
        for s in calls.samples:
            if s not in id_set:
                problems.append(Problem(
                    rel, f"sample {s!r} is not a patient in {MANIFEST}", _vcf_header_row(vcf),
                ))
        for i, pid in enumerate(ids):
            if pid in sample_idx:
                mutations[i] = calls.indicators[sample_idx[pid]]
            else:
                problems.append(Problem(
                    rel, f"patient {pid!r} ({MANIFEST} row {row_of[pid]}) has no sample column; "
                    "add one (./. where not called) or remove the patient",
                ))
        summary.mutation_counts = {gname: int(mutations[:, j].sum()) for j, gname in enumerate(m_genes)}
        break

    result = ValidationResult(root, problems, summary, warnings=_marker_warnings(summary, n))
    if not problems and rows:
        result.cohort = Cohort(
            root=root, data_cfg=data_cfg, rows=rows,
            images=[im for im in images if im is not None],
            expression=expression, has_genomics=has_genomics, mutations=mutations,
            markers=marker_arr,
        )
    return result


def _vcf_header_row(path: Path) -> int | None:
    from fedrg.data.genomics import _opener

    try:
        with _opener(path) as fh:
            for i, line in enumerate(fh, start=1):
                if line.startswith("#CHROM"):
                    return i
    except (OSError, EOFError):
        return None
    return None


def format_prevalence(pos: int, known: int) -> str:
    """``'12/40 (30%)'``."""
    pct = 100.0 * pos / known if known else math.nan
    return f"{pos}/{known} ({pct:.0f}%)" if known else "0/0 (unknown)"
