"""Adapter payload (arrays + manifest) and the on-disk adapter format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_fixtures import tiny_cohort, tiny_data_cfg, tiny_model_cfg

from fedrg.data.cohort import load_cohort
from fedrg.data.dataset import CohortDataset
from fedrg.errors import ModelError
from fedrg.model.adapter import build_model
from fedrg.model.io import load_adapter, save_adapter
from fedrg.model.payload import adapter_manifest, get_adapter_arrays, set_adapter_arrays
from fedrg.train.loop import collate


@pytest.fixture(scope="session")
def batch(fx_root):
    cfg = tiny_data_cfg()
    ds = CohortDataset(load_cohort(tiny_cohort(fx_root), cfg), cfg)
    return collate([ds[i] for i in range(3)])


def _perturbed(base_dir, seed=1):
    model = build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_arrays_roundtrip_and_manifest(base_dir):
    a = _perturbed(base_dir, seed=1)
    b = build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=2)
    ma = adapter_manifest(a)
    assert ma["sha256"] != adapter_manifest(b)["sha256"]
    arrays = get_adapter_arrays(a)
    assert [list(x.shape) for x in arrays] == ma["shapes"]
    assert all(x.dtype == np.float32 for x in arrays) and len(ma["names"]) == len(arrays)
    assert ma["bytes"] == sum(x.nbytes for x in arrays)
    set_adapter_arrays(b, arrays)
    assert adapter_manifest(b) == ma
    arrays[0] = arrays[0] + 1.0  # the getter returned copies
    assert adapter_manifest(a)["sha256"] == ma["sha256"]


def test_set_arrays_rejects_mismatch(base_dir):
    model = build_model(tiny_model_cfg(base_dir), tiny_data_cfg())
    arrays = get_adapter_arrays(model)
    with pytest.raises(ModelError, match="arrays"):
        set_adapter_arrays(model, arrays[:-1])
    arrays[0] = np.zeros((3, 3), np.float32)
    with pytest.raises(ModelError, match="shape"):
        set_adapter_arrays(model, arrays)


def test_save_load_gives_identical_outputs(base_dir, batch, tmp_path):
    model = _perturbed(base_dir, seed=5)
    model.eval()
    out = save_adapter(model, tmp_path / "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors", "fedrg_modules.safetensors",
                 "fedrg_adapter.json"):
        assert (out / name).is_file(), name
    loaded = load_adapter(out)
    loaded.eval()
    assert adapter_manifest(loaded) == adapter_manifest(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.per_example_loss(batch), model.per_example_loss(batch),
                                   rtol=0, atol=0)
    torch.testing.assert_close(loaded.marker_probabilities(batch),
                               model.marker_probabilities(batch), rtol=0, atol=0)
    assert loaded.generate_reports(batch, max_new_tokens=12) == model.generate_reports(
        batch, max_new_tokens=12)


def test_saved_lora_is_a_real_peft_adapter(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _perturbed(base_dir, seed=7)
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == model.model_cfg.lora_rank
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter", local_files_only=True)
    ours = {n.split("lm.", 1)[1]: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = dict(peft_model.named_parameters())
    assert ours and all(torch.equal(theirs[n], p) for n, p in ours.items())


def test_load_adapter_errors(tmp_path):
    with pytest.raises(ModelError, match="fedrg_adapter.json"):
        load_adapter(tmp_path)


def test_tampered_adapter_is_refused(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _perturbed(base_dir, seed=9)
    out = save_adapter(model, tmp_path / "adapter")
    tensors = load_file(str(out / "fedrg_modules.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(out / "fedrg_modules.safetensors"))
    with pytest.raises(ModelError, match="hash"):
        load_adapter(out)


def test_adapter_of_an_older_format_is_refused_with_the_fix(base_dir, tmp_path):
    import json

    out = save_adapter(_perturbed(base_dir, seed=9), tmp_path / "adapter")
    meta_file = out / "fedrg_adapter.json"
    meta = json.loads(meta_file.read_text())
    meta["format"] = 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="format 1 is not 2.*train it again"):
        load_adapter(out)
