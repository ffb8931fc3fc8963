"""Index a folder of DICOM series (e.g. a TCIA download) by PatientID and series.

Only headers are read (``stop_before_pixels``). Files that are not DICOM (a TCIA
``LICENSE``, ``metadata.csv``) are skipped; a DICOM file whose header cannot be parsed is
a problem naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedrg.errors import Problem

__all__ = ["DicomSeries", "choose_series", "index_dicom"]


@dataclass
class DicomSeries:
    """One series: its UID, description, modality and files."""

    patient_id: str
    uid: str
    description: str
    modality: str
    files: list[Path] = field(default_factory=list)


def index_dicom(root: Path, problems: list[Problem]) -> dict[str, dict[str, DicomSeries]]:
    """``PatientID -> SeriesInstanceUID -> DicomSeries`` for every DICOM file under ``root``."""
    import pydicom
    from pydicom.misc import is_dicom

    out: dict[str, dict[str, DicomSeries]] = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            if not is_dicom(str(path)):
                continue
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as err:
            problems.append(Problem(
                str(path), f"cannot read the DICOM header ({type(err).__name__}: {err}); "
                "the file is truncated or corrupt: download the series again or remove it"))
            continue
        pid = str(getattr(ds, "PatientID", "") or "").strip()
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "").strip()
        if not pid or not uid:
            missing = "PatientID" if not pid else "SeriesInstanceUID"
            problems.append(Problem(
                str(path), f"DICOM tag {missing} is empty; the importer matches series to GDC "
                "cases by PatientID (= case_submitter_id): set the tag or remove the file"))
            continue
        series = out.setdefault(pid, {}).setdefault(uid, DicomSeries(
            pid, uid, str(getattr(ds, "SeriesDescription", "") or ""),
            str(getattr(ds, "Modality", "") or "")))
        series.files.append(path)
    return out


def choose_series(series: dict[str, DicomSeries], prefer: str | None) -> tuple[DicomSeries | None, str]:
    """Pick one series of a patient.

    With ``prefer`` only series whose SeriesDescription contains it (case-insensitive) are
    candidates; among candidates the one with most files wins (ties: smallest UID).

    Returns
    -------
    (series or None, note)
        ``note`` says why (shown in the import report when there was a choice).
    """
    cands = list(series.values())
    if prefer:
        cands = [s for s in cands if prefer.lower() in s.description.lower()]
        if not cands:
            have = ", ".join(sorted(repr(s.description) for s in series.values()))
            return None, f"no series description contains {prefer!r} (series: {have})"
    cands.sort(key=lambda s: (-len(s.files), s.uid))
    best = cands[0]
    note = ""
    if len(series) > 1:
        note = (f"{len(series)} series; chose {best.description or best.uid!r} "
                f"({len(best.files)} files)")
    return best, note
