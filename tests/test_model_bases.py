"""Real bases: second architectures saved with save_pretrained, trained one round with DP on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import gpt2_base, tiny_data_cfg, tiny_model_cfg

from fedrg.config import TrainingConfig
from fedrg.model.adapter import build_model
from fedrg.model.payload import get_adapter_arrays
from fedrg.privacy.dpsgd import DPSession
from fedrg.train.loop import train_local
from fedrg.train.schedule import local_steps


def qwen2_base(root: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Qwen2 (grouped-query attention, q/k/v biases) saved with save_pretrained."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out = Path(root) / "qwen2-tiny"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, attention_dropout=0.0,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


BUILDERS = {"qwen2": (qwen2_base, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                   "down_proj"]),
            "gpt2": (gpt2_base, ["c_attn", "c_proj", "c_fc"])}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_a_second_architecture_trains_one_dp_round_from_a_local_directory(fx_root, base_dir, dataset, arch):
    build, targets = BUILDERS[arch]
    directory = build(fx_root, base_dir)
    assert (directory / "config.json").is_file() and not str(directory).startswith("builtin:")
    model = build_model(tiny_model_cfg(directory), tiny_data_cfg(), seed=1)
    assert model.lm.base_model.model.config.model_type == arch
    assert model.target_modules == targets
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
            if p.requires_grad and ".lora_" in n}
    assert lora == set(targets)

    cfg = TrainingConfig(batch_size=6, lr=2e-3, local_epochs=1.0, seed=5)
    steps = local_steps(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                        n_records=len(dataset))
    session = DPSession(noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=cfg.batch_size / len(dataset),
                        expected_batch_size=cfg.batch_size, n_records=len(dataset), seed=7)
    start = get_adapter_arrays(model)
    metrics = train_local(model, dataset, cfg, privacy=session)
    assert metrics["steps"] == steps == session.history.total_steps
    assert session.epsilon(target_delta=1e-5) > 0
    moved = [float(np.abs(a - b).max()) for a, b in zip(start, get_adapter_arrays(model), strict=True)]
    # every exchanged array moves (LoRA A/B on each target, encoders, heads), by at most about the fast-group lr per Adam step
    assert min(moved) > 0 and max(moved) < cfg.lr * cfg.lora_lr_scale * cfg.dp_lr_scale * steps * 1.05
