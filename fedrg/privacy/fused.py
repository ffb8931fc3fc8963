"""Opacus' flat-clipping DP optimizer with its per-parameter Python loops fused.

Opacus' :class:`~opacus.optimizers.DPOptimizer` clips, accumulates, noises and scales one
parameter tensor at a time (51 tensors on the default adapter, about 13 ms a step on a
2-core machine; /work/shared/FACTS.md). :class:`FusedDPOptimizer` does the same mathematics
on one flat buffer:

* per-sample norms over all parameters (one norm per tensor, one over their stack),
  clip factor ``min(1, C / (norm + 1e-6))`` exactly as Opacus computes it;
* the clipped per-sample gradients summed into one flat buffer (``factor @ grad_sample``
  per tensor, written into a slice of the buffer);
* one draw of ``N(0, (noise_multiplier * C)^2)`` for the whole buffer, one in-place add and
  one division by the expected batch size.

**Group-wise clipping** (optional, ``clip_groups``): the parameters are split into groups,
each with its own bound ``C_g``, and each example's gradient is clipped *per group* to
``C_g``, with ``sum_g C_g^2 = max_grad_norm^2``. One example then still moves the summed
gradient by at most ``max_grad_norm`` (its clipped pieces are orthogonal), so the noise, the
sensitivity and the accounting are exactly those of flat clipping at ``max_grad_norm``; what
changes is that a part of the model with large per-example gradients (the marker head) can
no longer crush another part's share (the report's LoRA): He et al. 2022, "Exploring the
limits of differentially private deep learning with group-wise clipping".

``p.summed_grad`` and ``p.grad`` are views into the flat buffers, so Opacus' own step,
skip-step (physical chunks of one logical batch) and zero-grad logic run unchanged. The
noise has the same distribution as Opacus' (independent Gaussians per coordinate); it is
drawn in one call instead of one per tensor. Differential tests against Opacus' optimizer:
``tests/test_privacy_fused.py``.

**Pinned Opacus code.** Opacus has no public API for a fused step, so this module (the only
one of fedrg that reaches into Opacus' optimizer) overrides :class:`DPOptimizer`'s step
methods, reproduces their mathematics and uses Opacus' private helpers. It was reviewed
against the code whose source digests are :data:`OPACUS_SOURCES`; constructing a
:class:`FusedDPOptimizer` with any other Opacus raises
:class:`~fedrg.library_pins.LibraryChangedError` (review this module against the new Opacus,
rerun ``tests/test_privacy_fused.py``, then update the digests), never a silent step that
may no longer match Opacus' clipping, noise or accounting.
"""

from __future__ import annotations

from typing import Any

import opacus.optimizers.optimizer as _opacus_optimizer
import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedrg.library_pins import require_unchanged

OPACUS_SOURCES = {  # opacus 1.6.0, as reviewed for this module
    "DPOptimizer.pre_step": "3c219ca43a5d89df588e558be14862c914f5e727eccfedddd323d543cb3c9946",
    "DPOptimizer.clip_and_accumulate":
        "28dc9fe15da665d303e439df064372b185667d1eafb1b0d7b11a52708849241e",
    "DPOptimizer.add_noise": "4380705bf5d8f89bcd21c9b3b69984d61b892169c4ce1b572a12b33f937d1213",
    "DPOptimizer.scale_grad": "ec629064142b9495e57ec23a37da96fcb8b1e7d20f31881871669368f7dc7469",
    "DPOptimizer.zero_grad": "e364e5e88ab3e8f9acbb2ab579d25e1db6fcad4d660131ab157953a31db7bcf4",
    "DPOptimizer._get_flat_grad_sample":
        "a9aed91bbcb2091a3fb4c1f227d83ed9ed16351cdc9869ac6f4ca647b1e2e630",
    "_check_processed_flag": "cda9cba61a6691e14cc0f1b2a846dc11c2deda68506d1721a18a95729e01f67b",
    "_mark_as_processed": "ad66ff8bdcd4e049f1db7574891017845e7b0129628f54c9350694797cb65f07",
    "_generate_noise": "904f98a78dac39470a26a28a8f3d487f963fa4c91fd0180049e507f3375ee9b8",
    "DPOptimizerFastGradientClipping.pre_step":
        "12e38750d4c0874d6af1b7628030d932a9e777f9768ae2a3d075709708979db2",
    "DPOptimizerFastGradientClipping.accumulate":
        "ae9dc6130a966adab7d074d5485feedd8689d266c1bda883a14a69957f3721f7",
    "DPOptimizerFastGradientClipping.add_noise":
        "bb77e6ade482875a72a47f7f840b80dc38b0f7ff798f938bc43752427f4410d5",
    "DPOptimizerFastGradientClipping.zero_grad":
        "87fe4d8810ec273e2c68f05da2624383f88a5bf3a9d5e02cb0e393872fbad886",
}
"""``name -> SHA-256 of its source`` for the Opacus code this module overrides or uses."""


def opacus_functions() -> dict[str, object]:
    """The installed Opacus functions named in :data:`OPACUS_SOURCES`."""
    owners = {"": _opacus_optimizer, "DPOptimizer": DPOptimizer,
              "DPOptimizerFastGradientClipping": DPOptimizerFastGradientClipping}
    out: dict[str, object] = {}
    for name in OPACUS_SOURCES:
        owner, _, attr = name.rpartition(".")
        out[name] = getattr(owners[owner], attr)
    return out


_reviewed = {"ok": False}  # checked once per process (the installed code cannot change)


def require_reviewed_opacus() -> None:
    """Raise :class:`~fedrg.library_pins.LibraryChangedError` unless Opacus is the reviewed code."""
    if not _reviewed["ok"]:
        require_unchanged("opacus", OPACUS_SOURCES, opacus_functions(),
                          module="fedrg.privacy.fused")
        _reviewed["ok"] = True


class FusedDPOptimizer(DPOptimizer):  # type: ignore[misc]  # opacus ships no type information
    """Drop-in :class:`~opacus.optimizers.DPOptimizer` (flat clipping, hooks/functorch/ew
    modes) with fused clip, accumulate, noise and scale, and optional group-wise clipping."""

    _flat_summed: torch.Tensor | None = None
    _flat_grad: torch.Tensor | None = None

    def __init__(self, *args: Any, clip_groups: list[int] | None = None,
                 group_max_norms: list[float] | None = None, **kwargs: Any) -> None:
        """Opacus' arguments, plus ``clip_groups`` (one group index per parameter, in
        ``params`` order) and ``group_max_norms`` (``C_g`` per group; their squares must sum
        to ``max_grad_norm`` squared). Without them: flat clipping, as Opacus.

        Raises :class:`~fedrg.library_pins.LibraryChangedError` if the installed Opacus is
        not the reviewed code (:data:`OPACUS_SOURCES`)."""
        require_reviewed_opacus()
        super().__init__(*args, **kwargs)
        self._groups: torch.Tensor | None = None
        self._group_norms: torch.Tensor | None = None
        if clip_groups is not None or group_max_norms is not None:
            if clip_groups is None or group_max_norms is None:
                raise ValueError("give both clip_groups and group_max_norms, or neither")
            if len(clip_groups) != len(self.params):
                raise ValueError(f"clip_groups has {len(clip_groups)} entries for "
                                 f"{len(self.params)} parameters")
            if sorted(set(clip_groups)) != list(range(len(group_max_norms))):
                raise ValueError("clip_groups must use every group 0..len(group_max_norms)-1")
            total = sum(c * c for c in group_max_norms) ** 0.5
            if any(c <= 0 for c in group_max_norms) or abs(total - self.max_grad_norm) > 1e-6 * self.max_grad_norm:
                raise ValueError(f"group_max_norms {group_max_norms} must be > 0 with a root sum "
                                 f"of squares equal to max_grad_norm={self.max_grad_norm}")
            self._groups = torch.tensor(clip_groups, dtype=torch.long)
            self._group_norms = torch.tensor(group_max_norms, dtype=torch.float32)

    def _layout(self) -> list[int]:
        return [p.numel() for p in self.params]

    def clip_and_accumulate(self) -> None:
        """Clip each example's gradient to ``max_grad_norm`` and add the sum to the buffer."""
        samples = []
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            samples.append(self._get_flat_grad_sample(p).to(p.dtype))
        n = samples[0].shape[0]
        sizes = self._layout()
        summed = torch.zeros(sum(sizes), dtype=self.params[0].dtype, device=self.params[0].device)
        if n:
            flat = [g.reshape(n, -1) for g in samples]
            norms = torch.stack([torch.linalg.vector_norm(f, dim=1) for f in flat], dim=1)
            groups, group_norms = self._groups, self._group_norms
            if groups is None or group_norms is None:
                factor = (self.max_grad_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)
                          ).clamp(max=1.0)
                factors = [factor] * len(flat)
            else:  # [n, groups] per-example norm of each group, then one factor per group
                sq = torch.zeros((n, len(group_norms)), dtype=norms.dtype)
                sq.index_add_(1, groups, norms.pow(2))
                per_group = (group_norms.to(norms.dtype) / (sq.sqrt() + 1e-6)).clamp(max=1.0)
                factors = list(per_group[:, groups].t().to(summed.dtype))
            for chunk, f, fac in zip(torch.split(summed, sizes), flat, factors, strict=True):
                torch.mv(f.t(), fac, out=chunk)
        if self._flat_summed is not None and self.params[0].summed_grad is not None:
            summed += self._flat_summed  # an earlier physical chunk of this logical batch
        self._flat_summed = summed
        for p, chunk in zip(self.params, torch.split(summed, sizes), strict=True):
            p.summed_grad = chunk.view_as(p)
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        """``grad = summed + N(0, (noise_multiplier * max_grad_norm)^2)``, one draw."""
        summed = self._flat_summed
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        if self.secure_mode:  # Opacus' secure sampler, per tensor (never the default here)
            super().add_noise()
            return
        if summed is None:
            raise RuntimeError("FusedDPOptimizer.add_noise before clip_and_accumulate")
        grad = torch.normal(0.0, self.noise_multiplier * self.max_grad_norm, size=summed.shape,
                            generator=self.generator, dtype=summed.dtype, device=summed.device)
        grad += summed
        self._flat_grad = grad
        for p, chunk in zip(self.params, torch.split(grad, self._layout()), strict=True):
            p.grad = chunk.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Divide by the expected batch size (``loss_reduction="mean"``) in one operation."""
        if self.loss_reduction != "mean":
            return
        grad = self._flat_grad
        if grad is None or self.secure_mode:
            super().scale_grad()
            return
        grad /= self.expected_batch_size * self.accumulated_iterations

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Opacus' zero_grad; the flat buffers follow ``summed_grad`` and ``grad``."""
        super().zero_grad(set_to_none)
        self._flat_grad = None
        if not self._is_last_step_skipped:
            self._flat_summed = None


class FusedClippedSumDPOptimizer(DPOptimizerFastGradientClipping):  # type: ignore[misc]
    """Opacus' :class:`~opacus.optimizers.DPOptimizerFastGradientClipping` (its contract:
    ``p.grad`` holds the *sum of the clipped per-example gradients* when ``step()`` runs;
    :mod:`fedrg.privacy.bookkeeping` writes it) with accumulate, noise and scale on one flat
    buffer.

    The noise is Opacus' own draw, value for value: one ``N(0, std^2)`` draw per parameter
    of ``p``'s size, in ``params`` order, from ``self.generator``, with
    ``std = noise_multiplier * max_grad_norm`` (none when ``std == 0``), exactly as
    ``_generate_noise`` does; only the additions and the division by the expected batch size
    run once on the flat buffer instead of once per tensor. ``secure_mode`` falls back to
    Opacus' per-tensor code. Raises :class:`~fedrg.library_pins.LibraryChangedError` if the
    installed Opacus is not the reviewed code (:data:`OPACUS_SOURCES`).
    """

    _flat_summed: torch.Tensor | None = None
    _flat_grad: torch.Tensor | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        require_reviewed_opacus()
        super().__init__(*args, **kwargs)

    def _layout(self) -> list[int]:
        return [p.numel() for p in self.params]

    def accumulate(self) -> None:
        """``summed_grad += grad`` (the first chunk of a logical batch: ``= grad``)."""
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        if self._flat_summed is not None and self.params[0].summed_grad is not None:
            self._flat_summed += flat
        else:
            self._flat_summed = flat
        for p, chunk in zip(self.params, torch.split(self._flat_summed, self._layout()),
                            strict=True):
            p.summed_grad = chunk.view_as(p)

    def add_noise(self) -> None:
        """``grad = summed_grad + N(0, std^2)``, drawn per parameter as Opacus draws it."""
        if self.secure_mode:
            super().add_noise()
            return
        summed = self._flat_summed
        if summed is None:
            raise RuntimeError("FusedClippedSumDPOptimizer.add_noise before accumulate")
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        grad = summed.clone()
        if std != 0:
            noise = torch.empty_like(summed)
            for chunk in torch.split(noise, self._layout()):
                torch.normal(0, std, size=chunk.shape, generator=self.generator, out=chunk)
            grad += noise
        self._flat_grad = grad
        for p, chunk in zip(self.params, torch.split(grad, self._layout()), strict=True):
            p.grad = chunk.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Divide by the expected batch size (``loss_reduction="mean"``) in one operation."""
        if self.loss_reduction != "mean":
            return
        grad = self._flat_grad
        if grad is None or self.secure_mode:
            super().scale_grad()
            return
        grad /= self.expected_batch_size * self.accumulated_iterations

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Opacus' zero_grad; the flat buffers follow ``summed_grad`` and ``grad``."""
        super().zero_grad(set_to_none)
        self._flat_grad = None
        if not self._is_last_step_skipped:
            self._flat_summed = None
