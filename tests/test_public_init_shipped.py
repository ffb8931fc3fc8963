"""The shipped public adapter: installed only after its SHA-256 checks, rebuilt and compared
on demand, and kept in step with the default configuration."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from model_fixtures import tiny_data_cfg, tiny_model_cfg

from fedrg.config import ExperimentConfig, TrainingConfig
from fedrg.errors import ModelError
from fedrg.train.public_init import (
    ARRAYS_FILE,
    DEFAULT_RECIPE,
    META_FILE,
    PublicInitRecipe,
    cache_key,
    ensure_public_init,
)
from fedrg.train.shipped import SHIPPED_DIR, compare_with_shipped, ship, shipped_manifest

TINY = PublicInitRecipe(hospitals=2, patients=16, encoder_epochs=1, full_epochs=0.25,
                        batch_size=16)


def _cfgs(base_dir):
    return tiny_model_cfg(base_dir, public_init="synthetic"), tiny_data_cfg(), TrainingConfig()


@pytest.fixture(scope="module")
def tiny_shipped(base_dir, tmp_path_factory):
    """A tiny adapter built from TINY and shipped into a folder of its own."""
    mcfg, dcfg, tcfg = _cfgs(base_dir)
    built = ensure_public_init(mcfg, dcfg, tcfg, recipe=TINY,
                               root=tmp_path_factory.mktemp("built"), use_shipped=False)
    folder = tmp_path_factory.mktemp("shipped")
    return ship(built, folder), built, folder


def test_the_default_configuration_has_its_adapter_shipped() -> None:
    cfg = ExperimentConfig()
    key = cache_key(cfg.model, cfg.data, training_cfg=cfg.training)
    shipped = shipped_manifest(key)
    assert shipped is not None, (
        f"no shipped public adapter for the default configuration's key {key}: the defaults "
        "changed; run `FEDRG_CACHE=$(mktemp -d) fedrg public-adapter --rebuild --ship` and "
        f"remove the old files from {SHIPPED_DIR}")
    assert shipped.meta["recipe"] == DEFAULT_RECIPE.to_dict()
    import hashlib
    assert hashlib.sha256(shipped.arrays.read_bytes()).hexdigest() == shipped.sha256
    # only the default's adapter is shipped (a stale one would be dead weight in the package)
    assert sorted(p.name for p in SHIPPED_DIR.iterdir()) == sorted(
        [shipped.arrays.name, shipped.manifest.name])


def test_a_cold_cache_installs_the_shipped_copy_without_training(base_dir, tiny_shipped, tmp_path) -> None:
    shipped, built, folder = tiny_shipped
    mcfg, dcfg, tcfg = _cfgs(base_dir)
    said: list[str] = []
    directory = ensure_public_init(mcfg, dcfg, tcfg, recipe=TINY, root=tmp_path, shipped=folder,
                                   progress=said.append)
    assert said and said[0].startswith(f"installing the shipped public adapter {shipped.key}")
    assert not any(s.startswith("synthesising") for s in said)  # nothing was pre-trained
    assert (directory / ARRAYS_FILE).read_bytes() == (built / ARRAYS_FILE).read_bytes()
    meta = json.loads((directory / META_FILE).read_text())
    assert meta["source"].startswith("shipped") and meta["sha256"] == shipped.sha256


def test_an_altered_shipped_file_is_refused_and_nothing_is_cached(base_dir, tiny_shipped, tmp_path) -> None:
    shipped, _built, _folder = tiny_shipped
    altered = tmp_path / "altered"
    altered.mkdir()
    for path in (shipped.arrays, shipped.manifest):
        (altered / path.name).write_bytes(path.read_bytes())
    data = bytearray((altered / shipped.arrays.name).read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    (altered / shipped.arrays.name).write_bytes(bytes(data))
    mcfg, dcfg, tcfg = _cfgs(base_dir)
    root = tmp_path / "cache"
    with pytest.raises(ModelError, match=r"SHA-256 .* says .*not installed.*--rebuild") as err:
        ensure_public_init(mcfg, dcfg, tcfg, recipe=TINY, root=root, shipped=altered)
    assert str(altered / shipped.arrays.name) in str(err.value)
    assert not (root / shipped.key).exists()
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


def test_a_manifest_for_another_key_is_refused(tiny_shipped, tmp_path) -> None:
    shipped, _built, _folder = tiny_shipped
    other = "0" * 16
    (tmp_path / f"{other}.json").write_text(shipped.manifest.read_text())
    (tmp_path / f"{other}.safetensors").write_bytes(shipped.arrays.read_bytes())
    with pytest.raises(ModelError, match=f"names key '{shipped.key}', not '{other}'"):
        shipped_manifest(other, tmp_path)


def test_use_shipped_false_builds_from_the_recipe(base_dir, tiny_shipped, tmp_path) -> None:
    shipped, _built, folder = tiny_shipped
    mcfg, dcfg, tcfg = _cfgs(base_dir)
    said: list[str] = []
    directory = ensure_public_init(mcfg, dcfg, tcfg, recipe=TINY, root=tmp_path, shipped=folder,
                                   use_shipped=False, progress=said.append)
    assert said[0].startswith("synthesising")
    # rebuilt here from the recipe: same machine and software, same bytes as the shipped copy
    result = compare_with_shipped(directory, shipped)
    assert result["identical"] and result["max_abs_diff"] == 0.0 and result["same_tensors"]


def test_compare_reports_how_far_a_rebuild_is(tiny_shipped, tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    shipped, built, _folder = tiny_shipped
    arrays = load_file(str(built / ARRAYS_FILE))
    name = sorted(arrays)[0]
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] += 0.25
    save_file(arrays, str(tmp_path / ARRAYS_FILE))
    result = compare_with_shipped(tmp_path, shipped)
    assert not result["identical"] and result["same_tensors"]
    assert result["max_abs_diff"] == pytest.approx(0.25, rel=1e-5)


def test_verify_without_a_shipped_copy_says_so(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedrg.cli", "public-adapter", "--verify",
         "--set", "model.lora_rank=2"],
        capture_output=True, text=True, env={**__import__("os").environ, "FEDRG_CACHE": str(tmp_path)},
        timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "no shipped public adapter for key" in proc.stderr
    assert "default configuration only" in proc.stderr
