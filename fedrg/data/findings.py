"""Rule-based findings labeler for radiology reports (in the spirit of CheXbert/CheXpert).

:func:`extract_findings` turns report text into normalised labels for a fixed set of keys
(the vocabulary of :mod:`fedrg.data.reports`); :func:`findings_f1` scores generated reports
against references by micro F1 over ``(key, value)`` pairs. Rules are ordered: negated and
more specific phrasings are tried before the general ones (``unmethylated`` before
``methylated``, ``non-enhancing`` before ``enhancement``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fedrg.data.reports import FINDING_KEYS

# key -> ordered (pattern, label) rules; the first pattern that matches anywhere wins.
_RULES: dict[str, list[tuple[str, str]]] = {
    "location": [
        (r"\bfrontal\b", "frontal"),
        (r"\btemporal\b", "temporal"),
        (r"\bparietal\b", "parietal"),
        (r"\boccipital\b", "occipital"),
        (r"\binsul(a|ar)\b", "insular"),
    ],
    "enhancement": [
        (r"\bnon-?enhancing\b|\bno (contrast )?enhancement\b|\bwithout enhancement\b", "none"),
        (r"\b(rim|ring)[- ]?enhanc", "ring"),
        (r"\bpatchy\b[^.]*\benhanc|\bnodular enhancement\b", "patchy"),
        (r"\b(minimal|faint|subtle)\b[^.]*\benhancement\b", "minimal"),
    ],
    "necrosis": [
        (r"\bno (central )?necro|\bwithout necro|\bno necrotic\b", "absent"),
        (r"\bnecro(sis|tic)\b", "present"),
    ],
    "oedema": [
        (r"\bno (significant |perilesional |surrounding )?(o?edema)\b", "none"),
        (r"\b(extensive|marked|severe)\b[^.]*\bo?edema\b", "marked"),
        (r"\bmoderate\b[^.]*\bo?edema\b", "moderate"),
        (r"\b(mild|minimal|slight)\b[^.]*\bo?edema\b", "mild"),
    ],
    "mismatch_sign": [
        (r"\bno t2[- ]flair mismatch\b|\bmismatch sign is (absent|not seen)\b", "absent"),
        (r"\bt2[- ]flair mismatch sign is present\b|\bpositive t2[- ]flair mismatch\b", "present"),
        (r"\bt2[- ]flair mismatch sign\b", "present"),
    ],
    "idh": [
        (r"\bidh[- ]?(1|2)?[- ]?wild[- ]?type\b", "wildtype"),
        (r"\bidh[12]?\b[^.,;]*\bmutant\b|\bidh[12]?[- ]mutated\b", "mutant"),
    ],
    "codeletion": [
        (r"\bno 1p/19q co-?deletion\b|\b1p/19q (intact|non-?co-?deleted)\b", "intact"),
        (r"\b1p/19q co-?deleted\b|\b1p/19q co-?deletion\b", "codeleted"),
    ],
    "mgmt": [
        (r"\bmgmt\b[^.,;]*\bunmethylated\b", "unmethylated"),
        (r"\bmgmt\b[^.,;]*\bmethylated\b", "methylated"),
    ],
}
_COMPILED = {k: [(re.compile(p), v) for p, v in rules] for k, rules in _RULES.items()}
assert tuple(_COMPILED) == FINDING_KEYS


def extract_findings(report: str) -> dict[str, str]:
    """Normalised findings mentioned in a report.

    Parameters
    ----------
    report:
        Free report text (any case; may be empty).

    Returns
    -------
    dict[str, str]
        Keys among ``location, enhancement, necrosis, oedema, mismatch_sign, idh, codeletion,
        mgmt``; a key is absent when the report does not mention it. Values are the labels of
        :mod:`fedrg.data.reports` (e.g. ``enhancement`` in ``none/minimal/patchy/ring``).
    """
    text = " ".join(report.lower().split())
    out: dict[str, str] = {}
    for key, rules in _COMPILED.items():
        for pattern, label in rules:
            if pattern.search(text):
                out[key] = label
                break
    return out


def findings_f1(generated: Sequence[str], references: Sequence[str]) -> float:
    """Micro F1 over ``(key, value)`` findings pairs of generated vs reference reports.

    Parameters
    ----------
    generated, references:
        Paired reports (same length).

    Returns
    -------
    float
        ``2 TP / (2 TP + FP + FN)`` summed over all pairs; 1.0 when neither side mentions any
        finding at all.
    """
    if len(generated) != len(references):
        raise ValueError(
            f"findings_f1 needs paired reports: {len(generated)} generated vs "
            f"{len(references)} references"
        )
    tp = fp = fn = 0
    for gen, ref in zip(generated, references, strict=True):
        g = set(extract_findings(gen).items())
        r = set(extract_findings(ref).items())
        tp += len(g & r)
        fp += len(g - r)
        fn += len(r - g)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom
