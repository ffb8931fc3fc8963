"""FusedDPOptimizer (fedrg.privacy.fused) against Opacus' own DPOptimizer: differential tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.optimizers import DPOptimizer

from fedrg.privacy.dpsgd import DPSession, use_seeded_noise_for_tests
from fedrg.privacy.fused import FusedDPOptimizer

SHAPES = [(3, 4), (4,), (2, 3, 3), (1,)]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _step(cls, chunks, *, clip, sigma, batch, seed=0, lr=0.5):
    """Parameters after one SGD step of ``cls`` over the per-sample gradient ``chunks``
    (a list of physical chunks of one logical batch, each a list of per-tensor samples)."""
    params = _params(seed)
    opt = cls(torch.optim.SGD(params, lr=lr), noise_multiplier=sigma, max_grad_norm=clip,
              expected_batch_size=batch, loss_reduction="mean",
              generator=torch.Generator().manual_seed(7))
    for k, chunk in enumerate(chunks):
        for p, gs in zip(params, chunk, strict=True):
            p.grad_sample = gs.clone()
        if k < len(chunks) - 1:
            opt.signal_skip_step(do_skip=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params]


def _samples(n: int, seed: int, scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *s), generator=g) * scale for s in SHAPES]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=3), clip=st.floats(0.05, 5.0),
       scale=st.floats(0.01, 10.0), seed=st.integers(0, 10_000))
def test_without_noise_fused_equals_opacus_clipping(sizes, clip, scale, seed):
    chunks = [_samples(n, seed + i, scale) for i, n in enumerate(sizes)]
    batch = max(1.0, float(sum(sizes)))
    ref = _step(DPOptimizer, chunks, clip=clip, sigma=0.0, batch=batch)
    got = _step(FusedDPOptimizer, chunks, clip=clip, sigma=0.0, batch=batch)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_one_example_moves_the_step_by_at_most_lr_clip_over_batch():
    base = _samples(5, 0, 3.0)
    other = [torch.cat([t[:4], torch.randn_like(t[4:]) * 100]) for t in base]
    lr, clip, batch = 0.5, 0.7, 5.0
    a = torch.cat([t.reshape(-1) for t in _step(FusedDPOptimizer, [base], clip=clip, sigma=0.0,
                                                  batch=batch, lr=lr)])
    b = torch.cat([t.reshape(-1) for t in _step(FusedDPOptimizer, [other], clip=clip, sigma=0.0,
                                                  batch=batch, lr=lr)])
    assert float((a - b).norm()) <= 2 * lr * clip / batch + 1e-5


def test_noise_has_opacus_scale():
    """Noise on a zero gradient: per coordinate N(0, (sigma C / B)^2), independent."""
    big = [(400, 250)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in big]
    sigma, clip, batch = 1.3, 0.8, 16.0
    opt = FusedDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma,
                           max_grad_norm=clip, expected_batch_size=batch, loss_reduction="mean",
                           generator=torch.Generator().manual_seed(3))
    params[0].grad_sample = torch.zeros((0, *big[0]))
    opt.pre_step()
    grad = params[0].grad.reshape(-1)
    want = sigma * clip / batch
    assert abs(float(grad.std()) / want - 1) < 0.02  # 100k draws: std error ~0.2 %
    assert abs(float(grad.mean())) < 4 * want / 100_000 ** 0.5


def test_seeded_noise_hook_repeats_a_run_and_is_off_outside_it():
    def updates():
        out = []
        for _ in range(2):
            s = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                          expected_batch_size=4.0)
            out.append(torch.randn(3, generator=s._noise_generator))
        return out

    with use_seeded_noise_for_tests(11):
        first = updates()
    with use_seeded_noise_for_tests(11):
        again = updates()
    with use_seeded_noise_for_tests(12):
        other = updates()
    outside = updates()
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(first[0], first[1])  # two sessions in one block differ
    assert not torch.allclose(first[0], other[0])
    assert not any(torch.allclose(first[0], o) for o in outside)


def test_keyed_seeded_noise_is_off_until_a_test_selects_it_and_follows_the_key(monkeypatch):
    """The Ray workers' switch (tests/seeded_simulate.py): off by default (OS entropy); once
    selected in a process, a session's noise depends on (seed, key) only, not on how many
    sessions that process ran before (which hospital a Ray worker answers varies)."""
    from fedrg.privacy import dpsgd

    monkeypatch.setattr(dpsgd, "_KEYED_TEST_NOISE", [])  # and restored for the other tests
    assert dpsgd.keyed_test_noise_seed("hospital-1/round-1") is None

    def noise(key):
        s = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                      expected_batch_size=4.0, seed=dpsgd.keyed_test_noise_seed(key))
        return torch.randn(3, generator=s._noise_generator)

    dpsgd.seed_noise_by_key_for_tests(25)
    first = noise("hospital-1/round-1")
    noise("hospital-2/round-1")  # another session in between changes nothing
    torch.testing.assert_close(noise("hospital-1/round-1"), first)
    assert not torch.allclose(noise("hospital-1/round-2"), first)
    dpsgd.seed_noise_by_key_for_tests(26)
    assert not torch.allclose(noise("hospital-1/round-1"), first)


def test_seeded_noise_hook_cannot_be_selected_by_config():
    from fedrg.config import ExperimentConfig, load_config

    fields = {f for section in ExperimentConfig.model_fields.values()
              for f in section.annotation.model_fields}
    assert not any("noise_seed" in f or "test" in f for f in fields)
    with pytest.raises(Exception, match="noise_seed"):
        load_config(None, ["privacy.noise_seed=1"])


def _grouped_grad(samples, groups, norms, clip, batch=1.0):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = FusedDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
                           expected_batch_size=batch, loss_reduction="mean",
                           clip_groups=groups, group_max_norms=norms)
    for p, gs in zip(params, samples, strict=True):
        p.grad_sample = gs.clone()
    opt.pre_step()
    return torch.cat([p.grad.reshape(-1) for p in params])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6), share=st.floats(0.05, 0.95), clip=st.floats(0.1, 4.0),
       scale=st.floats(0.01, 50.0), groups=st.sampled_from([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1]]),
       seed=st.integers(0, 10_000))
def test_group_wise_clipping_keeps_the_sensitivity_at_max_grad_norm(n, share, clip, scale, groups, seed):
    norms = [clip * share ** 0.5, clip * (1 - share) ** 0.5]
    samples = _samples(n, seed, scale)
    changed = [torch.cat([t[:-1], torch.randn_like(t[-1:]) * 1000]) for t in samples]
    a = _grouped_grad(samples, groups, norms, clip)
    b = _grouped_grad(changed, groups, norms, clip)
    assert float((a - b).norm()) <= 2 * clip * (1 + 1e-4)
    # each group's share of one example's gradient is bounded by its own C_g
    one = _grouped_grad([t[:1] * 1000 for t in samples], groups, norms, clip)
    sizes = [torch.Size(s).numel() for s in SHAPES]
    for k, c in enumerate(norms):
        part = torch.cat([chunk for chunk, g in zip(torch.split(one, sizes), groups, strict=True) if g == k])
        assert float(part.norm()) <= c * (1 + 1e-4)


def test_group_wise_clipping_leaves_small_gradients_alone():
    samples = _samples(3, 1, 1e-3)
    got = _grouped_grad(samples, [0, 1, 0, 1], [0.6, 0.8], 1.0)
    want = torch.cat([t.sum(0).reshape(-1) for t in samples])
    torch.testing.assert_close(got, want)


def test_group_wise_clipping_refuses_inconsistent_bounds():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    common = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 4.0}
    with pytest.raises(ValueError, match="root sum"):
        FusedDPOptimizer(torch.optim.SGD(params, lr=1.0), clip_groups=[0, 1, 0, 1],
                         group_max_norms=[0.5, 0.5], **common)
    with pytest.raises(ValueError, match="entries"):
        FusedDPOptimizer(torch.optim.SGD(params, lr=1.0), clip_groups=[0, 1],
                         group_max_norms=[0.6, 0.8], **common)


def test_session_group_shares_are_checked():
    from fedrg.errors import PrivacyError

    with pytest.raises(PrivacyError, match="report_clip_share"):
        DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=4.0,
                  clip_groups=[(("lora_",), 1.2)])
    with pytest.raises(PrivacyError, match="ghost"):
        DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=4.0,
                  grad_sample_mode="ghost", clip_groups=[(("lora_",), 0.3)])
