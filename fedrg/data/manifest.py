"""A hospital cohort's file layout, ``manifest.csv`` parsing and the :class:`Cohort` record.

No reading beyond the manifest happens here: :mod:`fedrg.data.validate` reads every file
and builds the :class:`Cohort`; :func:`fedrg.data.cohort.load_cohort` is the entry point.

Layout (see docs/cohort-format.md)::

    COHORT/manifest.csv              patient_id, image, report, <one column per marker>
    COHORT/genomics/expression.tsv   patients x genes, first column patient_id
    COHORT/genomics/variants.vcf     optional multi-sample VCF (samples = patient ids)
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from fedrg.config import DataConfig
from fedrg.errors import Problem

MANIFEST = "manifest.csv"
EXPRESSION = "genomics/expression.tsv"
VARIANTS = ("genomics/variants.vcf", "genomics/variants.vcf.gz")
REQUIRED_COLUMNS = ("patient_id", "image")


@dataclass(frozen=True)
class ManifestRow:
    """One patient row of ``manifest.csv`` (``row`` counts CSV records, the header is row 1)."""

    row: int
    patient_id: str
    image: str
    report: str
    markers: tuple[float, ...]  # 0.0 / 1.0, NaN = unknown


def parse_marker(value: str) -> float | None:
    """``'0'``/``'1'`` -> 0.0/1.0, ``''`` -> NaN (unknown), anything else -> ``None``."""
    v = value.strip()
    if v == "":
        return math.nan
    if v in ("0", "1", "0.0", "1.0"):
        return float(v)
    return None


def read_manifest(path: Path, markers: list[str], problems: list[Problem]) -> list[ManifestRow]:
    """Parse ``manifest.csv``, appending every problem (with its row) to ``problems``.

    Rows with problems in ``patient_id`` or ``image`` are dropped; a bad marker value is
    reported and treated as unknown.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        problems.append(Problem(MANIFEST, f"cannot read the file ({err})"))
        return []
    reader = csv.reader(io.StringIO(text, newline=""))  # quoted reports may span lines
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in (*REQUIRED_COLUMNS, *markers) if c not in header]
    if missing:
        known = {*REQUIRED_COLUMNS, "report", *markers}
        unknown = [c for c in header if c not in known]
        found = (f"; it has unknown column(s) {', '.join(repr(c) for c in unknown)} "
                 "(misspelt? rename to the expected name)" if unknown else "")
        problems.append(Problem(
            MANIFEST, f"header lacks column(s) {', '.join(missing)}{found}; expected "
            f"patient_id, image, report and one column per marker ({', '.join(markers)})", 1,
        ))
        if any(c in missing for c in REQUIRED_COLUMNS):
            return []
    idx = {name: i for i, name in enumerate(header)}
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    seen_images: dict[str, tuple[str, int]] = {}
    for rowno, fields in enumerate(reader, start=2):
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            problems.append(Problem(
                MANIFEST, f"has {len(fields)} fields, header has {len(header)}", rowno,
            ))
            continue

        def get(name: str, fields: list[str] = fields) -> str:
            return fields[idx[name]] if name in idx else ""

        pid = get("patient_id").strip()
        image = get("image").strip()
        ok = True
        if not pid:
            problems.append(Problem(MANIFEST, "empty patient_id", rowno))
            ok = False
        elif pid in seen:
            problems.append(Problem(
                MANIFEST, f"duplicate patient_id {pid!r} (first at row {seen[pid]}); one patient "
                "is one privacy unit and must have exactly one row", rowno,
            ))
            ok = False
        else:
            seen[pid] = rowno
        if not image:
            problems.append(Problem(MANIFEST, f"patient {pid!r}: empty image path", rowno))
            ok = False
        elif PurePosixPath(image).is_absolute() or ".." in PurePosixPath(image).parts:
            problems.append(Problem(
                MANIFEST, f"patient {pid!r}: image path {image!r} must be relative to the cohort "
                "folder and stay inside it", rowno,
            ))
            ok = False
        elif ok:
            norm = str(PurePosixPath(image))
            if norm in seen_images:
                other, other_row = seen_images[norm]
                problems.append(Problem(
                    MANIFEST, f"patient {pid!r} points to the same image {image!r} as patient "
                    f"{other!r} (row {other_row}): one patient under two ids would count as two "
                    "privacy units; merge the rows into one patient", rowno,
                ))
                ok = False
            else:
                seen_images[norm] = (pid, rowno)
        values = []
        for m in markers:
            v = parse_marker(get(m))
            if v is None:
                problems.append(Problem(
                    MANIFEST, f"patient {pid!r}: unknown value {get(m)!r} in marker column {m}; "
                    "use 0, 1, or leave empty for unknown", rowno,
                ))
                v = math.nan
            values.append(v)
        if ok:
            rows.append(ManifestRow(rowno, pid, image, get("report").strip(), tuple(values)))
    if not rows and not problems:
        problems.append(Problem(MANIFEST, "no patient rows"))
    return rows


@dataclass
class Cohort:
    """A validated cohort, with images already prepared to the configured tensor shape.

    Attributes
    ----------
    root:
        The cohort directory.
    patient_ids:
        One id per patient, in manifest order.
    images:
        ``[1, H, W]`` or ``[1, D, H, W]`` float32 arrays (see :func:`fedrg.data.images.prepare_image`).
    expression:
        ``[N, G]`` float32, log1p, centred and scaled with public per-gene constants (no statistic of
        other patients; see :mod:`fedrg.data.genomics`); zeros without genomics.
    has_genomics:
        ``[N]`` float32, 1.0 where the patient has an expression profile.
    mutations:
        ``[N, M]`` float32 0/1 (zeros without a VCF).
    markers:
        ``[N, K]`` float32 0/1 with NaN for unknown.
    """

    root: Path
    data_cfg: DataConfig
    rows: list[ManifestRow]
    images: list[np.ndarray]
    expression: np.ndarray
    has_genomics: np.ndarray
    mutations: np.ndarray
    markers: np.ndarray

    @property
    def patient_ids(self) -> list[str]:
        return [r.patient_id for r in self.rows]

    @property
    def reports(self) -> list[str]:
        return [r.report for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)
