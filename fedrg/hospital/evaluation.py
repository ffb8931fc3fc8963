"""The aggregates a hospital's evaluation release is made of (before any noise is added)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedrg.data.schema import RecordDataset
from fedrg.privacy.release import BINS, DEFAULT_LOSS_CLIP, exact_aggregates
from fedrg.train.evaluate import per_patient_report_scores, predict_dataset

if TYPE_CHECKING:  # loads torch and transformers
    from fedrg.model.adapter import RadiogenomicsModel


def release_aggregates(
    model: RadiogenomicsModel, dataset: RecordDataset, *, batch_size: int = 32, generate: bool = True,
    loss_clip: float | None = None, bins: int | None = None,
) -> dict[str, np.ndarray]:
    """Exact aggregates of ``dataset`` for a DP release (see :mod:`fedrg.privacy.release`).

    The caller noises them (:func:`fedrg.privacy.release.noisy_release`) before anything
    leaves the hospital.
    """
    markers = list(model.data_cfg.markers)
    was_training = model.training
    model.eval()
    try:
        if len(dataset):
            p = predict_dataset(model, dataset, batch_size=batch_size, generate=generate)
        else:
            k = len(markers)
            p = {"probs_image": np.zeros((0, k)), "probs_multimodal": np.zeros((0, k)),
                 "markers": np.zeros((0, k)), "marker_mask": np.zeros((0, k)),
                 "loss": np.zeros(0), "generated": [] if generate else None, "reports": []}
    finally:
        model.train(was_training)
    f1 = rl = None
    if generate:
        f1, rl = per_patient_report_scores(list(p["generated"]), list(p["reports"]))
    return exact_aggregates(
        markers=markers, probs={"auroc": p["probs_image"], "auroc_multimodal": p["probs_multimodal"]},
        labels=p["markers"], mask=p["marker_mask"], loss=p["loss"], findings_f1=f1, rouge_l=rl,
        loss_clip=DEFAULT_LOSS_CLIP if loss_clip is None else loss_clip,
        bins=BINS if bins is None else bins)
