"""The local training loop shared by the centralised baseline and every hospital client.

Differential privacy plugs in through one seam, :class:`PrivacySeam`, implemented by
:class:`fedrg.privacy.dpsgd.DPSession`. The loop owns the model and the AdamW optimizer and
hands both to the seam once (``attach``); from then on it only asks the seam for batches
(e.g. Poisson sampling) and for steps on them (e.g. per-sample clipping + noise), and
finally calls ``cleanup``. Without a seam, :class:`PlainSGD` uses shuffled fixed-size
batches and the mean per-example loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

from fedrg.config import TrainingConfig
from fedrg.data.schema import RADIOGENOMICS_RECORD, RecordDataset, RecordSchema, batch_size
from fedrg.runtime import torch_threads

#: What the loop needs of a dataset: ``len()`` and integer indexing to dict records
#: (:class:`fedrg.data.schema.RecordDataset`; a ``torch.utils.data.Dataset`` with
#: ``__len__``, or a list).
SizedDataset = RecordDataset


@runtime_checkable
class PrivacySeam(Protocol):
    """How a (privacy) mechanism plugs into :func:`train_local`.

    ``attach(model, optimizer)`` is called once before the first step (a DP session wraps
    them for per-sample gradients). ``batches(dataset, steps=...)`` yields collated batches
    (possibly of size 0 under Poisson sampling). ``step(batch)`` runs forward
    (``model(**model.encode_batch(batch))`` -> per-example losses ``[B]``), backward and the
    optimizer step, and returns the batch's mean loss (``None`` for an empty batch).
    ``cleanup()`` is called once at the end, also on error.
    """

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def batches(self, dataset: SizedDataset, *, steps: int | None = None) -> Iterator[Mapping[str, Any]]: ...

    def step(self, batch: Mapping[str, Any]) -> float | None: ...

    def cleanup(self) -> Any: ...


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate dataset items (``fedrg.data.dataset.collate_samples``)."""
    from fedrg.data.dataset import collate_samples

    return collate_samples(items)


class PlainSGD:
    """Non-private default seam: shuffled fixed-size batches (reshuffled each epoch), mean loss.

    Parameters
    ----------
    batch_size
        Examples per batch (capped at the dataset size).
    seed
        Seeds the shuffling.
    """

    def __init__(self, *, batch_size: int, seed: int = 0):
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def batches(self, dataset: SizedDataset, *, steps: int | None = None) -> Iterator[dict[str, Any]]:
        n = len(dataset)
        if n == 0 or not steps:
            return
        size = min(self.batch_size, n)
        order: list[int] = []
        for _ in range(steps):
            if len(order) < size:
                order += torch.randperm(n, generator=self.generator).tolist()
            idx, order = order[:size], order[size:]
            yield collate([dataset[i] for i in idx])

    def step(self, batch: Mapping[str, Any]) -> float | None:
        if self.model is None or self.optimizer is None:
            raise RuntimeError("PlainSGD.step called before attach(model, optimizer)")
        if not batch or all(len(v) == 0 for v in batch.values() if hasattr(v, "__len__")):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        model = cast(Any, self.model)  # any module with encode_batch (see PrivacySeam)
        losses = model(**model.encode_batch(batch))
        losses.mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(losses.detach().mean())

    def cleanup(self) -> None:
        return None


def withhold_genomics(batch: Mapping[str, Any], p: float, generator: torch.Generator) -> Mapping[str, Any]:
    """Drop each example's genomics with probability ``p`` (zeros + ``has_genomics=0``)."""
    if p <= 0.0 or len(batch["has_genomics"]) == 0:
        return batch
    keep = (torch.rand(len(batch["has_genomics"]), generator=generator) >= p).float()
    out = dict(batch)
    out["has_genomics"] = batch["has_genomics"] * keep
    out["expression"] = batch["expression"] * keep[:, None]
    out["mutations"] = batch["mutations"] * keep[:, None]
    return out


def augment_images(
    batch: Mapping[str, Any], generator: torch.Generator, *, max_shift: int = 4
) -> Mapping[str, Any]:
    """Random left-right flip (p=0.5) and a shift of up to ``max_shift`` pixels per batch.

    Works for ``[B,1,H,W]`` and ``[B,1,D,H,W]``; the last axis is left-right.
    """
    image = batch["image"]
    n = image.shape[0]
    if n == 0:
        return batch
    flip = torch.rand(n, generator=generator) < 0.5
    view = (n,) + (1,) * (image.dim() - 1)
    image = torch.where(flip.view(view), image.flip(-1), image)
    shifts = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    out = dict(batch)
    out["image"] = torch.roll(image, shifts=shifts, dims=(-2, -1))
    return out


FAST_PARTS = ("lora_", "image_proj.", "genomics_proj.", "marker_head.image_linear.",
              "marker_head.genomics_linear.")
#: the report side (LoRA and the prompt projectors): its rates never follow ``dp_lr_scale``
REPORT_SIDE = ("lora_", "image_proj.", "genomics_proj.")


def param_groups(model: nn.Module, training_cfg: TrainingConfig, *,
                 private: bool = False) -> list[dict[str, Any]]:
    """Trainable parameters in AdamW groups: LoRA + prompt projectors at
    ``lr * lora_lr_scale`` (they must learn to condition the LM), and the marker head's
    zero-initialised linear paths (logistic regressions that need weights of order one
    within a few dozen steps); the rest at ``lr``.

    With ``private`` (DP-SGD), the marker side (everything but LoRA and the prompt
    projectors) runs at ``dp_lr_scale`` times its rate: Adam divides each step by the root
    of the second moment, which under DP noise is the noise's, so a coordinate's useful step
    shrinks by its signal-to-noise ratio; the scale gives it back. The report side keeps its
    rate (higher rates break the report language, docs/model.md)."""
    report: list[nn.Parameter] = []
    fast: list[nn.Parameter] = []
    slow: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if any(k in name for k in REPORT_SIDE):
                report.append(p)
            else:
                (fast if any(k in name for k in FAST_PARTS) else slow).append(p)
    scale = training_cfg.dp_lr_scale if private else 1.0
    groups = [{"params": slow, "lr": training_cfg.lr * scale},
              {"params": fast, "lr": training_cfg.lr * training_cfg.lora_lr_scale * scale},
              {"params": report, "lr": training_cfg.lr * training_cfg.lora_lr_scale}]
    return [g for g in groups if g["params"]]


def train_local(
    model: nn.Module,
    train_dataset: SizedDataset,
    training_cfg: TrainingConfig,
    *,
    steps: int | None = None,
    privacy: PrivacySeam | None = None,
    seed: int | None = None,
    genomics_dropout: float | None = None,
    schema: RecordSchema | None = None,
    on_step: Callable[[int, int], None] | None = None,
    frozen: Sequence[str] = (),
    gradient_step: bool = False,
) -> dict[str, Any]:
    """Train the adapter of ``model`` on ``train_dataset`` (AdamW, in place).

    Parameters
    ----------
    model
        A :class:`fedrg.model.adapter.RadiogenomicsModel` (only its trainable parts change).
    train_dataset
        Items as described by ``fedrg.data.dataset.CohortDataset``.
    training_cfg
        lr, weight decay, batch size, local epochs, seed, threads.
    steps
        Number of optimizer steps; default from ``training.local_epochs`` and ``batch_size``.
    privacy
        The DP seam (see :class:`PrivacySeam`, e.g. a ``DPSession``); ``None`` =
        non-private :class:`PlainSGD`. The loop calls its ``cleanup`` at the end.
    seed
        Seeds shuffling (non-private) and genomics withholding; default ``training.seed``.
    genomics_dropout
        Probability of withholding an example's genomics; default ``model.genomics_dropout``.
    schema
        Required record fields; default ``model.record_schema``, else
        :data:`fedrg.data.schema.RADIOGENOMICS_RECORD`. ``train_dataset[0]`` and every
        non-empty batch are checked before use.

    on_step
        Progress callback ``on_step(done, total)`` after every step (display only).
    frozen
        Name prefixes of trainable parameters to leave untouched in this call (no gradient,
        no noise, no update; e.g. ``privacy.frozen_under_dp``). They stay trainable (and in
        the payload) afterwards.
    gradient_step
        Plain SGD at the groups' learning rates (no momentum, no weight decay) instead of
        AdamW: the change of the adapter is then the (DP) gradient scaled by the learning
        rates, for a federation whose server applies the optimiser to the summed gradients
        (distributed noise).

    Raises
    ------
    RecordSchemaError
        A record or batch lacks a required field (the message names it).

    Returns
    -------
    dict
        ``steps``, ``examples`` (examples seen), ``empty_steps``, ``loss_mean``,
        ``loss_last`` (mean per-example loss of the last non-empty batch), ``seconds``.
    """
    with torch_threads(training_cfg.threads):
        return _train_local(model, train_dataset, training_cfg, steps=steps, privacy=privacy,
                            seed=seed, genomics_dropout=genomics_dropout, schema=schema,
                            on_step=on_step, frozen=frozen, gradient_step=gradient_step)


def _train_local(
    model: nn.Module,
    train_dataset: SizedDataset,
    training_cfg: TrainingConfig,
    *,
    steps: int | None,
    privacy: PrivacySeam | None,
    seed: int | None,
    genomics_dropout: float | None,
    schema: RecordSchema | None,
    on_step: Callable[[int, int], None] | None,
    frozen: Sequence[str],
    gradient_step: bool = False,
) -> dict[str, Any]:
    if schema is None:
        schema = getattr(model, "record_schema", None) or RADIOGENOMICS_RECORD
    if len(train_dataset) > 0:
        schema.check(train_dataset[0], where="train_dataset[0]")
    seed = training_cfg.seed if seed is None else int(seed)
    seam: PrivacySeam = (
        privacy if privacy is not None else PlainSGD(batch_size=training_cfg.batch_size, seed=seed)
    )
    if steps is None:
        from fedrg.train.schedule import local_steps

        steps = local_steps(local_epochs=training_cfg.local_epochs,
                            batch_size=training_cfg.batch_size, n_records=len(train_dataset))
    n_steps = int(steps)
    if genomics_dropout is None:
        genomics_dropout = float(getattr(getattr(model, "model_cfg", None), "genomics_dropout", 0.0))
    held = freeze(model, frozen)
    try:
        return _train(model, train_dataset, training_cfg, seam, n_steps, seed, genomics_dropout,
                      schema, on_step, gradient_step, private=privacy is not None)
    finally:
        for p in held:
            p.requires_grad_(True)


def freeze(model: nn.Module, prefixes: Sequence[str]) -> list[nn.Parameter]:
    """Set ``requires_grad=False`` on trainable parameters whose name starts with one of
    ``prefixes`` (an Opacus wrapper's ``_module.`` is looked through); returns them.

    Raises
    ------
    ValueError
        If a prefix matches no trainable parameter, or every trainable parameter.
    """
    named = [(n.removeprefix("_module."), p) for n, p in model.named_parameters() if p.requires_grad]
    for prefix in prefixes:  # check them all before touching anything
        if not any(n.startswith(prefix) for n, _ in named):
            raise ValueError(
                f"privacy.frozen_under_dp: {prefix!r} names no trainable parameter; give name "
                f"prefixes such as 'image_encoder.features' (see model.named_parameters())")
    held = [p for n, p in named if any(n.startswith(x) for x in prefixes)]
    if prefixes and len(held) == len(named):
        raise ValueError(f"privacy.frozen_under_dp={list(prefixes)} freezes every trainable parameter")
    for p in held:
        p.requires_grad_(False)
    return held


def _train(model: nn.Module, train_dataset: SizedDataset, training_cfg: TrainingConfig,
           seam: PrivacySeam, n_steps: int, seed: int, genomics_dropout: float,
           schema: RecordSchema, on_step: Callable[[int, int], None] | None,
           gradient_step: bool = False, *, private: bool = False) -> dict[str, Any]:
    optimizer: torch.optim.Optimizer
    if gradient_step:  # distributed noise: the server's optimiser does the adapting
        optimizer = torch.optim.SGD(param_groups(model, training_cfg), lr=training_cfg.lr)
    else:
        groups = param_groups(model, training_cfg, private=private)
        optimizer = torch.optim.AdamW(groups, lr=training_cfg.lr,
                                      weight_decay=training_cfg.weight_decay)
    model.train()
    drop_gen = torch.Generator().manual_seed(seed + 7919)
    aug_gen = torch.Generator().manual_seed(seed + 104729)
    losses: list[float] = []
    seen = empty = 0
    start = time.perf_counter()
    seam.attach(model, optimizer)
    try:
        if n_steps > 0 and len(train_dataset) > 0:
            for batch in seam.batches(train_dataset, steps=n_steps):
                n = batch_size(batch, schema)
                if n:
                    if genomics_dropout > 0:
                        batch = withhold_genomics(batch, genomics_dropout, drop_gen)
                    if training_cfg.augment and "image" in schema.fields:
                        batch = augment_images(batch, aug_gen)
                loss = seam.step(batch)
                if loss is None:
                    empty += 1
                else:
                    losses.append(float(loss))
                    seen += n
                if on_step is not None:
                    on_step(empty + len(losses), n_steps)
    finally:
        seam.cleanup()
    return {
        "steps": n_steps,
        "examples": seen,
        "empty_steps": empty,
        "loss_mean": sum(losses) / len(losses) if losses else None,
        "loss_last": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - start, 2),
    }


def subset(dataset: SizedDataset, indices: Sequence[int]) -> SizedDataset:
    """A view of ``dataset`` restricted to ``indices``."""
    return torch.utils.data.Subset(cast(Dataset, dataset), list(indices))
