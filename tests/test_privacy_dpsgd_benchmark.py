"""benchmarks/dp_overhead.py runs end to end and prints the documented JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from model_fixtures import tiny_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dp_overhead_benchmark_reports_every_variant(tmp_path_factory, capsys):
    base = tiny_base(tmp_path_factory.getbasetemp() / "model-fixtures")
    spec = importlib.util.spec_from_file_location("dp_overhead", ROOT / "benchmarks" / "dp_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path_factory.mktemp("bench") / "dp.json"
    assert bench.main(["--base", str(base), "--batch", "4", "--reps", "2", "--warmup", "1",
                       "--report-tokens", "16", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert set(printed["variants"]) == {"non_dp", "hooks", "functorch", "ew", "ghost", "ew_all_trainable"}
    assert printed["default_dp_mode"] == "ew" and isinstance(printed["fastest_is_default"], bool)
    for v in printed["variants"].values():
        assert v["median_step_s"] > 0 and v["ratio_vs_non_dp"] > 0
    assert printed["variants"]["non_dp"]["ratio_vs_non_dp"] == 1.0
    assert printed["fastest_dp_mode"] in {"hooks", "functorch", "ew", "ghost"}
