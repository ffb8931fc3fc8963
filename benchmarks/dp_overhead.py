"""DP-SGD overhead per Opacus grad-sample mode vs the non-private step, as JSON.

One process, one model configuration (the real adapter: LoRA on the ``--base`` LM, default
``builtin:tiny``, with image/genomics encoders and marker heads), one batch of ``--batch``
real synthetic patients (written to a temporary cohort and read back through
``CohortDataset``). Each variant gets its own identical copy of the model (Opacus wraps a
module once); steps of the variants are interleaved round-robin, in a fresh random order
each repetition, so drift in machine load hits every variant alike.

* ``non_dp``: the loop's non-private seam (``fedrg.train.loop.PlainSGD.step``: mean loss,
  one backward, AdamW step).
* ``hooks`` / ``functorch`` / ``ew`` / ``ghost`` / ``bk``: ``fedrg.privacy.dpsgd.DPSession.step``
  (per-sample gradients, clipping, noise, accountant step) with AdamW, on the parameters
  DP training really trains: ``privacy.frozen_under_dp`` (the image CNN's convolutions) is
  frozen, as ``train_local`` does under DP, and group-wise clipping follows
  ``privacy.report_clip_share`` (flat in ghost mode, which does not support groups). These
  are the *default* mode figures (``default_dp_mode`` is the config's mode).
* ``ew_all_trainable`` / ``bk_all_trainable``: ``ew`` / ``bk`` (book-keeping clipping,
  ``fedrg.privacy.bookkeeping``) with every adapter parameter trained (nothing frozen), the
  *like-for-like* cost against ``non_dp``, which trains every parameter too
  (``like_for_like``: mode -> ratio).

Reported per variant: the median and quartiles of the step's **CPU time** (process time;
with ``--threads 1`` that is the step's compute, steady even on a shared, loaded machine)
over ``--reps`` repetitions after ``--warmup``, its ratio to ``non_dp``'s median, the
median wall-clock time and its ratio (affected by other load), and the peak torch CPU memory
(tensor allocations, from the PyTorch profiler's memory timeline) during one extra step,
above what was allocated before that step.

Usage: ``python benchmarks/dp_overhead.py [--base builtin:tiny] [--batch 16] [--reps 20]
[--variants non_dp,ew,bk,ew_all_trainable,bk_all_trainable]`` (``--variants``: a subset,
``non_dp`` always included; default every variant).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedrg.config import ExperimentConfig
from fedrg.data.cohort import load_cohort
from fedrg.data.dataset import CohortDataset, collate_samples
from fedrg.data.synth import synthesize
from fedrg.model.adapter import build_model
from fedrg.privacy.dpsgd import GRAD_SAMPLE_MODES, DPSession, report_clip_groups
from fedrg.train.loop import PlainSGD, freeze

ALL_TRAINABLE = "_all_trainable"
LIKE_FOR_LIKE = ("ew", "bk")  # modes also measured with every parameter trained
VARIANTS = ("non_dp", *GRAD_SAMPLE_MODES, *(m + ALL_TRAINABLE for m in LIKE_FOR_LIKE))


def make_batch(cfg: ExperimentConfig, batch: int, workdir: Path) -> dict[str, Any]:
    """``batch`` synthetic patients, through the real cohort reader and collation."""
    [hospital] = synthesize(workdir, hospitals=1, patients=max(8, batch * 2), seed=0,
                            data_cfg=cfg.data)
    ds = CohortDataset(load_cohort(hospital, cfg.data), cfg.data)
    if len(ds) < batch:
        raise SystemExit(f"synthetic cohort has {len(ds)} < --batch {batch} patients")
    return collate_samples([ds[i] for i in range(batch)])


def make_stepper(variant: str, cfg: ExperimentConfig, batch_size: int) -> tuple[Callable, Any]:
    """A fresh model + AdamW + seam for one variant; returns ``(step(batch), seam)``."""
    model = build_model(cfg.model, cfg.data, seed=0)
    like_for_like = variant.endswith(ALL_TRAINABLE)
    if variant != "non_dp" and not like_for_like:  # as DP training runs: train_local(frozen=...)
        freeze(model, cfg.privacy.frozen_under_dp)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
    if variant == "non_dp":
        seam: Any = PlainSGD(batch_size=batch_size, seed=0)
    else:
        mode = variant.removesuffix(ALL_TRAINABLE)
        seam = DPSession(noise_multiplier=1.0, max_grad_norm=cfg.privacy.max_grad_norm,
                         sample_rate=0.1, expected_batch_size=float(batch_size),
                         grad_sample_mode=mode, seed=0,
                         clip_groups=[] if mode == "ghost" else report_clip_groups(cfg.privacy))
    model.train()
    seam.attach(model, opt)
    return seam.step, seam


def peak_step_memory(step: Callable, batch: dict[str, Any]) -> float | None:
    """Peak torch CPU tensor memory (MiB) during one step, above the level at its start."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                     record_shapes=True, with_stack=True) as prof:
            step(batch)
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
        if not sizes:
            return None
        totals = [sum(s) for s in sizes]
        return (max(totals) - totals[0]) / 2**20
    except Exception as err:  # private profiler API: report, don't fail the benchmark
        print(f"memory profile unavailable: {err}", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cfg = ExperimentConfig()
    cfg.model.base = args.base
    cfg.model.max_report_tokens = args.report_tokens
    with tempfile.TemporaryDirectory(prefix="dp-overhead-") as tmp:
        batch = make_batch(cfg, args.batch, Path(tmp))
    chosen = [v for v in VARIANTS if v == "non_dp" or v in args.variants]
    steppers = {v: make_stepper(v, cfg, args.batch) for v in chosen}
    probe = steppers["non_dp"][1].model
    counts = probe.parameter_counts()
    wall: dict[str, list[float]] = {v: [] for v in chosen}
    cpu: dict[str, list[float]] = {v: [] for v in chosen}
    order = list(chosen)
    rng = random.Random(0)
    for rep in range(args.warmup + args.reps):
        rng.shuffle(order)
        for v in order:
            step = steppers[v][0]
            c0, t0 = time.process_time(), time.perf_counter()
            step(batch)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rep >= args.warmup:
                wall[v].append(dt)
                cpu[v].append(dc)
    memory = {v: peak_step_memory(steppers[v][0], batch) for v in chosen}
    for _step, seam in steppers.values():
        seam.cleanup()
    base_cpu = statistics.median(cpu["non_dp"])
    base_wall = statistics.median(wall["non_dp"])
    variants: dict[str, Any] = {}
    for v in chosen:
        q = statistics.quantiles(cpu[v], n=4)
        variants[v] = {
            "median_step_s": round(statistics.median(cpu[v]), 5),
            "p25_step_s": round(q[0], 5),
            "p75_step_s": round(q[2], 5),
            "ratio_vs_non_dp": round(statistics.median(cpu[v]) / base_cpu, 3),
            "median_wall_step_s": round(statistics.median(wall[v]), 5),
            "wall_ratio_vs_non_dp": round(statistics.median(wall[v]) / base_wall, 3),
            "peak_step_memory_mib": None if memory[v] is None else round(memory[v], 2),
        }
        if memory[v] is not None and memory["non_dp"]:
            variants[v]["memory_ratio_vs_non_dp"] = round(memory[v] / memory["non_dp"], 3)
    modes = [m for m in GRAD_SAMPLE_MODES if m in variants]
    fastest = min(modes, key=lambda m: variants[m]["median_step_s"]) if modes else None
    default_mode = cfg.privacy.grad_sample_mode
    like = {m: variants[m + ALL_TRAINABLE]["ratio_vs_non_dp"]
            for m in LIKE_FOR_LIKE if m + ALL_TRAINABLE in variants}
    return {
        "benchmark": "dp_overhead",
        "model": {"base": args.base, "trainable_params": counts["trainable"],
                  "total_params": counts["total"], "report_tokens": args.report_tokens,
                  "image_shape": cfg.data.image_shape},
        "batch": args.batch,
        "reps": args.reps,
        "warmup": args.warmup,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "variants": variants,
        "fastest_dp_mode": fastest,
        "fastest_dp_ratio": variants[fastest]["ratio_vs_non_dp"] if fastest else None,
        "default_dp_mode": default_mode,
        "default_dp_ratio": variants.get(default_mode, {}).get("ratio_vs_non_dp"),
        "fastest_is_default": fastest == default_mode,
        "like_for_like": like,
        "all_trainable_ew_ratio": like.get("ew"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="builtin:tiny", help="model.base (default builtin:tiny)")
    ap.add_argument("--batch", type=int, default=16, help="examples in the batch (default 16)")
    ap.add_argument("--report-tokens", type=int, default=64, help="model.max_report_tokens")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--out", default="", help="also write the JSON to this file")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
