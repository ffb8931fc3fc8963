"""grad_sample_mode='bk' (fedrg.privacy.bookkeeping) against Opacus' own DP-SGD.

The reference is Opacus unchanged: ``GradSampleModule`` (hooks) + ``DPOptimizer`` with a
generator in the same state as the session's noise generator. The clipped, noised and scaled
gradient of the book-keeping step must equal Opacus' to float tolerance, noise included.
"""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

import fedrg.privacy.bookkeeping as bookkeeping
from fedrg.errors import PrivacyError
from fedrg.privacy.bookkeeping import BookKeeper, ghost_is_cheaper
from fedrg.privacy.dpsgd import DPSession


class Mixed(nn.Module):
    """Every layer kind the book-keeping handles: a convolution and GroupNorm (Opacus'
    function / unfolded patches), an embedding, a Linear over a sequence with a LoRA-style
    low-rank pair on it, Linear layers over single vectors, and layers called twice (over
    single vectors and over sequences)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.emb = nn.Embedding(7, 6)
        self.seq = nn.Linear(6, 5)
        self.lora_a = nn.Linear(5, 2, bias=False)
        self.lora_b = nn.Linear(2, 5, bias=False)
        self.norm = nn.LayerNorm(5)
        self.twice = nn.Linear(5, 5)
        self.shared = nn.Linear(9, 9)
        self.head = nn.Linear(9, 2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, img: torch.Tensor, tok: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_img = torch.nn.functional.silu(self.gn(self.conv(img))).mean((2, 3))  # [B, 4]
        s = self.seq(self.emb(tok))  # [B, T, 5]
        s = self.norm(s + self.lora_b(self.lora_a(s)))
        s = s + self.twice(torch.tanh(self.twice(s)))  # the same layer twice, on sequences
        h = torch.cat([h_img, s.mean(1)], dim=1)  # [B, 9]
        h = self.shared(torch.tanh(self.shared(h)))  # the same layer twice
        return ((self.head(h) - y) ** 2).mean(-1)


def make_batch(n: int, seed: int, scale: float = 1.0, tokens: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"img": torch.randn(n, 1, 8, 8, generator=g) * scale,
            "tok": torch.randint(0, 7, (n, tokens), generator=g),
            "y": torch.randn(n, 2, generator=g) * scale}


def bk_step(model, batch, *, sigma, clip, expected, seed, physical=None, groups=()):
    before = [p.detach().clone() for p in model.parameters()]
    session = DPSession(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=0.5,
                        expected_batch_size=expected, grad_sample_mode="bk", seed=seed,
                        max_physical_batch_size=physical, clip_groups=groups)
    noise_state = session._noise_generator.get_state()
    session.attach(model, torch.optim.SGD(model.parameters(), lr=1.0))
    try:
        session.step(batch)
    finally:
        session.cleanup()
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)], noise_state


def opacus_step(model, batch, *, sigma, clip, expected, noise_state):
    """Opacus unchanged: per-sample gradients by hooks, DPOptimizer's clip, noise, scale."""
    before = [p.detach().clone() for p in model.parameters()]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    generator = torch.Generator()
    generator.set_state(noise_state)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=sigma,
                      max_grad_norm=clip, expected_batch_size=expected, loss_reduction="mean",
                      generator=generator)
    gsm(**batch).mean().backward()
    opt.step()
    gsm._close()
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


def per_example_norms(batch) -> torch.Tensor:
    model = Mixed()
    norms = []
    for i in range(len(batch["y"])):
        model.zero_grad()
        model(**{k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        norms.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
    return torch.stack(norms)


@pytest.mark.parametrize("path", ["cost", "ghost", "direct"])
@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_bk_gradient_equals_opacus_with_the_same_seed(monkeypatch, path, sigma):
    """Clipped + noised + scaled gradient of bk == Opacus hooks + DPOptimizer, whichever way
    each Linear layer's norm is computed (by cost, all ghost norms, all per-example)."""
    if path != "cost":
        monkeypatch.setattr(bookkeeping, "ghost_is_cheaper", lambda *a: path == "ghost")
    batch = make_batch(6, seed=1, scale=2.0)
    norms = per_example_norms(batch)
    clip = float(norms.median())  # about half the examples are clipped
    assert (norms > clip * 1.05).sum() >= 2 and (norms < clip * 0.95).sum() >= 2
    got, state = bk_step(Mixed(), batch, sigma=sigma, clip=clip, expected=5.0, seed=3)
    want = opacus_step(Mixed(), batch, sigma=sigma, clip=clip, expected=5.0, noise_state=state)
    assert max(float(w.abs().max()) for w in want) > 1e-3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6)


def test_bk_noise_is_the_opacus_draw_not_just_its_distribution():
    """With the generator in another state the two steps differ: the equality above is the
    noise itself, value for value."""
    batch = make_batch(4, seed=2)
    got, _ = bk_step(Mixed(), batch, sigma=1.0, clip=0.5, expected=4.0, seed=3)
    other = torch.Generator().manual_seed(12345).get_state()
    want = opacus_step(Mixed(), batch, sigma=1.0, clip=0.5, expected=4.0, noise_state=other)
    assert max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) > 0.05


def test_bk_physical_chunks_equal_opacus_on_the_whole_batch():
    batch = make_batch(7, seed=5, scale=3.0)
    got, state = bk_step(Mixed(), batch, sigma=0.7, clip=0.4, expected=6.0, seed=9, physical=3)
    want = opacus_step(Mixed(), batch, sigma=0.7, clip=0.4, expected=6.0, noise_state=state)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6)


def test_bk_group_clipping_equals_the_fused_optimizer():
    """Group-wise clipping (report side vs the rest): bk == FusedDPOptimizer (hooks), no noise."""
    batch = make_batch(6, seed=4, scale=2.0)
    groups = [(("lora_", "seq."), 0.3)]

    def hooks_step():
        model = Mixed()
        before = [p.detach().clone() for p in model.parameters()]
        s = DPSession(noise_multiplier=0.0, max_grad_norm=0.6, sample_rate=0.5,
                      expected_batch_size=5.0, grad_sample_mode="hooks", seed=0,
                      clip_groups=groups)
        s.attach(model, torch.optim.SGD(model.parameters(), lr=1.0))
        s.step(batch)
        s.cleanup()
        return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]

    got, _ = bk_step(Mixed(), batch, sigma=0.0, clip=0.6, expected=5.0, seed=0, groups=groups)
    flat, _ = bk_step(Mixed(), batch, sigma=0.0, clip=0.6, expected=5.0, seed=0)
    want = hooks_step()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert max(float((g - f).abs().max()) for g, f in zip(got, flat, strict=True)) > 1e-4


def test_bk_computes_no_unclipped_parameter_gradient():
    """The parameters are detached in the pass: a plain backward leaves no gradient behind
    that an optimizer could apply unclipped, and requires_grad is restored afterwards."""
    model = Mixed()
    keeper = BookKeeper(model, list(model.parameters()))
    with keeper.capture():
        losses = model(**make_batch(3, seed=0))
    losses.sum().backward()
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert keeper.unused_layers() == []
    keeper.close()


def test_bk_refuses_layers_without_a_per_sample_rule():
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x * self.scale).sum(-1)

    model = Bare()
    s = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                  expected_batch_size=2, grad_sample_mode="bk", seed=0)
    with pytest.raises(PrivacyError, match="bk.*Bare"):
        s.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_cost_rule_picks_per_example_gradients_for_lora_and_ghost_norms_for_vectors():
    assert not ghost_is_cheaper(72, 128, 8)  # LoRA A over a 72-token sequence
    assert not ghost_is_cheaper(72, 8, 352)  # LoRA B
    assert ghost_is_cheaper(1, 64, 512)  # a projector on one feature vector
    assert ghost_is_cheaper(4, 1024, 1024)  # a wide layer over a short sequence


def test_bk_equals_opacus_on_the_real_adapter_with_every_parameter_trained(base_dir, dataset):
    """peft LoRA on the tiny Llama, prompt projectors, the image CNN (convolutions and
    GroupNorm), genomics encoder and marker heads, all trained: bk == Opacus, noise included."""
    from model_fixtures import tiny_data_cfg, tiny_model_cfg

    from fedrg.data.dataset import collate_samples
    from fedrg.model.adapter import build_model

    batch = collate_samples([dataset[i] for i in (0, 2, 3, 5, 7)])

    def fresh():  # the LM frozen, every adapter part trainable (nothing frozen_under_dp)
        return build_model(tiny_model_cfg(base_dir, max_report_tokens=24), tiny_data_cfg(), seed=0)

    model = fresh()
    assert any("image_encoder.features" in n for n, p in model.named_parameters() if p.requires_grad)
    tensors = model.encode_batch(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    s = DPSession(noise_multiplier=0.8, max_grad_norm=0.05, sample_rate=0.5,
                  expected_batch_size=5.0, grad_sample_mode="bk", seed=4)
    state = s._noise_generator.get_state()
    s.attach(model, torch.optim.SGD(params, lr=1.0))
    s.step(batch)
    s.cleanup()
    got = [b - p.detach() for b, p in zip(before, params, strict=True)]

    ref = fresh()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in ref_params]
    gsm = GradSampleModule(ref, batch_first=True, loss_reduction="mean")
    generator = torch.Generator()
    generator.set_state(state)
    opt = DPOptimizer(torch.optim.SGD(ref_params, lr=1.0), noise_multiplier=0.8,
                      max_grad_norm=0.05, expected_batch_size=5.0, loss_reduction="mean",
                      generator=generator)
    gsm(**tensors).mean().backward()
    opt.step()
    gsm._close()
    want = [b - p.detach() for b, p in zip(before, ref_params, strict=True)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
