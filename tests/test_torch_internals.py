"""The one torch internal fedrg changes (fedrg.privacy.torch_internals) is the reviewed code,
gives the same per-sample gradients, is restored, and a changed torch is refused loudly."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from opacus.grad_sample import GradSampleModuleExpandedWeights, prepare_module
from torch import nn
from torch.nn.utils._expanded_weights import conv_utils

from fedrg.library_pins import LibraryChangedError, source_digest
from fedrg.privacy import torch_internals
from fedrg.privacy.dpsgd import DPSession
from fedrg.privacy.torch_internals import conv_grad_samples_by_unfold


def test_installed_torch_is_the_reviewed_code():
    # fails loudly when torch changes: review fedrg/privacy/torch_internals.py against it,
    # rerun this file and tests/test_privacy_dpsgd*.py, then update TORCH_SOURCES
    got = {name: source_digest(obj) for name, obj in torch_internals.torch_functions().items()}
    assert got == torch_internals.TORCH_SOURCES
    # what the pin covers: the module global decides grouped convolution vs unfold
    assert conv_utils.THRESHOLD == 32
    src = inspect.getsource(conv_utils.conv_backward)
    assert "if batch_size < THRESHOLD and groups == 1:" in src
    assert src.index("conv_group_weight_grad_sample(") < src.index("conv_unfold_weight_grad_sample(")


def test_changed_torch_is_refused_before_any_ew_step(monkeypatch):
    name = next(iter(torch_internals.TORCH_SOURCES))
    monkeypatch.setitem(torch_internals.TORCH_SOURCES, name, "0" * 64)
    monkeypatch.setitem(torch_internals._reviewed, "ok", False)
    model = ConvModel()
    session = DPSession(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.5,
                        expected_batch_size=4, grad_sample_mode="ew", seed=0)
    session.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        with pytest.raises(LibraryChangedError,
                           match=r"torch 2\.\d+\.\d+.*conv_backward is not the code "
                                 r"fedrg\.privacy\.torch_internals was written against"):
            session.step(batch(4))
    finally:
        session.cleanup()
    assert conv_utils.THRESHOLD == 32


class ConvModel(nn.Module):
    """Per-example loss through a convolution (the image encoder's kind of layer)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 6 * 6, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, image: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(image)).flatten(1)
        return (self.head(h).squeeze(-1) - y) ** 2


def batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(n, 1, 6, 6, generator=g), "y": torch.randn(n, generator=g)}


def ew_grad_samples(n: int, *, unfold: bool) -> dict[str, torch.Tensor]:
    model = ConvModel()
    gsm = prepare_module(model, "ew", True, batch_first=True, loss_reduction="sum")
    assert isinstance(gsm, GradSampleModuleExpandedWeights)
    b = batch(n)
    try:
        if unfold:
            with conv_grad_samples_by_unfold():
                gsm(b["image"], y=b["y"]).sum().backward()
        else:
            gsm(b["image"], y=b["y"]).sum().backward()
        return {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    finally:
        gsm._close()


def spy_on_conv_paths(monkeypatch) -> list[str]:
    """Record which of torch's two per-sample convolution paths runs (they still run)."""
    spy: list[str] = []
    for path in ("conv_group_weight_grad_sample", "conv_unfold_weight_grad_sample"):
        original = getattr(conv_utils, path)

        def wrapped(*args, _original=original, _path=path, **kwargs):
            spy.append(_path)
            return _original(*args, **kwargs)

        monkeypatch.setattr(conv_utils, path, wrapped)
    return spy


def test_unfolding_gives_the_same_per_sample_gradients_and_is_what_runs(monkeypatch):
    spy = spy_on_conv_paths(monkeypatch)
    grouped = ew_grad_samples(4, unfold=False)
    assert spy == ["conv_group_weight_grad_sample"]  # batch 4 < 32: torch's grouped path
    spy.clear()
    unfolded = ew_grad_samples(4, unfold=True)
    assert spy == ["conv_unfold_weight_grad_sample"]
    assert conv_utils.THRESHOLD == 32  # put back after the block
    assert grouped["conv.weight"].shape == (4, 3, 1, 3, 3)
    for name, value in grouped.items():
        torch.testing.assert_close(unfolded[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # and both are the one-example-at-a-time gradients
    b = batch(4)
    for i in range(4):
        model = ConvModel()
        model(b["image"][i:i + 1], b["y"][i:i + 1]).sum().backward()
        torch.testing.assert_close(unfolded["conv.weight"][i], model.conv.weight.grad,
                                   rtol=1e-4, atol=1e-6)


def test_blocks_in_several_threads_share_one_lowering_and_the_last_restores_it():
    # thread A enters, B enters, A leaves while B is still inside, B leaves: a per-block
    # save/restore would put 32 back under B's step and leave 0 behind for good
    inside, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def worker() -> None:
        with conv_grad_samples_by_unfold():
            inside.set()
            release.wait(10)
            seen.append(conv_utils.THRESHOLD)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    with conv_grad_samples_by_unfold():
        release.set()
        t.join(10)
        assert seen == [0]
        assert conv_utils.THRESHOLD == 0  # the worker left; this block is still inside
    assert conv_utils.THRESHOLD == 32


def test_ew_session_passes_the_first_forward_argument_positionally_and_unfolds(monkeypatch):
    # the DP step in ew mode equals the plain step with zero noise and no clipping, and its
    # per-sample convolution gradients took the unfold path at batch 5 (the measured speed)
    spy = spy_on_conv_paths(monkeypatch)
    model, plain = ConvModel(), ConvModel()
    b = batch(5)
    session = DPSession(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=0.5,
                        expected_batch_size=5, grad_sample_mode="ew", seed=0)
    session.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        session.step(b)
    finally:
        session.cleanup()
    assert spy == ["conv_unfold_weight_grad_sample"]
    assert conv_utils.THRESHOLD == 32
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    plain(**b).mean().backward()
    opt.step()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


class KeywordOnly(ConvModel):
    def forward(self, *, image: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(image, y)


def test_ew_refuses_a_model_without_a_positional_first_argument_at_attach():
    from fedrg.errors import PrivacyError

    model = KeywordOnly()
    session = DPSession(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.5,
                        expected_batch_size=4, grad_sample_mode="ew", seed=0)
    with pytest.raises(PrivacyError, match=r"grad_sample_mode='ew'.*KeywordOnly.forward.*'hooks'"):
        session.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
