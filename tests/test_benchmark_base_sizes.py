"""benchmarks/base_sizes.py: bases of the advertised sizes, and the JSON it prints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("base_sizes", ROOT / "benchmarks" / "base_sizes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


class _BuiltinTokenizerShape:
    """What base_config reads of a tokenizer: the built-in one's length and special ids."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 643


@pytest.mark.parametrize(("size", "low", "high"), [("0.5M", 0.4e6, 0.6e6), ("25M", 22e6, 28e6),
                                                   ("125M", 115e6, 135e6)])
def test_base_configs_have_the_advertised_size(size, low, high):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no time
        model = LlamaForCausalLM(_bench().base_config(size, _BuiltinTokenizerShape()))
    n = sum(p.numel() for p in model.parameters())
    assert low <= n <= high, f"{size}: {n:,} parameters"


@pytest.mark.slow
def test_base_sizes_benchmark_prints_dp_on_and_off(capsys, tmp_path):
    out = tmp_path / "sizes.json"
    assert _bench().main(["--sizes", "0.5M", "--steps", "1", "--warmup", "0", "--batch", "4",
                          "--report-tokens", "16", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    runs = {(r["size"], r["dp"]): r for r in printed["runs"]}
    assert set(runs) == {("0.5M", False), ("0.5M", True)}
    for r in runs.values():
        assert r["median_cpu_step_s"] > 0 and r["peak_rss_mib"] >= r["rss_after_build_mib"] > 0
        assert r["payload_bytes"] == 4 * r["trainable_params"]
    assert runs[("0.5M", True)]["dp_cpu_ratio"] > 0
