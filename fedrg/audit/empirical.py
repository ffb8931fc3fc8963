"""Empirical privacy audit of the real training pipeline with canary patients in one run.

Steinke, Nasr and Jagielski (2023), "Privacy auditing with one (1) training run"
(arXiv:2305.08846). :mod:`fedrg.audit.canary` holds the statistics; this module runs the
experiment on the real fedrg model, data path and DP-SGD session:

1. **Canaries.** ``m`` fabricated patients. Canary ``i`` borrows the image of a held-out
   cohort patient (the validation split, never trained on as itself), and gets a unique
   random genomic profile (expression ``~ N(0, expression_scale^2)`` per gene, far outside the
   standardised cohort's ``N(0, 1)``; random mutation calls; ``has_genomics = 1``), random
   0/1 labels for every marker (all known), an empty report and the id ``canary-<i>``.
   Each canary is **one training record** (one patient: the privacy unit).
2. **Inclusion.** Each canary joins the training set independently with probability 1/2
   (:func:`fedrg.audit.canary.draw_inclusion`). The coins come from a seed drawn from OS
   entropy unless one is given; the seed is recorded in the result.
3. **Training.** The training set is the cohort's training split plus the included canaries.
   The model (:func:`fedrg.model.adapter.build_model`) is trained by
   :func:`fedrg.train.loop.train_local`, either with a :class:`~fedrg.privacy.dpsgd.DPSession`
   whose noise is calibrated to ``target_epsilon`` or without DP. Genomics withholding and
   image augmentation are off, so nothing hides a canary's unique profile from the model.
   The Poisson sample rate is fixed *before* the coins are drawn
   (``batch_size / (cohort records + m/2)``): it must not depend on who is included.
4. **Scores (black box).** Each canary's score is minus its loss under the trained model:
   with an empty report that is the log-likelihood of its own random marker labels. A model
   that memorised a canary predicts its labels well.
5. **Guesses and bound.** The ``k_pos`` highest scores are guessed "included", the ``k_neg``
   lowest "excluded" (both fixed before training); :func:`fedrg.audit.canary.audit_from_scores`
   turns the number of correct guesses into an epsilon lower bound at confidence
   ``1 - beta``. For a DP run the bound must stay at or below the accounted epsilon (up to
   probability ``beta``); a clearly larger bound means the implementation leaks more than it
   accounts for. A non-private run shows what the audit can detect.

With a few hundred canaries the bound cannot exceed about 3-4 even for a model that leaks
everything (``r`` correct guesses out of ``r`` reject at most ``log(q / (1 - q))`` with
``q = beta^(1/r)``): the audit detects gross accounting or clipping bugs, not small slack.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedrg.audit.canary import audit_from_scores, draw_inclusion
from fedrg.config import DataConfig, ModelConfig, TrainingConfig
from fedrg.errors import PrivacyError
from fedrg.train.schedule import poisson_sample_rate

if TYPE_CHECKING:  # loads transformers
    from fedrg.model.adapter import RadiogenomicsModel

#: Defaults of the audit experiment (sized for about a minute per run on 2 CPU cores).
DEFAULT_CANARIES = 256
DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 32
DEFAULT_EXPRESSION_SCALE = 3.0
#: Guesses "included" / "excluded" as fractions of the canaries (see :func:`guess_counts`).
DEFAULT_POS_FRACTION = 1 / 64
DEFAULT_NEG_FRACTION = 5 / 16


def audit_data_config(**changes: Any) -> DataConfig:
    """Default markers and gene panel with small 32x32 2D images."""
    values: dict[str, Any] = {"image_mode": "2d", "image_shape": [32, 32]}
    values.update(changes)
    return DataConfig(**values)


def audit_model_config(**changes: Any) -> ModelConfig:
    """A small adapter on the built-in tiny base, genomics never withheld."""
    values: dict[str, Any] = {
        "base": "builtin:tiny", "encoder_width": 32, "lora_rank": 4, "max_report_tokens": 12,
        "genomics_dropout": 0.0,
    }
    values.update(changes)
    return ModelConfig(**values)


def audit_training_config(**changes: Any) -> TrainingConfig:
    """AdamW at a high learning rate, no augmentation (nothing hides a canary)."""
    values: dict[str, Any] = {
        "batch_size": DEFAULT_BATCH_SIZE, "max_physical_batch_size": 64, "lr": 5e-3,
        "augment": False, "seed": 0, "threads": 1,
    }
    values.update(changes)
    return TrainingConfig(**values)


# --------------------------------------------------------------------------- canaries

def make_canaries(
    images: Sequence[np.ndarray],
    data_cfg: DataConfig,
    *,
    m: int,
    rng: np.random.Generator,
    expression_scale: float = DEFAULT_EXPRESSION_SCALE,
) -> list[dict[str, Any]]:
    """``m`` canary records in the :class:`~fedrg.data.dataset.CohortDataset` item format.

    Parameters
    ----------
    images
        Real, prepared cohort images (``[1,H,W]`` or ``[1,D,H,W]``); canary ``i`` borrows
        ``images[i % len(images)]``.
    data_cfg
        Gene panel, mutation genes and markers (the record shapes).
    m
        Number of canaries.
    rng
        Source of the random genomic profiles and labels.
    expression_scale
        Standard deviation of the canaries' expression values (the cohort's are
        standardised to about 1): larger = more distinctive, easier to memorise.

    Returns
    -------
    list[dict]
        One record per canary, ``patient_id`` ``canary-0000`` ... (unique).
    """
    if m < 1:
        raise PrivacyError(f"--canaries={m}: need at least one canary")
    if not images:
        raise PrivacyError("no cohort images to build canaries from; the cohort needs >= 2 "
                           "patients (a held-out patient lends its image)")
    if not expression_scale > 0:
        raise PrivacyError(f"expression_scale={expression_scale} must be > 0")
    g, n_mut, k = len(data_cfg.gene_panel), len(data_cfg.mutation_genes), len(data_cfg.markers)
    width = max(4, len(str(m - 1)))
    out = []
    for i in range(m):
        image = np.asarray(images[i % len(images)], dtype=np.float32)
        out.append({
            "image": torch.from_numpy(image.copy()),
            "expression": torch.from_numpy(
                (rng.standard_normal(g) * expression_scale).astype(np.float32)),
            "mutations": torch.from_numpy((rng.random(n_mut) < 0.5).astype(np.float32)),
            "has_genomics": torch.tensor(1.0, dtype=torch.float32),
            "markers": torch.from_numpy((rng.random(k) < 0.5).astype(np.float32)),
            "marker_mask": torch.ones(k, dtype=torch.float32),
            "report": "",
            "patient_id": f"canary-{i:0{width}d}",
        })
    return out


class RecordDataset(Dataset):
    """A base dataset (e.g. a cohort's training split) followed by extra records.

    Items are the :class:`~fedrg.data.dataset.CohortDataset` dicts; :meth:`empty_batch`
    serves empty Poisson draws.
    """

    def __init__(self, base: Dataset | None, extra: Sequence[dict[str, Any]],
                 data_cfg: DataConfig) -> None:
        self.base = base
        self.extra = list(extra)
        self.data_cfg = data_cfg
        self._n_base = 0 if base is None else len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._n_base + len(self.extra)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        if i < self._n_base:
            return self.base[i]  # type: ignore[index]
        return self.extra[i - self._n_base]

    def empty_batch(self) -> dict[str, Any]:
        """A collated batch of size 0 with the right shapes."""
        from fedrg.data.dataset import empty_batch

        return empty_batch(self.data_cfg)


@dataclass
class CanaryDesign:
    """The secret side of one audit: the canaries, who is included, and the base data.

    Attributes
    ----------
    base
        The cohort's training split (always trained on).
    canaries
        All ``m`` canary records (one record each).
    included
        ``bool[m]``: canary ``i`` is in the training set.
    seed
        Seed of the canary contents and the inclusion coins (recorded for the report).
    expected_records
        ``len(base) + m / 2``: fixes the Poisson sample rate before the coins are drawn.
    """

    base: Dataset
    canaries: list[dict[str, Any]]
    included: np.ndarray
    seed: int
    data_cfg: DataConfig

    @property
    def m(self) -> int:
        return len(self.canaries)

    @property
    def expected_records(self) -> float:
        return len(self.base) + self.m / 2  # type: ignore[arg-type]

    def training_set(self) -> RecordDataset:
        """Base records followed by the included canaries."""
        chosen = [c for c, inc in zip(self.canaries, self.included, strict=True) if inc]
        return RecordDataset(self.base, chosen, self.data_cfg)


def design_canaries(
    cohort: Any,
    data_cfg: DataConfig,
    *,
    m: int,
    seed: int | None = None,
    expression_scale: float = DEFAULT_EXPRESSION_SCALE,
) -> CanaryDesign:
    """Split the cohort, build ``m`` canaries from held-out images and flip the coins.

    Parameters
    ----------
    cohort
        A loaded :class:`fedrg.data.cohort.Cohort`.
    data_cfg
        The data config the cohort was loaded with.
    m
        Number of canaries.
    seed
        Seeds canary contents and inclusion; ``None`` (default) draws one from OS entropy.
    expression_scale
        See :func:`make_canaries`.
    """
    from fedrg.data.dataset import CohortDataset, split_indices

    if len(cohort) < 2:
        raise PrivacyError(f"the cohort at {cohort.root} has {len(cohort)} patient(s); the "
                           "empirical audit needs at least 2 (training split + held-out images)")
    seed = secrets.randbits(63) if seed is None else int(seed)
    rng = np.random.default_rng([seed, 0xCA7A])
    train_idx, held_out = split_indices(cohort, data_cfg)
    images = [cohort.images[j] for j in held_out]
    canaries = make_canaries(images, data_cfg, m=m, rng=rng, expression_scale=expression_scale)
    included = draw_inclusion(m, np.random.default_rng([seed, 0x1C1D]))
    base = CohortDataset(cohort, data_cfg, train_idx)
    return CanaryDesign(base=base, canaries=canaries, included=included, seed=seed,
                        data_cfg=data_cfg)


@torch.no_grad()
def score_canaries(model: RadiogenomicsModel, canaries: Sequence[dict[str, Any]], *,
                   batch_size: int = 64) -> np.ndarray:
    """Minus each canary's per-example loss under ``model`` (higher = looks trained on).

    With an empty report the loss is the canary's marker cross-entropy, so the score is
    the (weighted) log-likelihood of its own random labels, averaged over the marker head's
    fused and image-only answers: a black-box query.
    """
    from fedrg.data.dataset import collate_samples

    scores: list[np.ndarray] = []
    for start in range(0, len(canaries), batch_size):
        batch = collate_samples(list(canaries[start:start + batch_size]))
        losses = model(**model.encode_batch(batch))
        scores.append(-losses.detach().double().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


# --------------------------------------------------------------------------- the audit

@dataclass
class EmpiricalAudit:
    """Result of one audited training run (JSON-ready through :meth:`to_json`)."""

    private: bool
    epsilon_accounted: float
    epsilon_lower_bound: float
    m: int
    included: int
    guesses: int
    correct: int
    k_pos: int
    k_neg: int
    target_epsilon: float | None
    target_delta: float
    beta: float
    noise_multiplier: float | None
    max_grad_norm: float | None
    sample_rate: float | None
    steps: int
    training_records: int
    seed: int
    seconds: float
    score_gap: float
    scores: list[float] = field(default_factory=list, repr=False)
    included_mask: list[bool] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """Fraction of the guesses that were right."""
        return self.correct / self.guesses if self.guesses else 0.0

    def to_json(self, *, with_scores: bool = False) -> dict[str, Any]:
        """Plain dict; an infinite accounted epsilon becomes the string ``"inf"``.

        The per-canary ``scores`` and ``included_mask`` are left out unless ``with_scores``.
        """
        out = asdict(self)
        if not with_scores:
            del out["scores"], out["included_mask"]
        if not math.isfinite(out["epsilon_accounted"]):
            out["epsilon_accounted"] = "inf"
        out["accuracy"] = self.accuracy
        return out


def guess_counts(m: int, *, pos_fraction: float = DEFAULT_POS_FRACTION,
                 neg_fraction: float = DEFAULT_NEG_FRACTION) -> tuple[int, int]:
    """``(k_pos, k_neg)`` for ``m`` canaries, fixed before any training.

    Asymmetric on purpose: a model that memorises drives included canaries' loss to about
    0, but it also extrapolates confidently on the excluded canaries' out-of-distribution
    profiles, and 1 in ``2^K`` of those matches all ``K`` random labels by luck. So the top
    of the ranking holds a few lucky excluded canaries, while the bottom (confidently wrong)
    is clean: few "included" guesses, many "excluded" ones.
    """
    if m < 2:
        return 0, 0
    k_pos = max(1, round(pos_fraction * m))
    k_neg = max(1, round(neg_fraction * m))
    return min(k_pos, m // 2), min(k_neg, m - min(k_pos, m // 2))


def run_canary_audit(
    cohort: Any,
    *,
    target_epsilon: float | None,
    target_delta: float = 1e-5,
    canaries: int = DEFAULT_CANARIES,
    steps: int = DEFAULT_STEPS,
    k_pos: int | None = None,
    k_neg: int | None = None,
    beta: float = 0.05,
    max_grad_norm: float = 1.0,
    accountant: str = "rdp",
    seed: int | None = None,
    data_cfg: DataConfig | None = None,
    model_cfg: ModelConfig | None = None,
    training_cfg: TrainingConfig | None = None,
    expression_scale: float = DEFAULT_EXPRESSION_SCALE,
    model_seed: int = 0,
    _test_noise_seed: int | None = None,
) -> EmpiricalAudit:
    """Train once with randomly included canaries and bound epsilon from below.

    Parameters
    ----------
    cohort
        A cohort directory or a loaded :class:`fedrg.data.cohort.Cohort` (loaded with
        ``data_cfg``).
    target_epsilon
        DP-SGD run calibrated to this epsilon at ``target_delta``; ``None`` = non-private.
    target_delta
        Delta of the DP run, and of the (epsilon, delta) claim the audit tests.
    canaries
        Number of canaries ``m``.
    steps
        Training steps (the same for both kinds of run).
    k_pos, k_neg
        Guesses "included" / "excluded"; default :func:`guess_counts`.
    beta
        The bound is wrong with probability at most ``beta``.
    max_grad_norm
        Per-sample clipping bound of the DP run.
    accountant
        Opacus accountant of the DP run (``rdp``, ``prv``, ``gdp``).
    seed
        Canary contents and inclusion coins; ``None`` = OS entropy (recorded in the result).
        The DP noise and Poisson sampling always come from OS entropy.
    data_cfg, model_cfg, training_cfg
        Default :func:`audit_data_config`, :func:`audit_model_config`,
        :func:`audit_training_config`.
    expression_scale
        Spread of the canaries' random expression values (see :func:`make_canaries`).
    model_seed
        Initialisation of the adapter (public).
    _test_noise_seed
        Tests only: seed the DP run's noise and Poisson sampling so a test cannot pass or
        fail by luck. Never set by fedrg itself (the CLI has no way to reach it); ``None``
        keeps OS entropy.

    Returns
    -------
    EmpiricalAudit
        Accounted epsilon (``inf`` without DP), the empirical lower bound, ``m``, guesses
        and correct guesses.
    """
    from fedrg.data.cohort import load_cohort
    from fedrg.data.dataset import collate_samples
    from fedrg.model.adapter import build_model
    from fedrg.privacy.accounting import calibrate_noise_multiplier, check_delta
    from fedrg.privacy.dpsgd import DPSession
    from fedrg.train.loop import train_local

    data_cfg = data_cfg or audit_data_config()
    model_cfg = model_cfg or audit_model_config()
    training_cfg = training_cfg or audit_training_config()
    if steps < 1:
        raise PrivacyError(f"steps={steps} must be >= 1")
    if target_epsilon is not None and not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyError(f"--epsilon={target_epsilon}: must be a finite number > 0")
    default_k = guess_counts(canaries)
    k_pos = default_k[0] if k_pos is None else int(k_pos)
    k_neg = default_k[1] if k_neg is None else int(k_neg)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > canaries:
        raise PrivacyError(f"k_pos={k_pos}, k_neg={k_neg} must be >= 0 with k_pos + k_neg <= "
                           f"{canaries} canaries")
    start = time.perf_counter()
    if isinstance(cohort, (str, Path)):
        cohort = load_cohort(cohort, data_cfg)
    design = design_canaries(cohort, data_cfg, m=canaries, seed=seed,
                             expression_scale=expression_scale)
    train_set = design.training_set()
    model = build_model(model_cfg, data_cfg, seed=model_seed)

    session = None
    noise_multiplier = sample_rate = None
    if target_epsilon is not None:
        check_delta(target_delta=target_delta, n_patients=len(train_set))
        # the schedule's one rule, over the expected records (the cohort and half the
        # canaries): the rate must not depend on which canaries are included
        sample_rate = poisson_sample_rate(batch_size=training_cfg.batch_size,
                                          n_records=design.expected_records)
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant)
        session = DPSession(
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            sample_rate=sample_rate, expected_batch_size=sample_rate * design.expected_records,
            grad_sample_mode="hooks", accountant=accountant,
            max_physical_batch_size=training_cfg.max_physical_batch_size,
            n_records=len(train_set), collate_fn=collate_samples, seed=_test_noise_seed,
        )
    threads = torch.get_num_threads()
    try:  # train_local sets training.threads process-wide: put it back afterwards
        metrics = train_local(model, train_set, training_cfg, steps=steps, privacy=session,
                              seed=design.seed % (2**31), genomics_dropout=0.0)
        scores = score_canaries(model, design.canaries)
    finally:
        torch.set_num_threads(threads)
    epsilon = math.inf if session is None else session.epsilon(target_delta=target_delta)

    result = audit_from_scores(scores, design.included, k_pos=k_pos, k_neg=k_neg,
                               delta=target_delta, beta=beta)
    inc = design.included
    gap = float(scores[inc].mean() - scores[~inc].mean()) if inc.any() and (~inc).any() else 0.0
    return EmpiricalAudit(
        private=session is not None,
        epsilon_accounted=float(epsilon),
        epsilon_lower_bound=float(result.epsilon_lower_bound),
        m=result.m, included=int(inc.sum()), guesses=result.r, correct=result.v,
        k_pos=k_pos, k_neg=k_neg, target_epsilon=target_epsilon, target_delta=target_delta,
        beta=beta, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm if session is not None else None,
        sample_rate=sample_rate, steps=steps, training_records=len(train_set),
        seed=design.seed, seconds=round(time.perf_counter() - start, 1), score_gap=gap,
        scores=[float(x) for x in scores], included_mask=[bool(x) for x in inc],
        extra={"loss_last": metrics.get("loss_last"), "empty_steps": metrics.get("empty_steps")},
    )


@dataclass
class EmpiricalPair:
    """A DP run and a non-private run audited the same way."""

    dp: EmpiricalAudit
    non_private: EmpiricalAudit

    @property
    def ok(self) -> bool:
        """The DP run's lower bound does not exceed its accounted epsilon."""
        return self.dp.epsilon_lower_bound <= self.dp.epsilon_accounted

    @property
    def powered(self) -> bool:
        """The non-private run's bound exceeds the DP run's accounted epsilon: the audit
        would have caught a leak of that size."""
        return self.non_private.epsilon_lower_bound > self.dp.epsilon_accounted

    def to_json(self) -> dict[str, Any]:
        """``{"ok", "powered", "dp": {...}, "non_private": {...}}``."""
        return {"ok": self.ok, "powered": self.powered, "dp": self.dp.to_json(),
                "non_private": self.non_private.to_json()}


def run_empirical_pair(
    cohort: Any,
    *,
    target_epsilon: float = 2.0,
    data_cfg: DataConfig | None = None,
    **kwargs: Any,
) -> EmpiricalPair:
    """:func:`run_canary_audit` twice on one cohort: DP-SGD at ``target_epsilon``, then
    without DP. Each run draws its own canaries and coins. ``kwargs`` go to both runs."""
    from fedrg.data.cohort import load_cohort

    data_cfg = data_cfg or audit_data_config()
    if isinstance(cohort, (str, Path)):
        cohort = load_cohort(cohort, data_cfg)
    dp = run_canary_audit(cohort, target_epsilon=target_epsilon, data_cfg=data_cfg, **kwargs)
    non_private = run_canary_audit(cohort, target_epsilon=None, data_cfg=data_cfg, **kwargs)
    return EmpiricalPair(dp=dp, non_private=non_private)
