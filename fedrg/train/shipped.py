"""The public adapter fedrg ships for its default configuration, and how it is checked.

Pre-training the public adapter (:mod:`fedrg.train.public_init`) costs minutes of CPU, which
used to make a first ``fedrg simulate`` on an empty cache take several times a warm one. For
the default configuration the built adapter is shipped in ``shipped_adapters/`` as
``<key>.safetensors`` beside ``<key>.json``, a manifest with the cache key, the file's SHA-256,
the recipe, the build summary and what built it. It contains only weights learnt from the
public synthetic cohorts (no hospital's record), so shipping it changes nothing about privacy.

* Installing (:func:`install_shipped`) checks the SHA-256 against the manifest and refuses a
  file that does not match; nothing is written to the cache then.
* Rebuilding (:func:`compare_with_shipped`, ``fedrg public-adapter --verify``) trains the
  adapter again from the recipe and compares it tensor by tensor with the shipped one.
  On the same machine and software the bytes are equal; another CPU or torch build may give
  float differences, which the comparison reports (largest absolute difference) instead of
  hiding.
* :func:`ship` writes a built adapter and its manifest into ``shipped_adapters/`` (for
  maintainers, after a change of the defaults; ``tests/test_public_init_shipped.py`` fails
  while the shipped key differs from the default configuration's key).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrg.errors import ModelError
from fedrg.files import file_sha256

#: The files of a public adapter's cache entry (public_init.py builds them).
ARRAYS_FILE = "public_init.safetensors"
META_FILE = "public_init.json"
#: Where the shipped public adapters live (package data).
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_adapters"
ARRAYS_SUFFIX = ".safetensors"
MANIFEST_SUFFIX = ".json"
REBUILD_HINT = "rebuild it from the recipe with `fedrg public-adapter --rebuild`, or reinstall fedrg"


@dataclass(frozen=True)
class ShippedAdapter:
    """A shipped public adapter: its files and what its manifest promises."""

    key: str
    arrays: Path
    manifest: Path
    sha256: str
    built_by: str
    meta: dict[str, Any]


def shipped_manifest(key: str, directory: Path = SHIPPED_DIR) -> ShippedAdapter | None:
    """The shipped adapter for cache key ``key`` in ``directory``, or None if none is shipped.

    Raises
    ------
    ModelError
        A manifest that cannot be read, names another key, or whose arrays file is missing.
    """
    manifest = Path(directory) / f"{key}{MANIFEST_SUFFIX}"
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text())
        sha, named_key, built_by = meta["sha256"], meta["key"], meta["built_by"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"shipped public adapter manifest {manifest}: cannot be read ({err}); "
                         f"{REBUILD_HINT}") from err
    if named_key != key:
        raise ModelError(f"shipped public adapter manifest {manifest}: names key {named_key!r}, "
                         f"not {key!r}; {REBUILD_HINT}")
    arrays = manifest.with_suffix(ARRAYS_SUFFIX)
    if not arrays.is_file():
        raise ModelError(f"shipped public adapter {arrays}: missing beside its manifest; "
                         f"{REBUILD_HINT}")
    return ShippedAdapter(key=key, arrays=arrays, manifest=manifest, sha256=str(sha),
                          built_by=str(built_by), meta=meta)


def install_shipped(shipped: ShippedAdapter, directory: Path) -> dict[str, Any]:
    """Copy the shipped adapter into ``directory`` (a cache entry being built) after checking
    its SHA-256; returns the metadata written there.

    Raises
    ------
    ModelError
        The file's SHA-256 differs from the manifest's (nothing is written then).
    """
    data = shipped.arrays.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != shipped.sha256:
        raise ModelError(
            f"shipped public adapter {shipped.arrays}: SHA-256 {actual} but its manifest "
            f"{shipped.manifest} says {shipped.sha256}; the file was altered or damaged, and was "
            f"not installed; {REBUILD_HINT}")
    (directory / ARRAYS_FILE).write_bytes(data)
    meta = {"recipe": shipped.meta.get("recipe"), "summary": shipped.meta.get("summary"),
            "key": shipped.key, "source": "shipped with fedrg (SHA-256 checked)",
            "sha256": actual, "built_by": shipped.built_by}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def describe_build() -> str:
    """What builds an adapter here: fedrg, torch, Python and platform versions."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        fedrg_version = version("fedrg")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        fedrg_version = "source tree"
    return (f"fedrg {fedrg_version}, torch {torch.__version__}, python {platform.python_version()}, "
            f"{platform.machine()} {platform.system()}")


def ship(built: Path, directory: Path = SHIPPED_DIR) -> ShippedAdapter:
    """Write the adapter built in cache entry ``built`` and its manifest into ``directory``."""
    meta = json.loads((built / META_FILE).read_text())
    key = meta["key"]
    directory.mkdir(parents=True, exist_ok=True)
    arrays = directory / f"{key}{ARRAYS_SUFFIX}"
    shutil.copyfile(built / ARRAYS_FILE, arrays)
    manifest = {"key": key, "sha256": file_sha256(arrays), "bytes": arrays.stat().st_size,
                "built_by": describe_build(), "recipe": meta.get("recipe"),
                "summary": meta.get("summary"),
                "how": "fedrg public-adapter --rebuild --ship (pre-training on the public "
                       "synthetic cohorts only; no hospital data)"}
    (directory / f"{key}{MANIFEST_SUFFIX}").write_text(json.dumps(manifest, indent=1) + "\n")
    found = shipped_manifest(key, directory)
    assert found is not None
    return found


def compare_with_shipped(rebuilt: Path, shipped: ShippedAdapter) -> dict[str, Any]:
    """Compare a rebuilt cache entry with the shipped adapter, tensor by tensor.

    Returns
    -------
    dict
        ``identical`` (bytes equal), ``same_tensors`` (same names and shapes),
        ``max_abs_diff`` (largest absolute difference over all values), ``tensors``.
    """
    import numpy as np
    from safetensors.numpy import load_file

    new = load_file(str(rebuilt / ARRAYS_FILE))
    old = load_file(str(shipped.arrays))
    same = set(new) == set(old) and all(new[k].shape == old[k].shape for k in new)
    diff = (max(float(np.max(np.abs(new[k].astype(np.float64) - old[k].astype(np.float64)),
                             initial=0.0)) for k in new) if same and new else None)
    return {"identical": (rebuilt / ARRAYS_FILE).read_bytes() == shipped.arrays.read_bytes(),
            "same_tensors": same, "max_abs_diff": diff, "tensors": len(new),
            "shipped_sha256": shipped.sha256, "rebuilt_sha256": file_sha256(rebuilt / ARRAYS_FILE),
            "shipped_built_by": shipped.built_by, "rebuilt_by": describe_build()}
