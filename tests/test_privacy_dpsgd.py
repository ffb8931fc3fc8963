"""DP-SGD session (fedrg.privacy.dpsgd) on a tiny torch module: differential and property tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fedrg.errors import PrivacyError
from fedrg.privacy.accounting import PrivacyHistory, epsilon_of
from fedrg.privacy.dpsgd import DPSession, batch_size_of, slice_batch

MODES = ["hooks", "functorch", "ew", "ghost", "bk"]


class TinyModel(nn.Module):
    """Per-example loss model with a frozen layer, LayerNorm and an embedding (like the adapter)."""

    def __init__(self, d_in: int = 6, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.frozen = nn.Linear(d_in, width)
        self.frozen.requires_grad_(False)
        self.emb = nn.Embedding(5, width)
        self.l1 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def encode_batch(self, batch):
        return {"x": batch["x"], "tok": batch["tok"], "y": batch["y"]}

    def forward(self, x, tok, y):
        h = self.frozen(x) + self.emb(tok).mean(1)
        h = self.head(torch.tanh(self.norm(self.l1(h))))
        return ((h - y) ** 2).mean(-1)


class ListDataset:
    def __init__(self, n: int, seed: int = 0, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g) * scale
        self.tok = torch.randint(0, 5, (n, 3), generator=g)
        self.y = torch.randn(n, 2, generator=g) * scale

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "tok": self.tok[i], "y": self.y[i]}

    def batch(self, idx):
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        return {"x": self.x[idx], "tok": self.tok[idx], "y": self.y[idx]}


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in trainable(model)])


def dp_update(batch, *, mode, noise_multiplier, max_grad_norm, expected_batch_size, lr=0.1,
              seed=0, physical=None, model_seed=0):
    """Parameter change of one DP-SGD (SGD) step on ``batch``."""
    model = TinyModel(seed=model_seed)
    before = flat(model)
    opt = torch.optim.SGD(trainable(model), lr=lr)
    session = DPSession(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                        sample_rate=0.5, expected_batch_size=expected_batch_size,
                        grad_sample_mode=mode, max_physical_batch_size=physical, seed=seed)
    session.attach(model, opt)
    try:
        session.step(batch)
    finally:
        session.cleanup()
    return flat(model) - before, session


@pytest.mark.parametrize("mode", MODES)
def test_zero_noise_huge_clip_equals_plain_sgd_step(mode):
    data = ListDataset(7, seed=3)
    batch = data.batch(range(7))
    delta_dp, _ = dp_update(batch, mode=mode, noise_multiplier=0.0, max_grad_norm=1e6,
                            expected_batch_size=7)
    plain = TinyModel(seed=0)
    before = flat(plain)
    opt = torch.optim.SGD(trainable(plain), lr=0.1)
    plain(**plain.encode_batch(batch)).mean().backward()
    opt.step()
    delta_plain = flat(plain) - before
    assert delta_plain.abs().max() > 1e-3  # the step does something
    torch.testing.assert_close(delta_dp, delta_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_physical_chunks_sum_to_the_same_step(mode):
    data = ListDataset(9, seed=4)
    batch = data.batch(range(9))
    whole, _ = dp_update(batch, mode=mode, noise_multiplier=0.0, max_grad_norm=0.3,
                         expected_batch_size=4)
    chunked, s = dp_update(batch, mode=mode, noise_multiplier=0.0, max_grad_norm=0.3,
                           expected_batch_size=4, physical=2)
    torch.testing.assert_close(whole, chunked, rtol=1e-4, atol=1e-6)
    assert s.history.total_steps == 1  # five chunks, one accounted step


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 6),
    who=st.integers(0, 5),
    clip=st.floats(0.01, 2.0),
    scale=st.floats(0.5, 20.0),
    seed=st.integers(0, 10_000),
)
def test_one_patient_changes_update_by_at_most_lr_c_over_b(mode, n, who, clip, scale, seed):
    """Zero noise, clipping C: removing one patient moves the SGD update by <= lr*C/B."""
    who = who % n
    data = ListDataset(n, seed=seed, scale=scale)
    lr, expected = 0.1, 3.0
    with_all, _ = dp_update(data.batch(range(n)), mode=mode, noise_multiplier=0.0,
                            max_grad_norm=clip, expected_batch_size=expected, lr=lr,
                            model_seed=seed)
    without, _ = dp_update(data.batch([i for i in range(n) if i != who]), mode=mode,
                           noise_multiplier=0.0, max_grad_norm=clip,
                           expected_batch_size=expected, lr=lr, model_seed=seed)
    change = float((with_all - without).norm())
    assert change <= lr * clip / expected * (1 + 1e-4) + 1e-7


def test_without_clipping_one_patient_can_exceed_the_bound():
    """The bound above is not vacuous: with C huge the same comparison breaks it."""
    data = ListDataset(4, seed=1, scale=20.0)
    lr, expected, clip = 0.1, 3.0, 0.01
    a, _ = dp_update(data.batch(range(4)), mode="hooks", noise_multiplier=0.0,
                     max_grad_norm=1e6, expected_batch_size=expected, lr=lr)
    b, _ = dp_update(data.batch(range(3)), mode="hooks", noise_multiplier=0.0,
                     max_grad_norm=1e6, expected_batch_size=expected, lr=lr)
    assert float((a - b).norm()) > 10 * lr * clip / expected


@pytest.mark.parametrize("mode", MODES)
def test_empty_poisson_batch_is_a_counted_noise_only_step(mode):
    sigma, clip, expected, lr = 2.0, 0.5, 4.0, 1.0
    deltas = []
    for seed in (7, 8, 9, 10):  # four seeded sessions: ~580 noise coordinates in all
        model = TinyModel()
        before = flat(model)
        opt = torch.optim.SGD(trainable(model), lr=lr)
        prior = PrivacyHistory([(sigma, 0.1, 5)])
        s = DPSession(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=0.1,
                      expected_batch_size=expected, grad_sample_mode=mode, history=prior, seed=seed)
        s.attach(model, opt)
        empty = {"x": torch.zeros(0, 6), "tok": torch.zeros(0, 3, dtype=torch.long),
                 "y": torch.zeros(0, 2)}
        for _ in range(4):
            assert s.step({}) is None
            assert s.step(empty) is None
        hist = s.cleanup()
        assert s.noise_only_steps == 8
        assert hist == PrivacyHistory([(sigma, 0.1, 13)])
        deltas.append(flat(model) - before)
    # the noise has the calibrated scale: lr * sigma * C / B per coordinate and step
    # (relative standard error of the std over ~580 coordinates: about 0.03)
    delta = torch.cat(deltas)
    want = lr * sigma * clip / expected
    assert abs(float(delta.std()) / (want * math.sqrt(8)) - 1) < 0.12


def test_history_carries_across_rounds_and_cleanup_allows_rewrapping():
    data = ListDataset(40, seed=2)
    model = TinyModel()
    hist = PrivacyHistory()
    for _round in range(3):
        opt = torch.optim.SGD(trainable(model), lr=0.05)
        s = DPSession(noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.1,
                      expected_batch_size=4, history=hist, n_records=40, seed=_round)
        s.attach(model, opt)
        for batch in s.batches(data, steps=10):
            s.step(batch)
        hist = s.cleanup()
        assert s.module is model
    assert hist == PrivacyHistory([(1.1, 0.1, 30)])
    assert epsilon_of(hist, target_delta=1e-5) == pytest.approx(
        epsilon_of([(1.1, 0.1, 30)], target_delta=1e-5))
    assert not any(k.startswith("_module.") for k in model.state_dict())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_poisson_batches_are_bernoulli_per_record_and_seeded():
    data = ListDataset(50, seed=0)
    s = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2,
                  expected_batch_size=10, seed=11)
    sizes, counts = [], torch.zeros(50)
    for batch in s.batches(data, steps=400):
        sizes.append(batch_size_of(batch))
        for x in batch.get("x", torch.zeros(0, 6)):
            counts[(data.x == x).all(1)] += 1
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 10) < 0.6  # E = q n = 10, sd of the mean ~ 0.14
    assert len(set(sizes)) > 5  # sizes vary (Poisson), not fixed
    freq = counts / 400
    assert float((freq - 0.2).abs().max()) < 0.1
    again = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2,
                      expected_batch_size=10, seed=11)
    assert [batch_size_of(b) for b in again.batches(data, steps=400)] == sizes


def test_rare_sampling_yields_empty_batches_that_step_as_noise():
    data = ListDataset(10, seed=0)
    model = TinyModel()
    s = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.02,
                  expected_batch_size=0.2, n_records=10, seed=3)
    s.attach(model, torch.optim.SGD(trainable(model), lr=0.01))
    losses = [s.step(b) for b in s.batches(data, steps=30)]
    s.cleanup()
    assert losses.count(None) == s.noise_only_steps >= 20
    assert s.history.total_steps == 30


def test_noise_comes_from_os_entropy_unless_seeded():
    batch = ListDataset(3).batch(range(3))
    a, _ = dp_update(batch, mode="hooks", noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=3, seed=None)
    b, _ = dp_update(batch, mode="hooks", noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=3, seed=None)
    c, _ = dp_update(batch, mode="hooks", noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=3, seed=5)
    d, _ = dp_update(batch, mode="hooks", noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=3, seed=5)
    assert not torch.equal(a, b)
    assert torch.equal(c, d)


@pytest.mark.parametrize("mode", MODES)
def test_unused_trainable_parameter_is_refused(mode):
    model = TinyModel()
    model.unused = nn.Linear(2, 2)
    s = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                  expected_batch_size=2, grad_sample_mode=mode, seed=0)
    s.attach(model, torch.optim.SGD(trainable(model), lr=0.1))
    with pytest.raises(PrivacyError, match="unused"):
        s.step(ListDataset(2).batch(range(2)))
    s.cleanup()


def test_batchnorm_and_foreign_optimizer_are_refused():
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    s = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                  expected_batch_size=2)
    with pytest.raises(PrivacyError, match="GroupNorm"):
        s.attach(bn, torch.optim.SGD(bn.parameters(), lr=0.1))
    model, other = TinyModel(), TinyModel()
    with pytest.raises(PrivacyError, match="optimizer"):
        s.attach(model, torch.optim.SGD(trainable(other), lr=0.1))


def test_dataset_length_must_match_the_plan():
    s = DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                  expected_batch_size=2, n_records=5)
    with pytest.raises(PrivacyError, match="planned for 5"):
        next(iter(s.batches(ListDataset(6), steps=1)))


def test_for_plan_takes_every_privacy_number_from_the_hospital_plan():
    """The session runs exactly the mechanism the hospital planned (and its ledger records)."""
    from fedrg.config import load_config
    from fedrg.hospital.plan import Spent, plan_training
    from fedrg.hospital.request import check_request
    from fedrg.policy import SitePolicy

    policy = SitePolicy()
    cfg = check_request(load_config(None, ["training.batch_size=8", "training.local_epochs=2.0",
                                           "privacy.max_grad_norm=0.7", "privacy.grad_sample_mode='ghost'",
                                           "privacy.report_clip_share=0.0"]),
                        policy, round_=1, hospitals_in_round=3)
    plan = plan_training(cfg, policy, n_train=40, spent=Spent(), run_id="r", round_=1)
    s = DPSession.for_plan(plan, privacy_cfg=cfg.privacy, training_cfg=cfg.training)
    assert (s.sample_rate, s.expected_batch_size, s.steps_per_round) == (0.2, 8.0, 10)
    assert (s.max_grad_norm, s.grad_sample_mode, s.noise_multiplier) == (0.7, "ghost", plan.noise_multiplier)
    assert (s.accountant_name, s.n_records) == (policy.accountant, 40)
    assert s.clip_groups == []
    grouped = cfg.privacy.model_copy(update={"grad_sample_mode": "ew", "report_clip_share": 0.3})
    s = DPSession.for_plan(plan, privacy_cfg=grouped, training_cfg=cfg.training)
    assert s.clip_groups == [(("lora_", "image_proj.", "genomics_proj."), 0.3)]
    from fedrg.config import PrivacyConfig

    with pytest.raises(ValueError, match="report_clip_share=0.25.*ghost"):
        PrivacyConfig(grad_sample_mode="ghost")


def test_slice_batch_keeps_lists_and_scalars():
    b = {"x": torch.arange(6).view(3, 2), "r": ["a", "b", "c"], "k": 5}
    part = slice_batch(b, 1, 3)
    assert part["r"] == ["b", "c"] and part["k"] == 5 and part["x"].shape == (2, 2)
    assert batch_size_of({}) == 0 and batch_size_of({"r": []}) == 0
