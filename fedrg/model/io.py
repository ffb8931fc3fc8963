"""Save and load the adapter.

An adapter directory holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: a real peft LoRA adapter
  (``PeftModel.from_pretrained(base, dir)`` loads it);
- ``fedrg_modules.safetensors``: image/genomics encoders, projectors and marker heads;
- ``fedrg_adapter.json``: the model and data config needed to rebuild, plus the manifest hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedrg.config import DataConfig, ModelConfig
from fedrg.errors import ModelError
from fedrg.model.adapter import RadiogenomicsModel, build_model
from fedrg.model.payload import adapter_manifest

FORMAT_VERSION = 2  # 2: radiomic features in the image encoder, two-answer marker head
META_FILE = "fedrg_adapter.json"
MODULES_FILE = "fedrg_modules.safetensors"
MODULE_NAMES = ("image_encoder", "image_proj", "genomics_encoder", "genomics_proj", "marker_head")


def _unwrap(model):
    while hasattr(model, "_module"):
        model = model._module
    return model


def save_adapter(model: RadiogenomicsModel, out_dir: str | Path) -> Path:
    """Write the adapter (peft LoRA + fedrg modules + config) into ``out_dir``."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out, save_embedding_layers=False)
    tensors = {}
    for name in MODULE_NAMES:
        for key, value in getattr(model, name).state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(out / MODULES_FILE), metadata={"format": str(FORMAT_VERSION)})
    manifest = adapter_manifest(model)
    meta = {
        "format": FORMAT_VERSION,
        "model": model.model_cfg.model_dump(mode="json"),
        "data": model.data_cfg.model_dump(mode="json"),
        "target_modules": model.target_modules,
        "manifest": {k: manifest[k] for k in ("numel", "bytes", "sha256")},
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """The ``fedrg_adapter.json`` of an adapter directory (raises ``ModelError``)."""
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        raise ModelError(
            f"{path} is missing: {adapter_dir} is not a fedrg adapter directory "
            "(write one with `fedrg train --out DIR`)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ModelError(
            f"{path}: adapter format {meta.get('format')!r} is not {FORMAT_VERSION} (format 2 "
            "changed the image encoder and marker head); train it again with this fedrg"
        )
    return meta


def load_adapter(adapter_dir: str | Path, *, base: str | None = None) -> RadiogenomicsModel:
    """Rebuild the model from an adapter directory and load its weights.

    Parameters
    ----------
    adapter_dir
        Directory written by :func:`save_adapter`.
    base
        Override ``model.base`` (e.g. the base LM moved); default: the saved value.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    src = Path(adapter_dir)
    meta = read_adapter_meta(src)
    # adapters saved before the marker head's linear paths existed have none
    model_cfg = ModelConfig.model_validate({"linear_marker_paths": False, **meta["model"]})
    if base is not None:
        model_cfg = model_cfg.model_copy(update={"base": base})
    data_cfg = DataConfig.model_validate(meta["data"])
    model = build_model(model_cfg, data_cfg)
    lora_file = src / "adapter_model.safetensors"
    modules_file = src / MODULES_FILE
    for f in (lora_file, modules_file):
        if not f.is_file():
            raise ModelError(f"{f} is missing; re-save the adapter with save_adapter")
    result: Any = set_peft_model_state_dict(model.lm, load_file(str(lora_file)))
    if getattr(result, "unexpected_keys", None):
        raise ModelError(f"{lora_file}: unexpected LoRA keys {result.unexpected_keys[:5]}")
    tensors = load_file(str(modules_file))
    for name in MODULE_NAMES:
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        getattr(model, name).load_state_dict(sub, strict=True)
    manifest = adapter_manifest(model)
    if manifest["sha256"] != meta["manifest"]["sha256"]:
        raise ModelError(
            f"{src}: loaded adapter hash {manifest['sha256'][:12]} differs from the saved "
            f"{meta['manifest']['sha256'][:12]}; the files are corrupt or from another model"
        )
    return model
