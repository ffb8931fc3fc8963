"""benchmarks/privacy_utility.py: its summary and acceptance logic (fast; the federation runs
themselves are the slow learning test's code path, tests/test_learning.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("privacy_utility",
                                                  ROOT / "benchmarks" / "privacy_utility.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(setting, seed, image, multi, f1):
    markers = ("idh_mutant", "codeletion_1p19q", "mgmt_methylated")
    return {"setting": setting, "seed": seed, "auroc_image": dict(zip(markers, image, strict=True)),
            "auroc_multimodal": dict(zip(markers, multi, strict=True)), "findings_f1": f1,
            "rouge_l": 0.5, "epsilon_recorded": 8.0 if setting != "non-private" else None}


def test_summary_and_acceptance(bench):
    runs = [_run("8.0", 0, (0.74, 0.60, 0.60), (0.96, 0.92, 0.74), 0.40),
            _run("8.0", 1, (0.76, 0.62, 0.62), (0.96, 0.92, 0.76), 0.42),
            _run("non-private", 0, (0.78, 0.70, 0.65), (0.99, 0.95, 0.80), 0.43),
            _run("non-private", 1, (0.78, 0.70, 0.65), (0.99, 0.95, 0.80), 0.45)]
    summary = bench.summarise(runs)
    assert summary["8.0"]["auroc_image"]["idh_mutant"]["mean"] == pytest.approx(0.75)
    assert summary["8.0"]["auroc_image"]["idh_mutant"]["std"] == pytest.approx(0.0141, abs=1e-4)
    assert summary["8.0"]["epsilon_recorded"]["max"] == 8.0
    ok = bench.acceptance(summary, runs)
    assert ok["all_ok"] and ok["image_idh_mutant_gap"]["gap"] == pytest.approx(0.03)
    # one seed below chance anywhere fails it, whatever the means say
    runs[1]["auroc_image"]["codeletion_1p19q"] = 0.49
    bad = bench.acceptance(bench.summarise(runs), runs)
    assert not bad["no_auroc_below_0.5"]["ok"] and not bad["all_ok"]
    assert bad["no_auroc_below_0.5"]["lowest"]["marker"] == "codeletion_1p19q"
    # the multimodal MGMT tolerance is 0.08, the others 0.05
    for value, ok in ((0.73, True), (0.71, False)):  # gaps 0.07 and 0.09
        runs[0]["auroc_multimodal"]["mgmt_methylated"] = runs[1]["auroc_multimodal"]["mgmt_methylated"] = value
        got = bench.acceptance(bench.summarise(runs), runs)["multimodal_mgmt_methylated_gap"]["ok"]
        assert got is ok
    assert bench.acceptance(bench.summarise(runs[:2]), runs[:2]) is None  # no non-private runs


def test_plot_and_bad_arguments(bench, tmp_path, capsys):
    runs = [_run("2.0", 0, (0.6, 0.55, 0.55), (0.9, 0.8, 0.7), 0.3),
            _run("non-private", 0, (0.78, 0.70, 0.65), (0.99, 0.95, 0.80), 0.43)]
    bench.plot(bench.summarise(runs), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "zero"])
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--resume"])
    assert "--resume needs --json" in capsys.readouterr().err
