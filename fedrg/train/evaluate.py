"""Held-out evaluation: marker AUROC (image only and multimodal), report quality, loss."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedrg.train.loop import SizedDataset, collate

if TYPE_CHECKING:  # loads transformers
    from fedrg.model.adapter import RadiogenomicsModel


def _batches(dataset: SizedDataset, batch_size: int) -> Iterator[dict[str, Any]]:
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


#: Texts whose ROUGE tokens one process keeps (the references of a hospital's held-out
#: patients repeat every round; greedy reports repeat often).
ROUGE_TOKEN_CACHE_SIZE = 8192


@functools.cache
def rouge_l_scorer() -> Any:
    """The ROUGE-L scorer of every evaluation: ``rouge_score``'s, with its default
    tokenizer (Porter stemmer) memoised per text.

    Tokenizing is a pure function of the text and costs most of a score (the stemmer runs
    in Python per word), so each text is tokenized once per process; the scores are exactly
    ``RougeScorer(["rougeL"], use_stemmer=True)``'s.
    """
    from rouge_score import rouge_scorer, tokenizers

    class _MemoTokenizer(tokenizers.Tokenizer):
        def __init__(self) -> None:
            self._inner = tokenizers.DefaultTokenizer(use_stemmer=True)
            self._memo: OrderedDict[str, tuple[str, ...]] = OrderedDict()

        def tokenize(self, text: str) -> list[str]:
            got = self._memo.get(text)
            if got is None:
                got = tuple(self._inner.tokenize(text))
                self._memo[text] = got
                if len(self._memo) > ROUGE_TOKEN_CACHE_SIZE:
                    self._memo.popitem(last=False)
            else:
                self._memo.move_to_end(text)
            return list(got)

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_MemoTokenizer())


def auroc(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> float | None:
    """ROC AUC over the known labels; ``None`` when fewer than two classes are present."""
    from sklearn.metrics import roc_auc_score

    known = mask > 0.5
    y = labels[known]
    if y.size == 0 or len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, scores[known]))


def rouge_l(generated: list[str], references: list[str]) -> float | None:
    """Mean ROUGE-L F-measure (``rouge_score``) over pairs with a non-empty reference."""
    scorer = rouge_l_scorer()
    vals = [
        scorer.score(ref, gen)["rougeL"].fmeasure
        for gen, ref in zip(generated, references, strict=True)
        if ref.strip()
    ]
    return float(np.mean(vals)) if vals else None


@torch.no_grad()
def predict_dataset(
    model: RadiogenomicsModel, dataset: SizedDataset, *, batch_size: int = 32, generate: bool = True
) -> dict[str, Any]:
    """Marker probabilities (image only and multimodal), generated reports and losses.

    Returns
    -------
    dict
        ``patient_id`` list, ``probs_image`` and ``probs_multimodal`` ``[N,K]`` arrays,
        ``markers``/``marker_mask`` ``[N,K]``, ``loss`` ``[N]``, ``reports`` (references),
        ``generated`` (list or None).
    """
    out: dict[str, list] = {k: [] for k in (
        "patient_id", "probs_image", "probs_multimodal", "markers", "marker_mask", "loss",
        "reports", "generated",
    )}
    for batch in _batches(dataset, batch_size):
        out["patient_id"] += list(batch["patient_id"])
        out["reports"] += list(batch["report"])
        out["markers"].append(batch["markers"].numpy())
        out["marker_mask"].append(batch["marker_mask"].numpy())
        # one pass per batch: the loss, both probabilities and the reports share its encoding
        # and image features (the same values as per_example_loss, marker_probabilities and
        # generate_reports one by one)
        got = model.evaluation_outputs(batch, generate=generate)
        out["loss"].append(got["loss"].cpu().numpy())
        out["probs_image"].append(got["probs_image"].cpu().numpy())
        out["probs_multimodal"].append(got["probs_multimodal"].cpu().numpy())
        if generate:
            out["generated"] += got["generated"]
    result: dict[str, Any] = dict(out)
    for k in ("probs_image", "probs_multimodal", "markers", "marker_mask", "loss"):
        result[k] = np.concatenate(out[k]) if out[k] else np.zeros((0,))
    if not generate:
        result["generated"] = None
    return result


def evaluate(
    model: RadiogenomicsModel, dataset: SizedDataset, *, batch_size: int = 32, generate: bool = True
) -> dict[str, Any]:
    """Evaluate ``model`` on held-out patients.

    Returns
    -------
    dict
        ``n``; ``loss`` (mean per-example loss, genomics as given); ``auroc`` (marker -> AUROC
        from the image alone, genomics withheld; ``None`` where undefined); ``auroc_multimodal``
        (image + genomics); ``rouge_l`` and ``findings_f1`` of greedy reports against the
        references (``None`` when ``generate`` is False or no reference exists); ``notes``:
        one sentence for each metric that is ``None``, saying why (a marker without labels
        or with one class among the held-out patients, no reference report).
    """
    from fedrg.data.findings import findings_f1

    markers = list(model.data_cfg.markers)
    if len(dataset) == 0:
        empty = dict.fromkeys(markers)
        return {"n": 0, "loss": None, "auroc": empty, "auroc_multimodal": dict(empty),
                "rouge_l": None, "findings_f1": None,
                "notes": ["no held-out patients: every metric is undefined"]}
    was_training = model.training
    model.eval()
    try:
        p = predict_dataset(model, dataset, batch_size=batch_size, generate=generate)
    finally:
        model.train(was_training)
    res: dict[str, Any] = {"n": len(p["patient_id"]), "loss": float(np.mean(p["loss"]))}
    for key, probs in (("auroc", p["probs_image"]), ("auroc_multimodal", p["probs_multimodal"])):
        res[key] = {
            m: auroc(p["markers"][:, j], probs[:, j], p["marker_mask"][:, j])
            for j, m in enumerate(markers)
        }
    if generate:
        pairs = [(g, r) for g, r in zip(p["generated"], p["reports"], strict=True) if r.strip()]
        gens = [g for g, _ in pairs]
        refs = [r for _, r in pairs]
        res["rouge_l"] = rouge_l(gens, refs) if pairs else None
        res["findings_f1"] = float(findings_f1(gens, refs)) if pairs else None
    else:
        res["rouge_l"] = None
        res["findings_f1"] = None
    res["notes"] = undefined_metric_notes(p["markers"], p["marker_mask"], markers, res["auroc"])
    if generate and res["findings_f1"] is None:
        res["notes"].append(f"findings F1 and ROUGE-L undefined: none of the {res['n']} "
                            "held-out patients has a reference report")
    return res


def undefined_metric_notes(labels: np.ndarray, mask: np.ndarray, markers: list[str],
                           aurocs: dict[str, float | None]) -> list[str]:
    """Why each ``None`` AUROC is undefined: no labels, or a single class.

    Parameters
    ----------
    labels, mask
        ``[N, K]`` marker values and known-masks of the evaluated patients.
    markers
        The K marker names.
    aurocs
        Marker -> AUROC (``None`` where undefined).
    """
    notes = []
    for j, m in enumerate(markers):
        if aurocs.get(m) is not None:
            continue
        known = labels[:, j][mask[:, j] > 0.5] if labels.size else np.zeros(0)
        if known.size == 0:
            notes.append(f"AUROC {m} undefined: none of the {labels.shape[0]} held-out patients "
                         f"has a {m} label")
        else:
            which = "positive" if known[0] > 0.5 else "negative"
            notes.append(f"AUROC {m} undefined: all {known.size} labelled held-out patient(s) "
                         f"are {which}")
    return notes


def per_patient_report_scores(
    generated: list[str], references: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient findings F1 and ROUGE-L (NaN where the reference is empty).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``[N]`` findings F1 and ``[N]`` ROUGE-L F-measure, each in [0, 1] or NaN.
    """
    from fedrg.data.findings import findings_f1

    scorer = rouge_l_scorer()
    f1 = np.full(len(references), np.nan)
    rl = np.full(len(references), np.nan)
    for i, (gen, ref) in enumerate(zip(generated, references, strict=True)):
        if ref.strip():
            f1[i] = float(findings_f1([gen], [ref]))
            rl[i] = float(scorer.score(ref, gen)["rougeL"].fmeasure)
    return f1, rl
