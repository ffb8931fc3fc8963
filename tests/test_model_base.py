"""Base LM: the built-in tiny model (built, cached, loaded offline) and local directories."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import tiny_base

from fedrg.errors import ModelError
from fedrg.model.base import (
    build_builtin_base,
    ensure_builtin_base,
    load_base,
    resolve_base_dir,
    small_recipe,
)


def test_builtin_build_is_cached_and_loads_offline(fx_root):
    path = tiny_base(fx_root)
    info = json.loads((path / "fedrg_base.json").read_text())
    assert info["digest"] in path.name
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin_base(small_recipe(), root=path.parent) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    model, tok = load_base(str(path))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.is_fast and tok.pad_token_id is not None
    assert model.config.vocab_size == len(tok)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs


def test_builtin_build_is_deterministic(tmp_path):
    recipe = small_recipe(pretrain_steps=3, corpus_reports=60)
    build_builtin_base(recipe, tmp_path / "a")
    build_builtin_base(recipe, tmp_path / "b")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json").read_text()


def test_recipe_digest_changes_with_recipe():
    assert small_recipe().digest() != small_recipe(pretrain_steps=21).digest()


def test_missing_base_directory_names_setting_and_fix(tmp_path):
    with pytest.raises(ModelError, match=r"model\.base=.*does not exist.*builtin:tiny"):
        resolve_base_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve_base_dir(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unknown built-in"):
        resolve_base_dir("builtin:huge")


@pytest.mark.slow
def test_builtin_tiny_writes_report_sentences():
    """The default base (built once per cache) already writes report language."""
    path = resolve_base_dir("builtin:tiny")
    info = json.loads((path / "fedrg_base.json").read_text())
    print(f"\nbuiltin:tiny {info['parameters']} params, vocab {info['vocab_size']}, "
          f"pre-train loss {info['pretrain_loss_first']:.2f} -> {info['pretrain_loss_last20']:.2f}")
    assert info["pretrain_loss_last20"] < 1.0
    model, tok = load_base("builtin:tiny")
    model.eval()
    ids = torch.tensor([[tok.bos_token_id]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    text = tok.decode(out[0], skip_special_tokens=True)
    print(text)
    assert any(w in text for w in ("mass", "lesion", "enhancement", "oedema", "lobe"))


@pytest.mark.slow
def test_two_processes_build_once(tmp_path):
    """A file lock: concurrent builders share one result, no temp dirs are left."""
    import subprocess
    import sys

    code = (
        "import sys, time; from fedrg.model.base import ensure_builtin_base, small_recipe;"
        "r = small_recipe(pretrain_steps=2, corpus_reports=60);"
        "p = ensure_builtin_base(r, root=sys.argv[1]);"
        "print(p, (p / 'fedrg_base.json').stat().st_mtime_ns)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]  # same directory, same build (same file timestamp)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [
        outs[0][0].rsplit("/", 1)[1]]
