"""Cost and utility of the public initial adapter (``fedrg.train.public_init``).

Builds the public adapter for the default configuration with a given recipe (in a fresh
directory, never the cache), times each step, and scores it on held-out patients of the
public world (3 cohorts from another seed, never seen in pre-training): AUROC per marker
from the image alone and from image + genomics, and the mean held-out loss (reports and
markers). Prints JSON.

    python benchmarks/public_init_cost.py                       # the default recipe
    python benchmarks/public_init_cost.py --full-epochs 1 --patients 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build once with the recipe the arguments give and print the JSON result."""
    from fedrg.runtime import apply_offline_env

    apply_offline_env()
    import torch

    from fedrg.config import ExperimentConfig
    from fedrg.data.cohort import load_cohort
    from fedrg.data.dataset import CohortDataset
    from fedrg.data.synth import synthesize
    from fedrg.data.worlds import PUBLIC_WORLD
    from fedrg.model.adapter import build_model
    from fedrg.model.base import load_base
    from fedrg.train.evaluate import evaluate
    from fedrg.train.public_init import ARRAYS_FILE, DEFAULT_RECIPE, ensure_public_init

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in ("hospitals", "patients", "encoder_epochs", "batch_size"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(DEFAULT_RECIPE, field))
    parser.add_argument("--full-epochs", type=float, default=DEFAULT_RECIPE.full_epochs)
    parser.add_argument("--held-out-seed", type=int, default=4242)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = replace(DEFAULT_RECIPE, hospitals=args.hospitals, patients=args.patients,
                     encoder_epochs=args.encoder_epochs, full_epochs=args.full_epochs,
                     batch_size=args.batch_size)
    cfg = ExperimentConfig()
    load_base(cfg.model.base)
    steps: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        directory = ensure_public_init(cfg.model, cfg.data, cfg.training, recipe=recipe,
                                       root=Path(tmp) / "public-init",
                                       progress=lambda s: steps.append((time.perf_counter() - t0, s)))
        seconds = time.perf_counter() - t0
        from safetensors.numpy import load_file

        from fedrg.train.public_init import _load_into

        model = build_model(cfg.model, cfg.data, seed=recipe.seed)
        _load_into(model, load_file(str(directory / ARRAYS_FILE)), "benchmark")
        held = synthesize(Path(tmp) / "held-out", hospitals=3, patients=160, seed=args.held_out_seed,
                          data_cfg=cfg.data, world=PUBLIC_WORLD)
        ds = torch.utils.data.ConcatDataset([CohortDataset(load_cohort(d, cfg.data), cfg.data) for d in held])
        scores = evaluate(model, ds, generate=False)
    result = {"recipe": recipe.to_dict(), "build_seconds": round(seconds, 1),
              "steps": [{"at_s": round(t, 1), "step": s} for t, s in steps],
              "held_out": {"n": scores["n"], "loss": scores["loss"],
                           "auroc_image": scores["auroc"],
                           "auroc_multimodal": scores["auroc_multimodal"]},
              "torch_threads": torch.get_num_threads()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    main()
