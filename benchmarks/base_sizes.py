"""Step time, peak memory and payload size of the adapter on bases of growing size, as JSON.

Bases are Llama-shaped causal LMs with **random weights built from configs** (no download),
saved with ``save_pretrained`` next to the built-in tokenizer and loaded through the same
offline path as any local base (``model.base = DIR``):

* ``0.5M``: the built-in ``builtin:tiny`` shape (hidden 128, 2 layers, vocab 643 of the tokenizer)
* ``25M``: hidden 512, 6 layers, 8 heads, MLP 1536, vocab 8192 (tied embeddings)
* ``125M``: hidden 768, 12 layers, 12 heads, MLP 2560, vocab 32000 (tied), GPT-2-small sized

The vocabularies beyond the tokenizer's 643 tokens are unused rows, kept so the embedding
and LM-head cost is that of a real vocabulary. Each (size, DP on/off) runs in its own child
process (so peak memory is that run's): build the full adapter (LoRA rank 8 on every
projection, encoders, heads), ``--warmup`` untimed steps, then ``--steps`` timed steps on one
batch of ``--batch`` real synthetic patients. DP on = ``DPSession`` (Opacus, ``ew`` mode,
per-sample clipping + noise); off = the loop's ``PlainSGD``.

Reported per run: median CPU (process) time and wall time per step, peak RSS of the child
(``ru_maxrss``) and its growth during training over the RSS after building the model,
parameter counts, and the payload: bytes of the float32 adapter arrays a hospital sends
(before secure-aggregation quantisation), i.e. ``4 x trainable``.

Usage: ``python benchmarks/base_sizes.py [--sizes 0.5M,25M,125M] [--steps 3] [--batch 8]``
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    "0.5M": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 352, "vocab_size": 0},
    "25M": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
            "intermediate_size": 1536, "vocab_size": 8192},
    "125M": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 2560, "vocab_size": 32000},
}


def base_config(size: str, tok: Any) -> Any:
    """The ``LlamaConfig`` of ``size`` for tokenizer ``tok`` (vocab at least the tokenizer's)."""
    from transformers import LlamaConfig

    shape = dict(SIZES[size])
    shape["vocab_size"] = max(shape["vocab_size"], len(tok))
    return LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"],
                       max_position_embeddings=256, tie_word_embeddings=True, attention_dropout=0.0,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)


def build_base(size: str, tokenizer_dir: Path, out: Path) -> Path:
    """Save a random-weight Llama of ``size`` with the built-in tokenizer into ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    cfg = base_config(size, tok)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One (base, dp) run inside this process; prints its JSON."""
    import torch

    from fedrg.config import ExperimentConfig
    from fedrg.model.adapter import build_model
    from fedrg.model.payload import get_adapter_arrays
    from fedrg.privacy.dpsgd import DPSession
    from fedrg.train.loop import PlainSGD

    torch.set_num_threads(args.threads)
    cfg = ExperimentConfig()
    cfg.model.base = args.base
    cfg.model.max_report_tokens = args.report_tokens
    batch = torch.load(args.batch_file, weights_only=False)
    t0 = time.perf_counter()
    model = build_model(cfg.model, cfg.data, seed=0)
    build_s = time.perf_counter() - t0
    counts = model.parameter_counts()
    payload = sum(a.nbytes for a in get_adapter_arrays(model))
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.training.lr)
    n = len(batch["report"])
    seam: Any = (DPSession(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1,
                           expected_batch_size=float(n), grad_sample_mode="ew", seed=0)
                 if args.dp else PlainSGD(batch_size=n, seed=0))
    model.train()
    seam.attach(model, opt)
    cpu, wall = [], []
    for k in range(args.warmup + args.steps):
        c0, w0 = time.process_time(), time.perf_counter()
        seam.step(batch)
        if k >= args.warmup:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    seam.cleanup()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"total_params": counts["total"], "trainable_params": counts["trainable"],
            "payload_bytes": payload, "build_s": round(build_s, 2),
            "median_cpu_step_s": round(statistics.median(cpu), 3),
            "median_wall_step_s": round(statistics.median(wall), 3),
            "peak_rss_mib": round(peak, 1), "rss_after_build_mib": round(rss_built, 1),
            "training_rss_growth_mib": round(peak - rss_built, 1)}


def make_batch(batch: int, report_tokens: int, workdir: Path) -> Path:
    """``batch`` synthetic patients through the real cohort reader, saved for the children."""
    import torch

    from fedrg.config import ExperimentConfig
    from fedrg.data.cohort import load_cohort
    from fedrg.data.dataset import CohortDataset, collate_samples
    from fedrg.data.synth import synthesize

    cfg = ExperimentConfig()
    [hospital] = synthesize(workdir / "cohort", hospitals=1, patients=max(8, batch * 2), seed=0,
                            data_cfg=cfg.data)
    ds = CohortDataset(load_cohort(hospital, cfg.data), cfg.data)
    path = workdir / "batch.pt"
    torch.save(collate_samples([ds[i] for i in range(batch)]), path)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fedrg.model.base import resolve_base_dir

    tokenizer_dir = resolve_base_dir("builtin:tiny")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="base-sizes-") as tmp:
        work = Path(tmp)
        batch_file = make_batch(args.batch, args.report_tokens, work)
        for size in args.sizes.split(","):
            base = build_base(size, tokenizer_dir, work / f"base-{size}")
            for dp in (False, True):
                cmd = [sys.executable, __file__, "--child", "--base", str(base),
                       "--batch-file", str(batch_file), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads),
                       "--report-tokens", str(args.report_tokens)] + (["--dp"] if dp else [])
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if out.returncode != 0:
                    raise SystemExit(f"{size} dp={dp} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results.append({"size": size, "dp": dp, **row})
                print(f"{size} dp={dp}: {row}", file=sys.stderr)
    by = {(r["size"], r["dp"]): r for r in results}
    for r in results:
        if r["dp"]:
            off = by[(r["size"], False)]
            r["dp_cpu_ratio"] = round(r["median_cpu_step_s"] / off["median_cpu_step_s"], 3)
    return {"benchmark": "base_sizes", "batch": args.batch, "report_tokens": args.report_tokens,
            "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
            "grad_sample_mode": "ew", "lora_rank": 8, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "runs": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.5M,25M,125M", help=f"comma-separated of {', '.join(SIZES)}")
    ap.add_argument("--batch", type=int, default=8, help="patients per step (default 8)")
    ap.add_argument("--report-tokens", type=int, default=64, help="model.max_report_tokens")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per child run")
    ap.add_argument("--out", default="", help="also write the JSON to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", default="", help=argparse.SUPPRESS)
    ap.add_argument("--batch-file", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        ap.error(f"--sizes: unknown {', '.join(unknown)}; use {', '.join(SIZES)}")
    text = json.dumps(run(args), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
