"""DP-SGD on the real adapter model (peft LoRA on a tiny Llama + encoders), through train_local.

FACTS.md reports Opacus + peft combinations that silently corrupted LoRA updates while
epsilon accrued normally: here the per-sample gradients Opacus clips are checked against a
one-example-at-a-time reference, and the LoRA weights must change, by a bounded amount.
"""

from __future__ import annotations

import math

import pytest
import torch
from model_fixtures import tiny_data_cfg, tiny_model_cfg

from fedrg.config import TrainingConfig
from fedrg.data.dataset import collate_samples
from fedrg.model.adapter import build_model
from fedrg.privacy.accounting import PrivacyHistory, epsilon_of
from fedrg.privacy.dpsgd import DPSession
from fedrg.train.loop import train_local

MODES = ["hooks", "functorch", "ew", "ghost", "bk"]


def fresh_model(base_dir):
    return build_model(tiny_model_cfg(base_dir, max_report_tokens=24), tiny_data_cfg(), seed=0)


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat(params):
    return torch.cat([p.detach().reshape(-1).clone() for _, p in params])


def test_clipped_per_sample_gradients_match_one_at_a_time_reference(base_dir, dataset):
    """Zero noise, tiny C (every example clipped): the DP step is -lr/B * sum C g_i/|g_i|."""
    idx = [0, 3, 5, 8]
    batch = collate_samples([dataset[i] for i in idx])
    lr, clip, expected = 0.5, 1e-3, 4.0
    ref_model = fresh_model(base_dir)
    params = trainable(ref_model)
    want = torch.zeros_like(flat(params))
    for i in range(len(idx)):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        ref_model.zero_grad(set_to_none=True)
        ref_model(**ref_model.encode_batch(one)).sum().backward()
        g = torch.cat([p.grad.reshape(-1) for _, p in params])
        assert float(g.norm()) > clip * 10  # clipping is active for every example
        want -= lr / expected * clip * g / g.norm()
    for mode in MODES:
        model = fresh_model(base_dir)
        before = flat(trainable(model))
        s = DPSession(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.5,
                      expected_batch_size=expected, grad_sample_mode=mode, seed=0)
        s.attach(model, torch.optim.SGD([p for _, p in trainable(model)], lr=lr))
        s.step(batch)
        s.cleanup()
        got = flat(trainable(model)) - before
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-7, msg=f"mode {mode}")


@pytest.mark.parametrize("mode", [
    "ew",  # the default
    pytest.param("hooks", marks=pytest.mark.slow),
    pytest.param("ghost", marks=pytest.mark.slow),
])
def test_train_local_with_dp_changes_lora_weights_by_a_bounded_amount(base_dir, dataset, mode):
    model = fresh_model(base_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable(model)}
    cfg = TrainingConfig(batch_size=4, lr=1e-2, max_physical_batch_size=3)
    n, sigma, clip, steps = len(dataset), 0.8, 1.0, 6
    history = PrivacyHistory([(sigma, 4 / n, 10)])  # an earlier round of this dataset

    class Recording(DPSession):
        """Records the parameter change of each step (AdamW moves each coordinate by <= ~lr)."""

        deltas: list[float] = []

        def step(self, batch):
            old = flat(trainable(model))
            out = super().step(batch)
            self.deltas.append(float((flat(trainable(model)) - old).abs().max()))
            return out

    from fedrg.config import PrivacyConfig

    # group-wise clipping (report_clip_share) is an ew/hooks/functorch feature; ghost clips whole
    share = 0.0 if mode == "ghost" else PrivacyConfig().report_clip_share
    from fedrg.privacy.dpsgd import report_clip_groups

    session = Recording(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=cfg.batch_size / n,
                        expected_batch_size=cfg.batch_size, grad_sample_mode=mode, history=history,
                        max_physical_batch_size=cfg.max_physical_batch_size, n_records=n, seed=1,
                        clip_groups=report_clip_groups(PrivacyConfig(grad_sample_mode=mode,
                                                                     report_clip_share=share)))
    metrics = train_local(model, dataset, cfg, steps=steps, privacy=session)
    assert metrics["steps"] == steps
    hist = session.history
    assert hist == PrivacyHistory([(sigma, 4 / n, 10 + steps)])
    assert epsilon_of(hist, target_delta=1e-5) > epsilon_of(history, target_delta=1e-5)
    # frozen base untouched, every adapter tensor moved (LoRA A and B included), boundedly
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name
    lora = [name for name in before if "lora_" in name]
    assert any("lora_A" in x for x in lora) and any("lora_B" in x for x in lora)
    for name, p in trainable(model):
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change under DP"
    # AdamW moves a coordinate by about lr per step (its normalised step is ~1): bounded change
    max_lr = max(g["lr"] for g in session.optimizer.param_groups)
    # the fastest group: the marker head's linear paths under DP (lora_lr_scale x dp_lr_scale)
    assert cfg.lr <= max_lr <= cfg.lr * cfg.lora_lr_scale * cfg.dp_lr_scale
    assert len(session.deltas) == steps
    assert max(session.deltas) <= max_lr * 1.5
    total = max(float((p.detach() - before[n]).abs().max()) for n, p in trainable(model))
    assert 0 < total <= steps * max_lr * 1.5
    # the wrapper is gone: the model can be wrapped again next round, state keys are plain
    assert not any(k.startswith("_module.") for k in model.state_dict())
    again = DPSession(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=4 / n,
                      expected_batch_size=4, grad_sample_mode=mode, history=hist, seed=2)
    train_local(model, dataset, cfg, steps=2, privacy=again)
    assert again.history.total_steps == 10 + steps + 2


def test_sgd_update_norm_is_within_clip_plus_noise(base_dir, dataset):
    """Plain SGD under DP: |update| <= lr/B * (b*C + |noise|) with |noise| ~ sigma C sqrt(d)."""
    model = fresh_model(base_dir)
    params = trainable(model)
    d = sum(p.numel() for _, p in params)
    lr, clip, sigma, expected = 0.1, 0.5, 1.0, 4.0
    s = DPSession(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=4 / len(dataset),
                  expected_batch_size=expected, seed=3)
    s.attach(model, torch.optim.SGD([p for _, p in params], lr=lr))
    for batch in s.batches(dataset, steps=4):
        b = len(batch["report"])
        old = flat(params)
        s.step(batch)
        change = float((flat(params) - old).norm())
        noise = sigma * clip * math.sqrt(d)
        assert change <= lr / expected * (b * clip + noise * 1.1)
        assert change >= lr / expected * noise * 0.9 - lr / expected * b * clip
    s.cleanup()
