"""Book-keeping per-sample clipping: one backward pass, per-sample gradients only where cheap.

Bu, Wang, Zha and Karypis, "Differentially private optimization on large model at small
cost" (ICML 2023). During the forward pass each trainable layer's input ``a`` is kept and
during the (single) backward pass the gradient ``g`` of the loss with respect to its output;
the trainable parameters themselves are detached for the pass, so autograd never computes
their (unclipped) gradients. After the backward pass, for every example ``i``:

* **Linear layers** (``y = a W^T + b``, input ``[B, T, d]``, output ``[B, T, p]``; LoRA's
  ``lora_A``/``lora_B`` are such layers). The per-example weight gradient is
  ``G_i = g_i^T a_i``. Its squared norm comes either from the *ghost norm*
  ``<a_i a_i^T, g_i g_i^T>`` (cost ``T^2 (d + p)``; for ``T = 1`` simply
  ``|a_i|^2 |g_i|^2``) or from ``G_i`` itself (a batched product, cost ``T d p``), whichever
  is cheaper for the layer (:func:`ghost_is_cheaper`). With the ghost norm nothing of size
  ``B x p x d`` is ever built: the clipped sum ``sum_i c_i G_i = (c * g)^T a`` is one matrix
  product, the same work as the plain weight gradient.
* **2-D convolutions** (no groups, zero padding): a Linear layer over the unfolded input
  patches (``T`` = output positions, ``d`` = input channels x kernel size).
* **Every other layer type** Opacus supports (other convolutions, GroupNorm, LayerNorm,
  embeddings, ...): Opacus' own per-sample gradient function (``GRAD_SAMPLERS``) on the kept
  ``a`` and ``g``; its clipped sum is ``sum_i c_i G_i``.

The clip factor is Opacus': ``c_i = min(1, C / (|G_i| + 1e-6))`` over all the optimizer's
parameters (flat), or per clipping group with bounds ``C_g`` (``sum_g C_g^2 = C^2``,
:mod:`fedrg.privacy.fused`). The clipped sums are written to ``p.grad``: exactly the
contract of Opacus' :class:`~opacus.optimizers.DPOptimizerFastGradientClipping` (the ghost
clipping optimizer: ``p.grad`` holds the sum of the clipped per-example gradients), which
then accumulates physical chunks, draws the noise ``N(0, (noise_multiplier * C)^2)`` per
parameter from the session's generator, divides by the expected batch size and calls the
accountant's hook, unchanged.

One example is one record, and one record is one patient (``fedrg.data.manifest``): the
norm of ``G_i`` covers every parameter and every use of a layer in the forward pass (a
layer called twice contributes one gradient, the sum over both calls, before the norm).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import nn

from fedrg.errors import PrivacyError


def ghost_is_cheaper(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether the ghost norm beats the per-example gradient for a Linear layer.

    Ghost norm: two ``T x T`` Gram matrices per example (``T^2 (d_in + d_out)``) and, for the
    clipped sum, one product like the plain weight gradient (``T d_in d_out``). Per-example
    gradient: the batched product (``T d_in d_out``), then its norm and the weighted sum
    (``2 d_in d_out``).
    """
    return tokens * tokens * (d_in + d_out) < 2 * d_in * d_out


def _unfoldable(module: nn.Module) -> bool:
    """A 2-D convolution :func:`torch.nn.functional.unfold` can turn into a Linear layer."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to ``record``.

    ``anchor`` (a scalar that requires grad) makes the output part of the graph although
    the layer's parameters are detached for the pass and its input may need no gradient.
    """

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, anchor: torch.Tensor, record: Any) -> torch.Tensor:
        ctx.record = record
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.record(grad)
        return grad, None, None


class _Layer:
    """One trainable layer: its parameters (those the optimizer holds) and this pass's
    ``(activation, output gradient)`` pairs, one per call."""

    def __init__(self, name: str, module: nn.Module, params: list[nn.Parameter]) -> None:
        self.name = name
        self.module = module
        self.params = params
        self.calls: list[list[torch.Tensor]] = []  # [activation, output grad] per call
        self.sq: dict[int, torch.Tensor] = {}  # id(param) -> [B] squared per-example norm
        self.kept: dict[int, Any] = {}  # id(param) -> what the clipped sum needs

    def record_call(self, activation: torch.Tensor) -> Any:
        call = [activation]
        self.calls.append(call)

        def record(grad: torch.Tensor) -> None:
            call.append(grad.detach())

        return record

    def clear(self) -> None:
        self.calls, self.sq, self.kept = [], {}, {}


class BookKeeper:
    """Per-example clipping of ``params`` by book-keeping (see the module docstring).

    Parameters
    ----------
    model
        The caller's module; every parameter in ``params`` must be a direct parameter of a
        ``nn.Linear`` or of a layer type Opacus has a per-sample gradient function for.
    params
        The optimizer's parameters, in its order (the clipping norm covers exactly these).
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        wanted = {id(p) for p in params}
        self.params = list(params)
        self.layers: list[_Layer] = []
        found: set[int] = set()
        unsupported = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
            if not own:
                continue
            if not isinstance(module, nn.Linear) and type(module) not in GradSampleModule.GRAD_SAMPLERS:
                unsupported.append(f"{name} ({type(module).__name__})")
                continue
            self.layers.append(_Layer(name or type(module).__name__, module, own))
            found.update(id(p) for p in own)
        if unsupported:
            raise PrivacyError(
                "grad_sample_mode='bk' has no per-sample gradient for the trainable layer(s) "
                f"{', '.join(unsupported)}; freeze them or use grad_sample_mode='ew'")
        if found != wanted:
            raise PrivacyError("grad_sample_mode='bk': some optimizer parameters belong to no "
                               "module of the model; use grad_sample_mode='ew'")
        self._anchor = torch.zeros((), requires_grad=True)

    # ------------------------------------------------------------------ the pass
    @contextmanager
    def capture(self) -> Iterator[None]:
        """Run the model's forward pass inside this block: the parameters are detached and
        every tracked layer's input and output gradient are kept for :meth:`clip_into_grads`."""
        for layer in self.layers:
            layer.clear()
        handles = []
        flags = [p.requires_grad for p in self.params]

        def hook(layer: _Layer) -> Any:
            def forward_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
                if not isinstance(output, torch.Tensor) or not inputs:
                    raise PrivacyError(f"grad_sample_mode='bk': layer {layer.name} does not map "
                                       "one tensor to one tensor; use grad_sample_mode='ew'")
                record = layer.record_call(inputs[0].detach())
                if output.requires_grad:  # the input needs a gradient: a tensor hook suffices
                    output.register_hook(record)
                    return output
                return _Tap.apply(output, self._anchor, record)
            return forward_hook

        try:
            for p in self.params:
                p.requires_grad_(False)
            for layer in self.layers:
                handles.append(layer.module.register_forward_hook(hook(layer)))
            yield
        finally:
            for h in handles:
                h.remove()
            for p, flag in zip(self.params, flags, strict=True):
                p.requires_grad_(flag)

    def unused_layers(self) -> list[str]:
        """Tracked layers that got no output gradient in the last pass."""
        return [layer.name for layer in self.layers
                if not layer.calls or any(len(call) < 2 for call in layer.calls)]

    # ------------------------------------------------------------------ norms
    def _linear(self, layer: _Layer, n: int) -> None:
        acts = [c[0].reshape(n, -1, c[0].shape[-1]) for c in layer.calls]
        grads = [c[1].reshape(n, -1, c[1].shape[-1]) for c in layer.calls]
        self._matmul(layer, acts, grads)

    def _conv(self, layer: _Layer, n: int) -> None:
        """A 2-D convolution is a Linear layer over its unfolded input patches."""
        conv = layer.module
        acts, grads = [], []
        for activation, grad in layer.calls:
            patches = F.unfold(activation, conv.kernel_size, dilation=conv.dilation,
                               padding=conv.padding, stride=conv.stride)  # [B, d, L]
            acts.append(patches.transpose(1, 2))
            grads.append(grad.reshape(n, grad.shape[1], -1).transpose(1, 2))  # [B, L, p]
        self._matmul(layer, acts, grads)

    def _matmul(self, layer: _Layer, acts: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Norms of a layer whose weight gradient is ``sum_t g_t a_t^T`` (a: ``[B, T, d]``,
        g: ``[B, T, p]``, one pair per call; calls concatenate along T)."""
        a = acts[0] if len(acts) == 1 else torch.cat(acts, dim=1)
        g = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
        a = a.to(g.dtype)
        weight, bias = layer.module.weight, layer.module.bias
        ids = {id(p) for p in layer.params}
        if id(weight) in ids:
            tokens, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
            if tokens == 1:
                layer.sq[id(weight)] = a[:, 0].pow(2).sum(1) * g[:, 0].pow(2).sum(1)
                layer.kept[id(weight)] = ("ghost", a, g)
            elif ghost_is_cheaper(tokens, d_in, d_out):
                aat = torch.bmm(a, a.transpose(1, 2))
                ggt = torch.bmm(g, g.transpose(1, 2))
                layer.sq[id(weight)] = (aat * ggt).sum((1, 2)).clamp(min=0)
                layer.kept[id(weight)] = ("ghost", a, g)
            elif d_out >= d_in or a.transpose(1, 2).is_contiguous():
                # [B, d, p]: the longer side last (or unfolded patches as they come) is the
                # fast layout for CPU matrix products
                per_example = torch.bmm(a.transpose(1, 2), g)
                layer.sq[id(weight)] = per_example.pow(2).sum((1, 2))
                layer.kept[id(weight)] = ("direct_t", per_example)
            else:  # [B, p, d]
                per_example = torch.bmm(g.transpose(1, 2), a)
                layer.sq[id(weight)] = per_example.pow(2).sum((1, 2))
                layer.kept[id(weight)] = ("direct", per_example)
        if bias is not None and id(bias) in ids:
            per_example = g.sum(1)  # [B, p]
            layer.sq[id(bias)] = per_example.pow(2).sum(1)
            layer.kept[id(bias)] = ("direct", per_example)

    def _opacus(self, layer: _Layer, n: int) -> None:
        sampler = GradSampleModule.GRAD_SAMPLERS[type(layer.module)]
        total: dict[int, torch.Tensor] = {}
        for activation, grad in layer.calls:
            for p, gs in sampler(layer.module, [activation], grad).items():
                total[id(p)] = total[id(p)] + gs if id(p) in total else gs
        for p in layer.params:
            if id(p) not in total:
                raise PrivacyError(f"grad_sample_mode='bk': no per-sample gradient for a "
                                   f"parameter of {layer.name}")
            per_example = total[id(p)]
            layer.sq[id(p)] = per_example.reshape(n, -1).pow(2).sum(1)
            layer.kept[id(p)] = ("direct", per_example)

    def per_example_squared_norms(self, n: int) -> torch.Tensor:
        """``[B, P]``: each example's squared gradient norm per optimizer parameter."""
        for layer in self.layers:
            if isinstance(layer.module, nn.Linear):
                self._linear(layer, n)
            elif _unfoldable(layer.module):
                self._conv(layer, n)
            else:
                self._opacus(layer, n)
        by_id = {k: v for layer in self.layers for k, v in layer.sq.items()}
        return torch.stack([by_id[id(p)] for p in self.params], dim=1)

    # ------------------------------------------------------------------ clipping
    def clip_into_grads(self, *, n: int, max_grad_norm: float,
                        clip_groups: Sequence[int] | None = None,
                        group_max_norms: Sequence[float] | None = None) -> torch.Tensor:
        """Set every parameter's ``grad`` to the sum over the ``n`` examples of its clipped
        per-example gradients; return the per-example factors ``[B, P]``.

        Flat clipping (Opacus'): ``c_i = min(1, C / (|G_i| + 1e-6))``. With ``clip_groups``
        (a group index per parameter) and ``group_max_norms``: one factor per example and
        group, ``min(1, C_g / (|G_i,g| + 1e-6))``.
        """
        sq = self.per_example_squared_norms(n)
        if clip_groups is None or group_max_norms is None:
            factor = (max_grad_norm / (sq.sum(1).sqrt() + 1e-6)).clamp(max=1.0)
            factors = factor[:, None].expand(-1, len(self.params))
        else:
            groups = torch.as_tensor(list(clip_groups), dtype=torch.long)
            bounds = torch.as_tensor(list(group_max_norms), dtype=sq.dtype)
            per_group = torch.zeros((n, len(bounds)), dtype=sq.dtype)
            per_group.index_add_(1, groups, sq)
            factors = (bounds / (per_group.sqrt() + 1e-6)).clamp(max=1.0)[:, groups]
        column = {id(p): k for k, p in enumerate(self.params)}
        for layer in self.layers:
            for p in layer.params:
                c = factors[:, column[id(p)]].to(p.dtype)
                kept = layer.kept[id(p)]
                if kept[0] == "ghost":
                    _, a, g = kept
                    clipped = (g * c[:, None, None]).reshape(-1, g.shape[-1]).t() @ a.reshape(
                        -1, a.shape[-1])
                elif kept[0] == "direct_t":  # [B, d, p] -> [p, d]
                    per_example = kept[1]
                    clipped = torch.mv(per_example.reshape(n, -1).t(), c).view(
                        per_example.shape[1:]).t()
                else:
                    per_example = kept[1]
                    clipped = torch.mv(per_example.reshape(n, -1).t(), c)
                p.grad = clipped.reshape(p.shape)
            layer.clear()
        return factors
