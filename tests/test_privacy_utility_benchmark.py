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


def _run(start, setting, seed, multi, image=(0.6, 0.6, 0.6), f1=0.4):
    markers = ("idh_mutant", "codeletion_1p19q", "mgmt_methylated")
    return {"start": start, "setting": setting, "seed": seed,
            "auroc_image": dict(zip(markers, image, strict=True)),
            "auroc_multimodal": dict(zip(markers, multi, strict=True)), "findings_f1": f1,
            "rouge_l": 0.5, "epsilon_recorded": 8.0 if setting not in ("non-private", "start") else None}


def _world(start, seed, dp8, dp2):
    """One seed of a start: the start alone at 0.5, no DP at 0.9 / 0.8 / 0.7."""
    return [_run(start, "start", seed, (0.5, 0.5, 0.5)),
            _run(start, "non-private", seed, (0.9, 0.8, 0.7)),
            _run(start, "8.0", seed, dp8), _run(start, "2.0", seed, dp2)]


def test_share_kept_is_the_dp_part_of_the_non_private_gain_over_the_start(bench):
    runs = _world("random", 0, (0.86, 0.77, 0.68), (0.82, 0.74, 0.66))
    shares = bench.share_kept(runs)
    cell = shares["random"]["8.0"]["idh_mutant"]
    assert cell["per_seed"] == {0: pytest.approx(0.9)} and cell["gain_no_dp"] == {0: pytest.approx(0.4)}
    assert shares["random"]["2.0"]["mgmt_methylated"]["per_seed"][0] == pytest.approx(0.8)
    # no non-private gain to keep: no share (never a division by a near-zero gain)
    flat = [_run("same", "start", 0, (0.9, 0.9, 0.9)), _run("same", "non-private", 0, (0.91, 0.9, 0.9)),
            _run("same", "8.0", 0, (0.95, 0.9, 0.9))]
    assert bench.share_kept(flat)["same"]["8.0"]["idh_mutant"]["mean"] is None
    summary = bench.summarise(runs)
    assert summary["random"]["8.0"]["auroc_multimodal"]["idh_mutant"]["mean"] == pytest.approx(0.86)


def test_acceptance_needs_the_goal_on_every_marker_of_both_starts_and_every_seed(bench):
    good = [*_world("random", 0, (0.87, 0.78, 0.69), (0.83, 0.75, 0.67)),
            *_world("random", 1, (0.87, 0.78, 0.69), (0.83, 0.75, 0.67)),
            *_world("shifted", 0, (0.87, 0.78, 0.69), (0.83, 0.75, 0.67))]
    ok = bench.acceptance(bench.share_kept(good))
    assert ok["all_ok"], ok
    assert ok["random/eps8/idh_mutant"]["mean"] == pytest.approx(0.925)
    # one seed of one marker below the per-seed floor fails it, whatever the mean says
    bad = [*good[:4], *_world("random", 1, (0.87, 0.78, 0.69), (0.83, 0.75, 0.63)), *good[8:]]
    got = bench.acceptance(bench.share_kept(bad))
    assert not got["all_ok"] and not got["random/eps2/mgmt_methylated"]["ok"]
    # a start not measured is not a pass
    assert not bench.acceptance(bench.share_kept(good[:8]))["all_ok"]


def test_plot_and_bad_arguments(bench, tmp_path, capsys):
    runs = _world("random", 0, (0.86, 0.77, 0.68), (0.82, 0.74, 0.66))
    bench.plot(bench.summarise(runs), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "zero"])
    assert "--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--resume"])
    assert "--resume needs --json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--starts", "moon"])
    assert "unknown ['moon']" in capsys.readouterr().err


def test_markdown_table_shows_the_start_each_epsilon_no_dp_and_the_share_kept(bench):
    runs = [*_world("random", 0, (0.86, 0.77, 0.68), (0.82, 0.74, 0.66)),
            *_world("random", 1, (0.82, 0.71, 0.66), (0.80, 0.70, 0.64))]
    out = {"summary": bench.summarise(runs)}
    out["share_kept"] = bench.share_kept(runs)
    lines = bench.markdown_table(out).splitlines()
    rows = [line.split(" | ")[1] for line in lines[2:]]
    assert rows == ["the start alone", "epsilon 8", "epsilon 2", "no DP"]  # ordered, all there
    eps8 = lines[3].split(" | ")
    assert eps8[2] == "0, 1"  # the seeds behind the row
    assert eps8[3] == "0.840 ± 0.028"  # multimodal IDH: mean ± std over the two seeds
    assert eps8[6] == "85 % (80)"  # IDH share kept: mean 0.85, worst seed 0.8
    assert lines[2].split(" | ")[6] == ""  # no share for the start itself


def test_sampling_se_is_hanley_mcneil(bench):
    # chance with 50 positives and 50 negatives: var = (0.25 + 2 * 49 * (1/3 - 1/4)) / 2500
    assert bench.hanley_mcneil_se(0.5, 50, 50) == pytest.approx(((0.25 + 98 / 12) / 2500) ** 0.5)
    # fewer patients, wider; a perfect ranking has none; no positives, no figure
    assert bench.hanley_mcneil_se(0.7, 10, 30) > bench.hanley_mcneil_se(0.7, 40, 120)
    assert bench.hanley_mcneil_se(1.0, 20, 20) == pytest.approx(0.0)
    assert bench.hanley_mcneil_se(0.7, 0, 20) is None


def test_rows_without_counts_take_them_from_the_same_world_and_seed(bench):
    counts = {"patients": 120, "positives": {"idh_mutant": 40, "codeletion_1p19q": 15,
                                             "mgmt_methylated": 55},
              "negatives": {"idh_mutant": 80, "codeletion_1p19q": 105, "mgmt_methylated": 65}}
    runs = [_run("shifted", "start", 0, (0.5, 0.5, 0.5)), _run("random", "8.0", 0, (0.8, 0.7, 0.6)),
            _run("same", "8.0", 0, (0.8, 0.7, 0.6)), _run("random", "8.0", 1, (0.8, 0.7, 0.6))]
    runs[0]["held_out"] = counts
    bench.backfill_held_out(runs)
    # random and shifted starts share the shifted world's cohorts; same (public world) and
    # another seed are other patients: nothing is guessed for them
    assert runs[1]["held_out"] == counts
    assert "held_out" not in runs[2] and "held_out" not in runs[3]
    assert runs[1]["auroc_se_multimodal"]["idh_mutant"] == pytest.approx(
        bench.hanley_mcneil_se(0.8, 40, 80), abs=1e-4)
    notes = bench.held_out_notes(runs)
    assert notes[0].startswith("- shifted: 120 held-out patients per seed")
    assert notes[1:] == ["- random: 120 held-out patients per seed (positives IDH 40-40, 1p/19q 15-15, "
                     "MGMT 55-55); sampling standard error of one multimodal AUROC (Hanley-McNeil, "
                     f"mean over rows): IDH {bench.hanley_mcneil_se(0.8, 40, 80):.3f}, 1p/19q "
                     f"{bench.hanley_mcneil_se(0.7, 15, 105):.3f}, MGMT "
                     f"{bench.hanley_mcneil_se(0.6, 55, 65):.3f}"]
