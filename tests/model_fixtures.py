"""Shared, idempotent builders for the model/train tests (files on disk, built once).

Test modules wrap these in session-scoped fixtures; each builder returns at once when its
output already exists, so several modules share one build per test session.
"""

from __future__ import annotations

from pathlib import Path

from fedrg.config import DataConfig, ModelConfig
from fedrg.model.base import ensure_builtin_base, small_recipe

TINY_IMAGE = [32, 32]


def tiny_data_cfg(**changes) -> DataConfig:
    """Default markers/panel with small 2D images."""
    values = {"image_shape": list(TINY_IMAGE)}
    values.update(changes)
    return DataConfig(**values)


def tiny_model_cfg(base_dir: Path, **changes) -> ModelConfig:
    """A small adapter on the tiny test base."""
    values = {"base": str(base_dir), "encoder_width": 16, "lora_rank": 4, "max_report_tokens": 24,
              "public_init": "none"}
    values.update(changes)
    return ModelConfig(**values)


def tiny_base(root: Path) -> Path:
    """A 2-layer, 32-wide Llama base with a BPE tokenizer, pre-trained for 20 steps."""
    return ensure_builtin_base(small_recipe(), root=Path(root) / "bases")


def tiny_cohort(root: Path, *, patients: int = 24, seed: int = 3) -> Path:
    """One synthetic hospital (real files on disk)."""
    from fedrg.data.synth import synthesize

    out = Path(root) / f"cohort-{patients}-{seed}"
    target = out / "hospital-1"
    if not (target / "manifest.csv").is_file():
        synthesize(out, hospitals=1, patients=patients, seed=seed)
    return target


def gpt2_base(root: Path, tokenizer_dir: Path) -> Path:
    """A tiny random GPT-2 (``c_attn``/``c_proj``/``c_fc`` layers) saved with save_pretrained."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = Path(root) / "gpt2-tiny"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
