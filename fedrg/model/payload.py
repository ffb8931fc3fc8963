"""Adapter state <-> an ordered list of arrays plus a manifest (what the federation exchanges).

The order is the model's ``named_parameters`` order restricted to trainable parameters;
an Opacus ``GradSampleModule`` wrapper is looked through (its ``_module.`` prefix dropped).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from fedrg.errors import ModelError


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "_module") and isinstance(model._module, nn.Module):
        model = model._module
    return model


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the trainable (exchanged) parameters, in a fixed order."""
    return [(n, p) for n, p in _unwrap(model).named_parameters() if p.requires_grad]


def get_adapter_arrays(model: nn.Module) -> list[np.ndarray]:
    """Copies of the trainable parameters as float32 NumPy arrays, in manifest order."""
    return [p.detach().cpu().numpy().copy() for _, p in adapter_parameters(model)]


def set_adapter_arrays(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load arrays (manifest order) into the trainable parameters, in place.

    Raises
    ------
    ModelError
        If the number of arrays or any shape differs from the model's adapter.
    """
    params = adapter_parameters(model)
    if len(arrays) != len(params):
        raise ModelError(
            f"adapter payload has {len(arrays)} arrays but the model expects {len(params)}; "
            "the sender and receiver must use the same model and data config"
        )
    with torch.no_grad():
        for (name, p), a in zip(params, arrays, strict=True):
            a = np.asarray(a)
            if tuple(a.shape) != tuple(p.shape):
                raise ModelError(
                    f"adapter payload array {name!r} has shape {tuple(a.shape)}, expected "
                    f"{tuple(p.shape)}; the sender and receiver must use the same config"
                )
            p.copy_(torch.from_numpy(np.ascontiguousarray(a)).to(p.device, p.dtype))


def arrays_sha256(names: list[str], arrays: list[np.ndarray]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of ``arrays`` (order matters)."""
    h = hashlib.sha256()
    for name, a in zip(names, arrays, strict=True):
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{a.shape}|{a.dtype.str}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def adapter_manifest(model: nn.Module) -> dict:
    """Names, shapes, dtypes, element/byte totals and a content hash of the adapter."""
    params = adapter_parameters(model)
    names = [n for n, _ in params]
    arrays = get_adapter_arrays(model)
    return {
        "names": names,
        "shapes": [list(a.shape) for a in arrays],
        "dtypes": [a.dtype.str for a in arrays],
        "numel": int(sum(a.size for a in arrays)),
        "bytes": int(sum(a.nbytes for a in arrays)),
        "sha256": arrays_sha256(names, arrays),
    }
