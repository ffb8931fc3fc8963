"""The multimodal adapter: trainable parts, masked per-example losses, Opacus compatibility."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from model_fixtures import (
    gpt2_base,
    tiny_data_cfg,
    tiny_model_cfg,
)

from fedrg.config import ModelConfig
from fedrg.errors import ModelError
from fedrg.model.adapter import RadiogenomicsModel, build_model
from fedrg.model.payload import adapter_manifest
from fedrg.train.loop import collate, train_local


@pytest.fixture()
def model(base_dir):
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=0)


def _batch(dataset, idx):
    return collate([dataset[i] for i in idx])


def test_only_adapter_parameters_are_trainable(model):
    counts = model.parameter_counts()
    manifest = adapter_manifest(model)
    print(f"\ntiny base: trainable={counts['trainable']} total={counts['total']} "
          f"payload_bytes={manifest['bytes']}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(
        ("lora_" in n) or n.split(".")[0] in {
            "image_encoder", "image_proj", "genomics_encoder", "genomics_proj", "marker_head"}
        for n in names
    )
    base_trainable = [n for n, p in model.lm.named_parameters()
                      if p.requires_grad and "lora_" not in n]
    assert base_trainable == []
    assert manifest["numel"] == counts["trainable"]
    assert any("q_proj.lora_A" in n for n in names) and any("down_proj.lora_B" in n for n in names)


def test_payload_under_two_percent_of_a_1b_llama():
    """LoRA + projectors + heads on a Llama-3.2-1B-shaped config (meta tensors, no weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=True)
    mcfg = ModelConfig()
    dcfg = tiny_data_cfg(image_shape=[64, 64])
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)
        base_params = sum(p.numel() for p in base.parameters())
        for p in base.parameters():
            p.requires_grad_(False)
        lm = get_peft_model(base, LoraConfig(r=mcfg.lora_rank, lora_alpha=mcfg.lora_alpha,
                                             target_modules=mcfg.target_modules,
                                             task_type="CAUSAL_LM"))
        tok = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = RadiogenomicsModel(lm, tok, mcfg, dcfg, mcfg.target_modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    payload_bytes = 4 * trainable
    base_bytes = 4 * base_params
    print(f"\n1B Llama: base params={base_params} trainable={trainable} "
          f"payload={payload_bytes / 2**20:.1f} MiB ({100 * trainable / base_params:.2f}% of base)")
    assert 1.0e9 < base_params < 1.5e9
    assert payload_bytes < 0.02 * base_bytes


def test_opacus_validator_finds_no_errors(model):
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(model, strict=False) == []
    for name in ("image_encoder", "image_proj", "genomics_encoder", "genomics_proj", "marker_head"):
        assert ModuleValidator.validate(getattr(model, name), strict=False) == []
    assert GradSampleModule.validate(model, strict=False) == []


def test_opacus_per_sample_grads_match_one_at_a_time(model, dataset):
    from opacus.grad_sample import GradSampleModule

    batch = _batch(dataset, [0, 1])
    batch["report"][1] = batch["report"][1][:40]  # different lengths -> padding
    tensors = model.encode_batch(batch)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():  # non-zero LoRA B so LoRA A gets a gradient too
        for n, p in params:
            if "lora_B" in n:
                p.normal_(0, 0.05)
    reference = []
    for i in range(2):
        model.zero_grad(set_to_none=True)
        single = {k: v[i: i + 1] for k, v in tensors.items()}
        model(**single).sum().backward()
        reference.append({n: p.grad.clone() for n, p in params})
    model.zero_grad(set_to_none=True)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=False)
    try:
        gsm(**tensors).sum().backward()
        for n, p in params:
            assert p.grad_sample is not None, n
            for i in range(2):
                torch.testing.assert_close(p.grad_sample[i], reference[i][n],
                                           atol=2e-5, rtol=1e-3, msg=n)
    finally:
        gsm._close()


def test_every_trainable_parameter_is_used_without_genomics_or_report(model, dataset):
    batch = _batch(dataset, [0, 1, 2])
    batch["has_genomics"] = torch.zeros(3)
    batch["report"] = ["", "", ""]
    model(**model.encode_batch(batch)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_masked_losses_and_missing_modalities(model, dataset):
    batch = _batch(dataset, [0, 1])
    batch["report"] = ["", batch["report"][1]]
    batch["marker_mask"] = torch.zeros_like(batch["marker_mask"])
    batch["has_genomics"] = torch.tensor([0.0, 1.0])
    loss = model.per_example_loss(batch)
    assert loss.shape == (2,)
    assert float(loss[0]) == 0.0  # nothing known about patient 0: no loss, no gradient
    assert float(loss[1]) > 0.0
    loss.sum().backward()
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters()
               if p.requires_grad and "marker_head" not in n and "lora_A" not in n
               and "genomics" not in n)


def test_report_loss_is_per_sequence(model, dataset):
    """An example's loss does not depend on the other examples' lengths (no batch mean)."""
    batch = _batch(dataset, [0, 1])
    batch["report"] = [batch["report"][0], batch["report"][1] + " " + batch["report"][1]]
    with torch.no_grad():
        together = model.per_example_loss(batch)
        alone = model.per_example_loss(_batch(dataset, [0]))
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-5)


def test_withheld_genomics_are_masked(model, dataset):
    batch = _batch(dataset, [0, 1])
    batch["has_genomics"] = torch.zeros(2)
    other = dict(batch, expression=batch["expression"] + 5.0, mutations=1 - batch["mutations"])
    with torch.no_grad():
        a = model.per_example_loss(batch)
        b = model.per_example_loss(other)
    torch.testing.assert_close(a, b)
    probs = model.marker_probabilities(_batch(dataset, [0, 1]), withhold_genomics=True)
    torch.testing.assert_close(probs, model.marker_probabilities(other))


def test_frozen_lm_stays_in_train_mode(model):
    model.eval()
    assert model.lm.training and not model.image_encoder.training
    model.train()
    assert model.lm.training and model.image_encoder.training


def test_generate_reports_returns_text(model, dataset):
    texts = model.generate_reports(_batch(dataset, [0, 1]), max_new_tokens=8)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_3d_image_variant(base_dir):
    dcfg = tiny_data_cfg(image_mode="3d", image_shape=[8, 16, 16])
    model = build_model(tiny_model_cfg(base_dir, image_norm="group"), dcfg)
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(model, strict=False) == []
    assert any(isinstance(mod, torch.nn.GroupNorm) for mod in model.image_encoder.modules())
    g, m, k = len(dcfg.gene_panel), len(dcfg.mutation_genes), len(dcfg.markers)
    batch = {
        "image": torch.rand(2, 1, 8, 16, 16), "expression": torch.randn(2, g),
        "mutations": torch.zeros(2, m), "has_genomics": torch.tensor([1.0, 0.0]),
        "markers": torch.ones(2, k), "marker_mask": torch.ones(2, k),
        "report": ["There is a 3.0 cm intra-axial mass.", ""], "patient_id": ["a", "b"],
    }
    loss = model.per_example_loss(batch)
    loss.sum().backward()
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert any(isinstance(mod, torch.nn.Conv3d) for mod in model.image_encoder.modules())


def test_gpt2_base_trains(fx_root, base_dir, dataset):
    gdir = gpt2_base(fx_root, base_dir)
    model = build_model(tiny_model_cfg(gdir), tiny_data_cfg())
    assert model.target_modules == ["c_attn", "c_proj", "c_fc"]  # follows config.model_type
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert any("c_attn" in n for n in lora) and any("c_fc" in n for n in lora)
    before = [p.detach().clone() for n, p in model.named_parameters() if p.requires_grad]
    from fedrg.config import TrainingConfig

    metrics = train_local(model, dataset, TrainingConfig(batch_size=4, lr=5e-3), steps=3)
    after = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
    assert metrics["examples"] == 12
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert isinstance(model.generate_reports(_batch(dataset, [0]), max_new_tokens=4)[0], str)


def test_target_modules_errors(fx_root, base_dir):
    gdir = gpt2_base(fx_root, base_dir)
    with pytest.raises(ModelError, match=r"target_modules.*c_attn"):
        build_model(tiny_model_cfg(gdir, target_modules=["q_proj", "v_proj"]), tiny_data_cfg())
    with pytest.raises(ModelError, match="lora_dropout"):
        build_model(tiny_model_cfg(base_dir, lora_dropout=0.1), tiny_data_cfg())


def test_build_is_deterministic(base_dir):
    a = build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=3)
    b = build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=3)
    c = build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=4)
    ma, mb, mc = adapter_manifest(a), adapter_manifest(b), adapter_manifest(c)
    assert ma["sha256"] == mb["sha256"] != mc["sha256"]
    assert np.isfinite(ma["numel"])
