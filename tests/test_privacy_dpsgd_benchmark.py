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
    assert set(printed["variants"]) == {"non_dp", "hooks", "functorch", "ew", "ghost", "bk",
                                        "ew_all_trainable", "bk_all_trainable"}
    assert printed["default_dp_mode"] == "ew" and isinstance(printed["fastest_is_default"], bool)
    assert printed["default_dp_ratio"] == printed["variants"]["ew"]["ratio_vs_non_dp"]
    assert printed["like_for_like"] == {
        m: printed["variants"][f"{m}_all_trainable"]["ratio_vs_non_dp"] for m in ("ew", "bk")}
    for v in printed["variants"].values():
        assert v["median_step_s"] > 0 and v["ratio_vs_non_dp"] > 0
    assert printed["variants"]["non_dp"]["ratio_vs_non_dp"] == 1.0
    assert printed["fastest_dp_mode"] in {"hooks", "functorch", "ew", "ghost", "bk"}


@pytest.mark.slow
def test_dp_overhead_benchmark_runs_a_chosen_subset(tmp_path_factory, capsys):
    base = tiny_base(tmp_path_factory.getbasetemp() / "model-fixtures")
    spec = importlib.util.spec_from_file_location("dp_overhead", ROOT / "benchmarks" / "dp_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--base", str(base), "--batch", "4", "--reps", "2", "--warmup", "1",
                       "--report-tokens", "16", "--variants", "bk_all_trainable"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["variants"]) == {"non_dp", "bk_all_trainable"}
    assert set(printed["like_for_like"]) == {"bk"} and printed["fastest_dp_mode"] is None
    with pytest.raises(SystemExit):
        bench.main(["--variants", "nonsense"])
