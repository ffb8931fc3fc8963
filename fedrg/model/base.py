"""The frozen base language model: the built-in tiny LM, or any local Hugging Face causal LM.

``model.base = "builtin:tiny"`` builds (once, cached) a small Llama-style model with a BPE
tokenizer trained locally on public synthetic report text, gives it a short deterministic
pre-training on that text, and saves it with ``save_pretrained`` into
``cache_dir()/base/<recipe-hash>/``. Every other value is a local directory. Both are then
loaded through the same offline ``from_pretrained`` path: nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fedrg.errors import ModelError
from fedrg.paths import cache_dir

BUILTIN_PREFIX = "builtin:"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that determines the built-in base model (its hash names the cache entry)."""

    name: str = "tiny"
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 256
    corpus_reports: int = 4000
    corpus_seed: int = 1234
    pretrain_steps: int = 300
    pretrain_batch_size: int = 16
    pretrain_seq_len: int = 96
    pretrain_lr: float = 3e-3
    seed: int = 0
    version: int = 1  # bump when the build procedure changes

    def digest(self) -> str:
        """Short SHA-256 of the recipe (the cache directory name)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


BUILTIN_RECIPES: dict[str, BaseRecipe] = {"tiny": BaseRecipe()}


# --------------------------------------------------------------------------- locating


def resolve_base_dir(base: str) -> Path:
    """Return the local directory holding the base LM named by ``model.base``.

    Parameters
    ----------
    base
        ``"builtin:<name>"`` (built and cached on first use) or a local directory.

    Raises
    ------
    ModelError
        If the builtin name is unknown or the directory does not hold a model.
    """
    if base.startswith(BUILTIN_PREFIX):
        name = base[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_RECIPES:
            raise ModelError(
                f"model.base={base!r}: unknown built-in model; use one of "
                f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_RECIPES)} or a local directory"
            )
        return ensure_builtin_base(BUILTIN_RECIPES[name])
    path = Path(base).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.base={base!r}: directory does not exist; set model.base to a local directory "
            "written by save_pretrained (config.json + weights + tokenizer), or to 'builtin:tiny'. "
            "fedrg never downloads models."
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.base={base!r}: {path / 'config.json'} is missing; the directory must be a "
            "Hugging Face model saved with save_pretrained"
        )
    return path


def load_base(base: str) -> tuple[nn.Module, object]:
    """Load the frozen base causal LM and its tokenizer, offline.

    Returns
    -------
    (model, tokenizer)
        ``AutoModelForCausalLM`` in float32 and a fast tokenizer with a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_base_dir(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model.base={base!r}: cannot load a causal LM and tokenizer from {path}: {err}. "
            "Save both with save_pretrained into that directory."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ModelError(f"model.base={base!r}: the tokenizer in {path} has no pad/eos/unk token")
    return model, tokenizer


# --------------------------------------------------------------------------- building


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_builtin_base(recipe: BaseRecipe, root: Path | None = None) -> Path:
    """Return the cached directory of a built-in base, building it first if needed.

    The build happens in a temporary directory next to the target and is renamed into
    place; a file lock keeps two processes from building at once.
    """
    root = Path(root) if root is not None else cache_dir() / "base"
    target = root / f"{recipe.name}-{recipe.digest()}"
    if (target / "fedrg_base.json").is_file():
        return target
    with _file_lock(root / f"{target.name}.lock"):
        if (target / "fedrg_base.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            build_builtin_base(recipe, tmp)
            if target.exists():  # a half-written leftover from an old crash
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corpus(recipe: BaseRecipe) -> list[str]:
    from fedrg.data.reports import generate_report_corpus

    return generate_report_corpus(recipe.corpus_reports, recipe.corpus_seed)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``texts``; return a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _llama_config(recipe: BaseRecipe, vocab_size: int, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate ``<s> report </s>`` streams and cut them into ``seq_len`` blocks."""
    ids: list[int] = []
    for t in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_builtin_base(recipe: BaseRecipe, out_dir: Path) -> dict:
    """Build, pre-train and save a built-in base LM into ``out_dir`` (deterministic).

    Pre-training: next-token prediction on ``recipe.corpus_reports`` synthetic reports from
    :func:`fedrg.data.reports.generate_report_corpus` (public, no patient data), AdamW with
    cosine decay, single thread, fixed seed.
    """
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        texts = _corpus(recipe)
        tokenizer = train_tokenizer(texts, recipe.vocab_size)
        vocab = len(tokenizer)
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(_llama_config(recipe, vocab, tokenizer))
        blocks = _pack(texts, tokenizer, recipe.pretrain_seq_len)
        gen = torch.Generator().manual_seed(recipe.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01)
        steps = recipe.pretrain_steps
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
        )
        model.train()
        losses: list[float] = []
        order = torch.randperm(len(blocks), generator=gen)
        pos = 0
        for _ in range(steps):
            if pos + recipe.pretrain_batch_size > len(order):
                order = torch.randperm(len(blocks), generator=gen)
                pos = 0
            idx = order[pos: pos + recipe.pretrain_batch_size]
            pos += recipe.pretrain_batch_size
            x = blocks[idx]
            out = model(input_ids=x, labels=x)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
        model.eval()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        tail = losses[-20:] if losses else [float("nan")]
        info = {
            "recipe": asdict(recipe),
            "digest": recipe.digest(),
            "vocab_size": vocab,
            "parameters": sum(p.numel() for p in model.parameters()),
            "pretrain_blocks": len(blocks),
            "pretrain_loss_first": losses[0] if losses else None,
            "pretrain_loss_last20": sum(tail) / len(tail),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        (out_dir / "fedrg_base.json").write_text(json.dumps(info, indent=2))
        return info
    finally:
        torch.set_num_threads(threads)


def small_recipe(**changes) -> BaseRecipe:
    """A much smaller recipe (for tests): tiny widths, few pre-training steps."""
    base = BaseRecipe(
        name="test",
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        corpus_reports=300,
        pretrain_steps=20,
        pretrain_batch_size=8,
        pretrain_seq_len=64,
    )
    return replace(base, **changes)
