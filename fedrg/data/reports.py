"""Radiology report language: the findings vocabulary and the report writer.

Synthetic cohorts (:mod:`fedrg.data.synth`) and the public pre-training corpus
(:func:`generate_report_corpus`) both write their reports with :func:`render_report`, so the
base language model sees exactly the language it is later fine-tuned on.
:mod:`fedrg.data.findings` parses the same vocabulary back into labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Normalised labels of each finding (the values :func:`fedrg.data.findings.extract_findings`
# returns). ``None`` on a :class:`Findings` field means "not mentioned".
LOCATIONS = ("frontal", "temporal", "parietal", "occipital", "insular")
SIDES = ("left", "right")
ENHANCEMENT = ("none", "minimal", "patchy", "ring")
NECROSIS = ("absent", "present")
OEDEMA = ("none", "mild", "moderate", "marked")
MISMATCH = ("absent", "present")
IDH = ("wildtype", "mutant")
CODELETION = ("intact", "codeleted")
MGMT = ("unmethylated", "methylated")

FINDING_KEYS = (
    "location", "enhancement", "necrosis", "oedema", "mismatch_sign", "idh", "codeletion", "mgmt",
)


@dataclass(frozen=True)
class Findings:
    """What a report says about one tumour (``None`` = not mentioned)."""

    size_cm: float | None = None
    side: str | None = None
    location: str | None = None
    enhancement: str | None = None
    necrosis: str | None = None
    oedema: str | None = None
    mismatch_sign: str | None = None
    calcification: bool = False
    idh: str | None = None
    codeletion: str | None = None
    mgmt: str | None = None

    def labels(self) -> dict[str, str]:
        """The findings as ``extract_findings`` would return them (mentioned keys only)."""
        out = {k: getattr(self, k) for k in FINDING_KEYS}
        return {k: v for k, v in out.items() if v is not None}


_LOBE_PHRASE = {
    "frontal": "frontal lobe",
    "temporal": "temporal lobe",
    "parietal": "parietal lobe",
    "occipital": "occipital lobe",
    "insular": "insula",
}

_MASS = (
    "There is a {size} cm intra-axial mass in the {side} {lobe}.",
    "A {size} cm infiltrative mass is centred in the {side} {lobe}.",
    "{Side} {lobe} intra-axial lesion measuring {size} cm.",
    "Expansile {size} cm mass involving the {side} {lobe}.",
)
_MASS_NO_SIZE = (
    "There is an intra-axial mass in the {side} {lobe}.",
    "Infiltrative lesion centred in the {side} {lobe}.",
)
_MASS_NO_LOC = (
    "There is a {size} cm intra-axial mass.",
    "Intra-axial lesion measuring {size} cm.",
)
_ENHANCEMENT = {
    "ring": ("There is thick irregular rim enhancement.", "Peripheral ring enhancement is present."),
    "patchy": ("There is patchy heterogeneous enhancement.", "Patchy nodular enhancement is seen."),
    "minimal": ("There is faint minimal enhancement.", "Only minimal enhancement."),
    "none": ("No enhancement.", "The lesion is non-enhancing.", "There is no contrast enhancement."),
}
_NECROSIS = {
    "present": ("Central necrosis is present.", "There is a necrotic core."),
    "absent": ("No necrosis.", "No necrotic component."),
}
_OEDEMA = {
    "marked": ("Extensive surrounding vasogenic oedema.", "Marked perilesional oedema."),
    "moderate": ("Moderate perilesional oedema.", "Moderate surrounding oedema."),
    "mild": ("Mild surrounding oedema.", "Mild perilesional oedema."),
    "none": ("No significant oedema.", "No perilesional oedema."),
}
_MISMATCH = {
    "present": ("The T2-FLAIR mismatch sign is present.", "Positive T2-FLAIR mismatch sign."),
    "absent": ("No T2-FLAIR mismatch sign.", "T2-FLAIR mismatch sign is absent."),
}
_CALCIFICATION = ("Foci of calcification.", "Scattered intratumoral calcification.")
_IDH = {"mutant": ("IDH-mutant", "IDH1 R132H mutant"), "wildtype": ("IDH-wildtype", "IDH wildtype")}
_CODEL = {"codeleted": ("1p/19q codeleted",), "intact": ("1p/19q intact", "no 1p/19q codeletion")}
_MGMT = {
    "methylated": ("MGMT promoter methylated", "MGMT methylated"),
    "unmethylated": ("MGMT promoter unmethylated", "MGMT unmethylated"),
}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _impression(f: Findings) -> str:
    if f.enhancement == "ring" or f.necrosis == "present":
        return "IMPRESSION: Appearances favour a high-grade glioma."
    if f.calcification and f.location == "frontal":
        return "IMPRESSION: Appearances suggest an oligodendroglioma."
    if f.enhancement in ("none", "minimal"):
        return "IMPRESSION: Appearances favour a diffuse low-grade glioma."
    return "IMPRESSION: Diffuse glioma."


def render_report(findings: Findings, rng: np.random.Generator) -> str:
    """Write a short radiology report for ``findings``.

    Parameters
    ----------
    findings:
        What to say; ``None`` fields are left out of the report.
    rng:
        Chooses among equivalent phrasings (the report's content does not depend on it).

    Returns
    -------
    str
        Findings sentences, an impression and (where known) a molecular line.
    """
    f = findings
    parts: list[str] = []
    size = None if f.size_cm is None else f"{f.size_cm:.1f}"
    if f.location is not None:
        side = f.side or "left"
        lobe = _LOBE_PHRASE[f.location]
        tmpl = _pick(rng, _MASS) if size is not None else _pick(rng, _MASS_NO_SIZE)
        parts.append(tmpl.format(size=size, side=side, Side=side.capitalize(), lobe=lobe))
    elif size is not None:
        parts.append(_pick(rng, _MASS_NO_LOC).format(size=size))
    if f.enhancement is not None:
        parts.append(_pick(rng, _ENHANCEMENT[f.enhancement]))
    if f.necrosis is not None:
        parts.append(_pick(rng, _NECROSIS[f.necrosis]))
    if f.calcification:
        parts.append(_pick(rng, _CALCIFICATION))
    if f.oedema is not None:
        parts.append(_pick(rng, _OEDEMA[f.oedema]))
    if f.mismatch_sign is not None:
        parts.append(_pick(rng, _MISMATCH[f.mismatch_sign]))
    if parts:
        parts.append(_impression(f))
    molecular = []
    if f.idh is not None:
        molecular.append(_pick(rng, _IDH[f.idh]))
    if f.codeletion is not None:
        molecular.append(_pick(rng, _CODEL[f.codeletion]))
    if f.mgmt is not None:
        molecular.append(_pick(rng, _MGMT[f.mgmt]))
    if molecular:
        parts.append("Molecular: " + ", ".join(molecular) + ".")
    return " ".join(parts)


def random_findings(rng: np.random.Generator) -> Findings:
    """Findings drawn at random from the vocabulary (no patient behind them).

    Values are drawn loosely together (ring enhancement tends to come with necrosis), so the
    corpus reads like real reports, but every combination can occur.
    """
    aggressive = bool(rng.random() < 0.5)
    enh_p = [0.05, 0.15, 0.3, 0.5] if aggressive else [0.45, 0.3, 0.2, 0.05]
    enhancement = ENHANCEMENT[int(rng.choice(4, p=enh_p))]
    necrosis = "present" if rng.random() < (0.7 if aggressive else 0.1) else "absent"
    oed_p = [0.05, 0.2, 0.4, 0.35] if aggressive else [0.35, 0.4, 0.2, 0.05]
    mismatch = "present" if (not aggressive and rng.random() < 0.3) else "absent"
    idh = "wildtype" if aggressive and rng.random() < 0.8 else "mutant"
    codel = "codeleted" if idh == "mutant" and rng.random() < 0.35 else "intact"

    def maybe(value: str, p_keep: float = 0.9) -> str | None:
        return value if rng.random() < p_keep else None

    return Findings(
        size_cm=round(float(rng.uniform(1.5, 8.0)), 1) if rng.random() < 0.95 else None,
        side=SIDES[int(rng.integers(2))],
        location=maybe(LOCATIONS[int(rng.integers(len(LOCATIONS)))], 0.95),
        enhancement=maybe(enhancement),
        necrosis=maybe(necrosis),
        oedema=maybe(OEDEMA[int(rng.choice(4, p=oed_p))]),
        mismatch_sign=maybe(mismatch, 0.7),
        calcification=bool(codel == "codeleted" and rng.random() < 0.5),
        idh=maybe(idh, 0.5),
        codeletion=maybe(codel, 0.35),
        mgmt=maybe(MGMT[int(rng.integers(2))], 0.35),
    )


def generate_report_corpus(n: int, seed: int) -> list[str]:
    """Public synthetic report text for pre-training a base language model.

    Parameters
    ----------
    n:
        Number of reports.
    seed:
        Same seed, same corpus.

    Returns
    -------
    list[str]
        ``n`` non-empty reports in exactly the language synthetic cohorts use; they describe
        random findings and belong to no patient.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = np.random.default_rng([seed, 0x5E907])
    out = []
    for _ in range(n):
        text = render_report(random_findings(rng), rng)
        out.append(text or "No focal intra-axial mass.")
    return out
