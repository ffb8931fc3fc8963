"""Public pre-training: the initial global adapter, trained on public synthetic data only.

DP-SGD learns little in a few dozen noisy steps from a random start: the noise grows with the
number of noised parameters, and encoders carry no signal until they are trained. The usual
lever (Yu et al. 2022; Tramer & Boneh 2021) is to start private fine-tuning from weights
trained on *public* data. fedrg's public data is the synthetic generator
(:mod:`fedrg.data.synth`) run with the public seed :data:`fedrg.data.genomics.PUBLIC_SEED`:
no hospital's record enters it, so the initial adapter costs no privacy, and every hospital
and the server can rebuild it (bit for bit on the same machine and software; the test
checks that a second build gives the same bytes).

``model.public_init`` chooses the initial global adapter of a federation (and of
``fedrg train``):

* ``"synthetic"`` (default): pre-train on the public cohorts (:class:`PublicInitRecipe`),
  built once per model/data configuration and cached under ``cache_dir()/public-init/``.
  For the default configuration fedrg ships the built adapter (``fedrg/train/shipped/``,
  with its SHA-256 and how it was built): a cold cache installs it after checking its hash
  instead of spending minutes of CPU on pre-training; ``fedrg public-adapter --verify``
  rebuilds it from the recipe and compares (see :mod:`fedrg.train.shipped`);
* ``"none"``: the seeded random initialisation of :func:`fedrg.model.adapter.build_model`;
* a local adapter directory written by ``save_adapter`` (e.g. your own public pre-training).

Pre-training has two stages: the encoders and marker head on the marker task alone (no LM
forward, so it is cheap and can run many epochs), then everything (LoRA, projectors,
encoders, head) on reports and markers together for a few epochs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fedrg.config import DataConfig, ModelConfig, TrainingConfig
from fedrg.data.schema import RecordDataset
from fedrg.errors import ModelError
from fedrg.paths import cache_dir
from fedrg.train.shipped import ARRAYS_FILE, META_FILE, SHIPPED_DIR, install_shipped, shipped_manifest

if TYPE_CHECKING:  # loads transformers
    from fedrg.model.adapter import RadiogenomicsModel

log = logging.getLogger(__name__)

PUBLIC_INIT_SYNTHETIC = "synthetic"
PUBLIC_INIT_NONE = "none"


@dataclass(frozen=True)
class PublicInitRecipe:
    """Everything (besides the model and data config) that determines the public adapter."""

    hospitals: int = 8
    patients: int = 150
    encoder_epochs: int = 20
    full_epochs: float = 2.0
    batch_size: int = 32
    encoder_lr: float = 2e-3
    seed: int = 0
    version: int = 1  # bump when the procedure changes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_RECIPE = PublicInitRecipe()


def _base_identity(base: str) -> str:
    from fedrg.model.base import BUILTIN_PREFIX, BUILTIN_RECIPES

    if base.startswith(BUILTIN_PREFIX) and base[len(BUILTIN_PREFIX):] in BUILTIN_RECIPES:
        return f"{base}:{BUILTIN_RECIPES[base[len(BUILTIN_PREFIX):]].digest()}"
    from fedrg.model.fingerprint import model_content_hash

    return model_content_hash(base)


#: The training settings pre-training uses (the others, e.g. ``lr`` of federated rounds, do not
#: change the public adapter).
TRAINING_KEYS = ("train_lr", "train_lora_lr", "weight_decay", "max_physical_batch_size")


def cache_key(model_cfg: ModelConfig, data_cfg: DataConfig, *,
              recipe: PublicInitRecipe = DEFAULT_RECIPE,
              training_cfg: TrainingConfig | None = None) -> str:
    """SHA-256 (hex, 16 chars) of everything that determines the public adapter."""
    from fedrg.data.genomics import PUBLIC_SEED
    from fedrg.data.synth import GENERATOR_VERSION

    blob = {
        "recipe": recipe.to_dict(),
        "model": model_cfg.model_dump(mode="json", exclude={"public_init"}),
        "data": data_cfg.model_dump(mode="json", exclude={"synthetic_dir", "synthetic_patients",
                                                          "val_fraction", "split_seed", "world"}),
        "base": _base_identity(model_cfg.base),
        "generator": GENERATOR_VERSION,
        "public_seed": PUBLIC_SEED,
        "training": (training_cfg or TrainingConfig()).model_dump(mode="json", include=set(TRAINING_KEYS)),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _public_dataset(data_cfg: DataConfig, recipe: PublicInitRecipe, root: Path):
    """The public synthetic cohorts (written under ``root``) as one dataset."""
    from fedrg.data.cohort import load_cohort
    from fedrg.data.dataset import CohortDataset
    from fedrg.data.genomics import PUBLIC_SEED
    from fedrg.data.synth import synthesize
    from fedrg.data.worlds import PUBLIC_WORLD

    # always the public world: data.world chooses the simulated hospitals' world, never this
    dirs = synthesize(root, hospitals=recipe.hospitals, patients=recipe.patients, seed=PUBLIC_SEED,
                      data_cfg=data_cfg, world=PUBLIC_WORLD)
    parts = [CohortDataset(load_cohort(d, data_cfg), data_cfg) for d in dirs]
    return torch.utils.data.ConcatDataset(parts)


#: Reports a step of the public pre-training (a short line), e.g. to the console.
Progress = Callable[[str], None]


def _quiet(_step: str) -> None:
    return None


def _every(total: int, times: int = 5) -> int:
    """Report every this many of ``total`` iterations (about ``times`` reports)."""
    return max(1, -(-total // times))


def _train_encoders(model: RadiogenomicsModel, dataset: RecordDataset, recipe: PublicInitRecipe,
                    progress: Progress = _quiet) -> float:
    """Stage 1: encoders + marker head on the marker loss alone (no LM forward)."""
    from fedrg.train.loop import augment_images, collate, withhold_genomics

    parts = [p for n, p in model.named_parameters()
             if p.requires_grad and n.startswith(("image_encoder.", "genomics_encoder.", "marker_head."))]
    full = collate([dataset[i] for i in range(len(dataset))])
    tensors = {k: full[k].float() for k in ("image", "expression", "mutations", "has_genomics",
                                            "markers", "marker_mask")}
    n = len(dataset)
    opt = torch.optim.AdamW(parts, lr=recipe.encoder_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(recipe.seed + 31)
    dropout = float(model.model_cfg.genomics_dropout)
    last = float("nan")
    model.train()
    every = _every(recipe.encoder_epochs)
    for epoch in range(recipe.encoder_epochs):
        if epoch % every == 0:
            progress(f"stage 1 of 2 (encoders and marker head): epoch {epoch + 1} of "
                     f"{recipe.encoder_epochs}")
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            batch: Any = {k: v[idx] for k, v in tensors.items()}
            batch = withhold_genomics(batch, dropout, gen)
            batch = augment_images(batch, gen)
            fused, image_only = model.marker_logits(batch["image"], batch["expression"],
                                                    batch["mutations"], batch["has_genomics"])
            y, mask = batch["markers"], batch["marker_mask"]
            bce = 0.5 * (F.binary_cross_entropy_with_logits(fused, y, reduction="none")
                         + F.binary_cross_entropy_with_logits(image_only, y, reduction="none"))
            loss = ((bce * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(loss.detach())
    return last


def pretrain_public(model: RadiogenomicsModel, data_cfg: DataConfig, training_cfg: TrainingConfig, *,
                    recipe: PublicInitRecipe = DEFAULT_RECIPE, workdir: Path,
                    progress: Progress = _quiet) -> dict[str, Any]:
    """Pre-train ``model`` (a fresh :class:`~fedrg.model.adapter.RadiogenomicsModel`) in place
    on the public synthetic cohorts; returns a summary (losses, patients). ``progress`` is
    told each step (cohorts, then both stages)."""
    from fedrg.train.loop import train_local

    progress(f"synthesising {recipe.hospitals} public cohorts of about {recipe.patients} "
             "patients (public seed)")
    dataset = _public_dataset(data_cfg, recipe, workdir / "cohorts")

    def on_step(step: int, total: int) -> None:
        if step == 1 or step % _every(total) == 0:
            progress(f"stage 2 of 2 (whole adapter, reports and markers): step {step} of {total}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        encoder_loss = _train_encoders(model, dataset, recipe, progress)
        tcfg = training_cfg.model_copy(update={
            "local_epochs": recipe.full_epochs, "batch_size": recipe.batch_size,
            "lr": training_cfg.train_lr,
            "lora_lr_scale": training_cfg.train_lora_lr / training_cfg.train_lr,
            "augment": True, "seed": recipe.seed, "threads": 0})
        full = train_local(model, dataset, tcfg, on_step=on_step)
    return {"patients": len(dataset), "encoder_loss_last": encoder_loss,
            "full_loss_mean": full["loss_mean"], "full_steps": full["steps"]}


def _named_arrays(model: RadiogenomicsModel) -> dict[str, np.ndarray]:
    from fedrg.model.payload import adapter_parameters

    return {name: p.detach().cpu().numpy().copy() for name, p in adapter_parameters(model)}


def _load_into(model: RadiogenomicsModel, arrays: dict[str, np.ndarray], source: str) -> None:
    from fedrg.model.payload import adapter_parameters

    named = adapter_parameters(model)
    missing = [n for n, _ in named if n not in arrays]
    wrong = [n for n, p in named if n in arrays and tuple(arrays[n].shape) != tuple(p.shape)]
    if missing or wrong:
        raise ModelError(
            f"model.public_init={source!r}: the stored adapter does not fit this model "
            f"({len(missing)} parameters missing, e.g. {missing[:2]}; {len(wrong)} of another "
            f"shape, e.g. {wrong[:2]}); use an adapter saved for the same [model] and [data] "
            "settings, or model.public_init='synthetic' / 'none'")
    with torch.no_grad():
        for name, p in named:
            p.copy_(torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)))


def build_public_init(model_cfg: ModelConfig, data_cfg: DataConfig, training_cfg: TrainingConfig,
                      *, recipe: PublicInitRecipe, directory: Path,
                      progress: Progress = _quiet) -> dict[str, Any]:
    """Pre-train the public adapter from ``recipe`` and write it into ``directory`` (which
    must exist); returns the metadata written beside the arrays."""
    from safetensors.numpy import save_file

    from fedrg.model.adapter import build_model

    model = build_model(model_cfg, data_cfg, seed=recipe.seed)
    summary = pretrain_public(model, data_cfg, training_cfg, recipe=recipe, workdir=directory,
                              progress=progress)
    shutil.rmtree(directory / "cohorts", ignore_errors=True)
    save_file(_named_arrays(model), str(directory / ARRAYS_FILE))
    meta = {"recipe": recipe.to_dict(), "summary": summary,
            "key": cache_key(model_cfg, data_cfg, recipe=recipe, training_cfg=training_cfg),
            "source": "built here from the recipe"}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def ensure_public_init(model_cfg: ModelConfig, data_cfg: DataConfig, training_cfg: TrainingConfig,
                       *, recipe: PublicInitRecipe = DEFAULT_RECIPE,
                       root: Path | None = None, progress: Progress = _quiet,
                       shipped: Path | None = None, use_shipped: bool = True) -> Path:
    """The cached directory of the public adapter for this configuration (installed from the
    shipped copy or built if needed; ``progress`` is told each step).

    One public artifact per model/data configuration, like the built-in base model: its
    random start is ``recipe.seed``, not the federation's seed. Built (or installed) in a
    temporary directory and renamed into place under a file lock; a half-built entry is never
    used. Where fedrg ships the artefact for this key (``shipped``, default the package's
    :data:`fedrg.train.shipped.SHIPPED_DIR`) and ``use_shipped``, its SHA-256 is checked and it
    is installed instead of rebuilt; a shipped file that fails the check is refused
    (:class:`~fedrg.errors.ModelError`), never installed.
    """
    from fedrg.model.base import _file_lock

    root = Path(root) if root is not None else cache_dir() / "public-init"
    root.mkdir(parents=True, exist_ok=True)
    target = root / cache_key(model_cfg, data_cfg, recipe=recipe, training_cfg=training_cfg)
    if (target / META_FILE).is_file():
        return target
    with _file_lock(root / f"{target.name}.lock"):
        if (target / META_FILE).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            manifest = (shipped_manifest(target.name, shipped if shipped is not None else SHIPPED_DIR)
                        if use_shipped else None)
            if manifest is not None:
                progress(f"installing the shipped public adapter {target.name} "
                         f"(sha256 {manifest.sha256[:12]}...; built by: {manifest.built_by})")
                install_shipped(manifest, tmp)
            else:
                build_public_init(model_cfg, data_cfg, training_cfg, recipe=recipe, directory=tmp,
                                  progress=progress)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def apply_public_init(model: RadiogenomicsModel, model_cfg: ModelConfig, data_cfg: DataConfig,
                      training_cfg: TrainingConfig, *, recipe: PublicInitRecipe = DEFAULT_RECIPE,
                      root: Path | None = None) -> str:
    """Set ``model``'s adapter to the initial weights ``model.public_init`` names.

    Parameters
    ----------
    model
        A freshly built :class:`~fedrg.model.adapter.RadiogenomicsModel`.
    model_cfg, data_cfg, training_cfg
        The configuration it was built from.
    Returns
    -------
    str
        What was applied: ``"none"``, ``"synthetic:<key>"`` or the adapter directory.

    Raises
    ------
    ModelError
        A directory that holds no adapter, or one that does not fit the model.
    """
    choice = model_cfg.public_init
    if choice == PUBLIC_INIT_NONE:
        return PUBLIC_INIT_NONE
    if choice == PUBLIC_INIT_SYNTHETIC:
        from safetensors.numpy import load_file

        directory = ensure_public_init(model_cfg, data_cfg, training_cfg, recipe=recipe, root=root)
        _load_into(model, load_file(str(directory / ARRAYS_FILE)), choice)
        return f"{PUBLIC_INIT_SYNTHETIC}:{directory.name}"
    from fedrg.model.io import META_FILE as ADAPTER_META
    from fedrg.model.io import load_adapter

    path = Path(choice).expanduser()
    if not (path / ADAPTER_META).is_file():
        raise ModelError(
            f"model.public_init={choice!r}: {path / ADAPTER_META} not found; give 'synthetic', "
            "'none' or a local adapter directory written by fedrg (save_adapter / fedrg train)")
    loaded = load_adapter(path, base=model_cfg.base)
    _load_into(model, _named_arrays(loaded), choice)
    return str(path)
