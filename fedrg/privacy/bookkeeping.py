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
    """One trainable layer: its parameters (those the optimizer holds) and what this pass
    kept of it.

    Linear layers and 2-D convolutions (``kind`` ``"matmul"``) are worked on as each output
    gradient arrives in the backward pass (while it is still in cache): where the per-example
    gradient is the cheaper route it is computed there and summed over calls (``weight_sum``,
    ``[B, p, d]``, or ``[B, d, p]`` when ``transposed``), and the call's tensors are dropped;
    otherwise the call's ``(a [B, T, d], g [B, T, p])`` is kept for the ghost norm. The bias'
    per-example gradient ``sum_t g`` is always summed at once (``bias_sum``). Other layers
    (``kind`` ``"opacus"``) keep ``(activation, output gradient)`` for Opacus' functions.
    """

    def __init__(self, name: str, module: nn.Module, params: list[nn.Parameter]) -> None:
        self.name = name
        self.module = module
        self.params = params
        ids = {id(p) for p in params}
        self.kind = "matmul" if isinstance(module, nn.Linear) or _unfoldable(module) else "opacus"
        self.weight = module.weight if id(getattr(module, "weight", None)) in ids else None
        bias = getattr(module, "bias", None)
        self.bias = bias if bias is not None and id(bias) in ids else None
        conv = _unfoldable(module)
        # per-example weight gradients as [B, d, p] (longer side last: the fast layout of CPU
        # matrix products; unfolded patches come as [B, d, L])
        self.transposed = conv or (isinstance(module, nn.Linear)
                                   and module.out_features >= module.in_features)
        self.clear()

    def clear(self) -> None:
        self.calls: list[list[Any]] = []  # per call: [activation] + [a, g] or ["done"]
        self.weight_sum: torch.Tensor | None = None
        self.bias_sum: torch.Tensor | None = None
        self.sq: dict[int, torch.Tensor] = {}  # id(param) -> [B] squared per-example norm
        self.kept: dict[int, Any] = {}  # id(param) -> what the clipped sum needs

    def record_call(self, activation: torch.Tensor) -> Any:
        call: list[Any] = [activation]
        self.calls.append(call)

        def record(grad: torch.Tensor) -> None:
            if self.kind == "matmul":
                self._matmul_call(call, grad.detach())
            else:
                call.append(grad.detach())

        return record

    def as_matmul(self, activation: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a [B, T, d], g [B, T, p])`` with ``weight gradient_i = g_i^T a_i``."""
        n = grad.shape[0]
        if isinstance(self.module, nn.Linear):
            return (activation.reshape(n, -1, activation.shape[-1]).to(grad.dtype),
                    grad.reshape(n, -1, grad.shape[-1]))
        conv = self.module
        assert isinstance(conv, nn.Conv2d) and not isinstance(conv.padding, str)
        patches = F.unfold(activation.to(grad.dtype), conv.kernel_size, dilation=conv.dilation,
                           padding=conv.padding, stride=conv.stride)  # [B, d, L]
        return patches.transpose(1, 2), grad.reshape(n, grad.shape[1], -1).transpose(1, 2)

    def per_example_weight(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return torch.bmm(a.transpose(1, 2), g)  # [B, d, p]
        return torch.bmm(g.transpose(1, 2), a)  # [B, p, d]

    def _matmul_call(self, call: list[Any], grad: torch.Tensor) -> None:
        a, g = self.as_matmul(call[0], grad)
        if self.bias is not None:
            per_example = g.sum(1)
            self.bias_sum = per_example if self.bias_sum is None else self.bias_sum + per_example
        tokens, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if self.weight is not None and tokens > 1 and not ghost_is_cheaper(tokens, d_in, d_out):
            per_example = self.per_example_weight(a, g)
            self.weight_sum = per_example if self.weight_sum is None else self.weight_sum + per_example
            call[:] = ["done"]
        else:
            call[:] = ["ghost", a, g]


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
        self._capturing = False
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer))
                         for layer in self.layers]

    # ------------------------------------------------------------------ the pass
    def _forward_hook(self, layer: _Layer) -> Any:
        def forward_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if not self._capturing:
                return None
            if not isinstance(output, torch.Tensor) or not inputs:
                raise PrivacyError(f"grad_sample_mode='bk': layer {layer.name} does not map "
                                   "one tensor to one tensor; use grad_sample_mode='ew'")
            record = layer.record_call(inputs[0].detach())
            if output.requires_grad:  # the input needs a gradient: a tensor hook suffices
                output.register_hook(record)  # type: ignore[no-untyped-call]
                return output
            return _Tap.apply(output, self._anchor, record)  # type: ignore[no-untyped-call]
        return forward_hook

    def close(self) -> None:
        """Remove the forward hooks from the model's layers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Run the model's forward pass inside this block: the parameters are detached and
        every tracked layer's input and output gradient are kept for :meth:`clip_into_grads`."""
        if not self._handles:
            raise PrivacyError("BookKeeper.capture after close()")
        for layer in self.layers:
            layer.clear()
        flags = [p.requires_grad for p in self.params]
        try:
            for p in self.params:
                p.requires_grad_(False)
            self._capturing = True
            yield
        finally:
            self._capturing = False
            for p, flag in zip(self.params, flags, strict=True):
                p.requires_grad_(flag)

    def unused_layers(self) -> list[str]:
        """Tracked layers that got no output gradient in the last pass."""
        return [layer.name for layer in self.layers
                if not layer.calls or any(not isinstance(call[0], str) and len(call) < 2
                                          for call in layer.calls)]

    # ------------------------------------------------------------------ norms
    def _matmul(self, layer: _Layer, n: int) -> None:
        """Norms of a Linear layer or 2-D convolution (weight gradient ``sum_t g_t a_t^T``)."""
        ghost = [(c[1], c[2]) for c in layer.calls if c[0] == "ghost"]
        if layer.weight is not None:
            if layer.weight_sum is not None:
                # some calls went the per-example way: the rest join them (norm of the sum)
                total = layer.weight_sum
                for a, g in ghost:
                    part = layer.per_example_weight(a, g)
                    total = part if total is None else total + part
                assert total is not None
                layer.sq[id(layer.weight)] = total.pow(2).sum((1, 2))
                layer.kept[id(layer.weight)] = ("direct_t" if layer.transposed else "direct", total)
            else:  # ghost norm over all calls (concatenated along T)
                a = ghost[0][0] if len(ghost) == 1 else torch.cat([x for x, _ in ghost], dim=1)
                g = ghost[0][1] if len(ghost) == 1 else torch.cat([y for _, y in ghost], dim=1)
                if a.shape[1] == 1:
                    sq = a[:, 0].pow(2).sum(1) * g[:, 0].pow(2).sum(1)
                else:
                    sq = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
                          ).sum((1, 2)).clamp(min=0)
                layer.sq[id(layer.weight)] = sq
                layer.kept[id(layer.weight)] = ("ghost", a, g)
        if layer.bias is not None:
            assert layer.bias_sum is not None
            layer.sq[id(layer.bias)] = layer.bias_sum.pow(2).sum(1)
            layer.kept[id(layer.bias)] = ("direct", layer.bias_sum)

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
            if layer.kind == "matmul":
                self._matmul(layer, n)
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
