"""Run summary table within 80 columns and the plots' labels (issue 15)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fedrg.federated.report import privacy_label, round_table, write_plots

MARKERS = ["idh_mutant", "codeletion_1p19q", "mgmt_methylated"]
ROUNDS = [
    {"round": r, "participants": 10, "declined": ["hospital-10"] if r == 3 else [],
     "loss": 2.5 - 0.1 * r, "auroc": dict.fromkeys(MARKERS, 0.5 + 0.05 * r),
     "findings_f1": 0.3, "epsilon": {f"hospital-{i}": 2.0 * r for i in range(1, 11)},
     "bytes_up": 1_660_000, "seconds": 135.487}
    for r in range(1, 4)
]


def test_round_table_fits_80_columns_in_plain_text() -> None:
    buf = io.StringIO()
    Console(file=buf, width=80).print(round_table(ROUNDS, MARKERS))  # not a terminal
    text = buf.getvalue()
    assert "\x1b[" not in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for m in MARKERS:
        assert f"AUROC {m}" in " ".join(text.split())
    assert "hospitals" in text and "10 (-1)" in text and " 135" in text


def test_privacy_label_never_pairs_dp_off_with_a_target() -> None:
    assert privacy_label({"rounds": ROUNDS}, dp_enabled=False, target_epsilon=8.0) == "DP OFF"
    assert privacy_label({"rounds": ROUNDS}, dp_enabled=True, target_epsilon=8.0) \
        == "DP on, max eps 6.00 of target 8"


def test_plots_are_written_with_integer_round_ticks(tmp_path) -> None:
    import matplotlib.pyplot as plt

    seen: list = []
    real_savefig = plt.Figure.savefig

    def capture(fig, *args, **kwargs):  # look at each figure as it is saved
        ax = fig.axes[0]
        seen.append((ax.get_title(), list(ax.get_xticks()), ax.get_ylim(),
                     [ln.get_label() for ln in ax.get_lines()]))
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = capture
    try:
        paths = write_plots({"rounds": ROUNDS}, tmp_path, dp_label="DP on, max eps 6.00")
    finally:
        plt.Figure.savefig = real_savefig
    assert {p.name for p in paths} == {"auroc.png", "loss.png", "findings_f1.png",
                                       "epsilon.png"}
    for title, ticks, ylim, labels in seen:
        assert title.endswith("DP on, max eps 6.00")
        assert all(float(t).is_integer() for t in ticks), (title, ticks)
        assert ylim[0] == 0
        if title.startswith("Image-only AUROC"):
            assert "chance (0.5)" in labels and ylim == (0, 1)


def test_round_progress_in_plain_text_names_each_phase(tmp_path) -> None:
    from fedrg.commands.progress import RoundProgress, last_entry_steps, phase

    buf = io.StringIO()
    console = Console(file=buf, width=80)
    with phase(console, "preparing the base model"), RoundProgress(
            console, rounds=3, start_round=2, training="DP-SGD, 2 local epoch(s)") as prog:
        prog.on_phase("train", 2, 3)
        prog.on_phase("secagg_setup", 2, 3)
        prog.on_phase("evaluate", 2, 3)
        prog.round_done()
    lines = buf.getvalue().splitlines()
    assert lines == ["preparing the base model ...",
                     "starting the simulation engine (Ray) ...",  # no terminal: said once
                     "round 2/3: local training at 3 hospital(s) (DP-SGD, 2 local epoch(s)) ...",
                     "round 2/3: evaluation at 3 hospital(s) ..."]
    # steps per hospital come from the last ledger entry, when it is this round's
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "ledger.jsonl").write_text(
        '{"round": 1, "mechanism": {"steps": 4}}\n{"round": 2, "mechanism": {"steps": 7}}\n')
    assert last_entry_steps([tmp_path / "h1", tmp_path / "missing"], 2) == [7]
    assert last_entry_steps([tmp_path / "h1"], 3) == []
    # the round's evaluation release (one Gaussian "step") is not its DP-SGD steps
    with (tmp_path / "h1" / "ledger.jsonl").open("a") as f:
        f.write('{"round": 2, "kind": "evaluation", "mechanism": {"steps": 1}}\n')
    assert last_entry_steps([tmp_path / "h1"], 2) == [7]
    # round 2's row comes with round 3's train reply (its evaluation rides on that message)
    with (tmp_path / "h1" / "ledger.jsonl").open("a") as f:
        f.write('{"round": 3, "mechanism": {"steps": 5}}\n')
    assert last_entry_steps([tmp_path / "h1"], 2) == [7]
    assert last_entry_steps([tmp_path / "h1"], 3) == [5]


# ------------------------------------------------ issue 24: a run without DP is "no DP", never 0

def _rows_of(run_id_eps: dict[str, float], rounds: int = 3) -> list[dict]:
    return [{"round": r, "participants": len(run_id_eps), "declined": [], "loss": 1.5,
             "auroc": dict.fromkeys(MARKERS, 0.6), "findings_f1": 0.5,
             "epsilon": dict(run_id_eps), "bytes_up": 2_260_000, "seconds": 8.0}
            for r in range(1, rounds + 1)]


def _ledgers(tmp_path, plan: dict[str, tuple[bool, str]]) -> tuple[list, str]:
    """Real signed ledgers of run 'run-x' (hospital -> (DP-SGD?, release)); each hospital
    first ran an earlier DP run, as a reused simulation state does."""
    from privacy_ledger_helpers import write_run

    dirs = []
    for name, (train_dp, release) in plan.items():
        state = tmp_path / name
        write_run(state, "earlier", train_dp=True, release="dp", rounds=1, hospital=name)
        write_run(state, "run-x", train_dp=train_dp, release=release, hospital=name)
        dirs.append(state)
    return dirs, "run-x"


def test_non_private_run_prints_no_dp_never_zero(tmp_path) -> None:
    """Issue 24: `fedrg simulate` on configs/non-private.toml printed "epsilon spent this
    run ... 0.000" and "max eps 0.000"."""
    from fedrg.commands.federation import _run_epsilon_line
    from fedrg.commands.progress import rounds_without_dp, run_coverage

    dirs, run_id = _ledgers(tmp_path, {"hospital-1": (False, "exact"),
                                       "hospital-2": (False, "exact")})
    rows = _rows_of({"hospital-1": 0.0, "hospital-2": 0.0})  # what the server records
    buf = io.StringIO()
    Console(file=buf, width=80).print(round_table(
        rows, MARKERS, no_dp=rounds_without_dp(dirs, run_id)))
    table = buf.getvalue()
    assert "0.000" not in table and table.count("no DP") == 3
    line = _run_epsilon_line(rows, run_coverage(dirs, run_id), dp_requested=False,
                             target_epsilon=8.0)
    assert line is not None and "0.000" not in line and "target" not in line
    assert line.startswith("epsilon spent this run: no DP at any hospital")
    assert "metrics released exactly, WITHOUT DP, by hospital-1, hospital-2" in line


def test_mixed_run_names_the_hospital_without_dp(tmp_path) -> None:
    from fedrg.commands.federation import _run_epsilon_line
    from fedrg.commands.progress import rounds_without_dp, run_coverage

    dirs, run_id = _ledgers(tmp_path, {"hospital-1": (True, "dp"),
                                       "hospital-2": (False, "exact")})
    rows = _rows_of({"hospital-1": 4.25, "hospital-2": 0.0})
    buf = io.StringIO()
    Console(file=buf, width=80).print(round_table(
        rows, MARKERS, no_dp=rounds_without_dp(dirs, run_id)))
    assert "4.250" in buf.getvalue() and "0.000" not in buf.getvalue()
    line = _run_epsilon_line(rows, run_coverage(dirs, run_id), dp_requested=True,
                             target_epsilon=8.0)
    assert line == ("epsilon spent this run: hospital-1 4.250, hospital-2 no DP "
                    "(target 8.0); metrics released exactly, WITHOUT DP, by hospital-2 (no "
                    "epsilon covers them)")
    # DP-SGD with exact releases (the default simulation): the epsilon is DP-SGD's only
    dirs, run_id = _ledgers(tmp_path / "b", {"hospital-1": (True, "exact")})
    line = _run_epsilon_line(_rows_of({"hospital-1": 4.25}), run_coverage(dirs, run_id),
                             dp_requested=True, target_epsilon=8.0)
    assert line == ("epsilon spent this run: hospital-1 4.250 (target 8.0); metrics "
                    "released exactly, WITHOUT DP, by hospital-1 (no epsilon covers them)")


def test_round_line_of_a_round_without_dp(tmp_path, monkeypatch) -> None:
    """The live round line: "no DP, steps 9", not "max eps 0.00  DP-SGD steps 9"."""
    from fedrg.commands import federation
    from fedrg.commands.progress import last_train_entries

    dirs, _ = _ledgers(tmp_path, {"hospital-1": (False, "exact"),
                                  "hospital-2": (True, "exact")})
    buf = io.StringIO()
    monkeypatch.setattr(federation, "console", Console(file=buf, width=200))
    row = _rows_of({"hospital-1": 0.0, "hospital-2": 3.5})[2]
    entries = last_train_entries(dirs, 3)
    assert sorted(e["hospital"] for e in entries) == ["hospital-1", "hospital-2"]
    federation._print_round(row, MARKERS, entries)
    federation._print_round({**row, "epsilon": {"hospital-1": 0.0}}, MARKERS,
                            [e for e in entries if e["hospital"] == "hospital-1"])
    mixed, plain = buf.getvalue().splitlines()
    assert "max eps 3.50" in mixed and "no DP at hospital-1" in mixed and "DP-SGD steps 9" in mixed
    assert "no DP, steps 9" in plain and "max eps" not in plain and "DP-SGD" not in plain


def test_the_gain_over_round_zero_is_stated_per_marker():
    from fedrg.federated.report import gain_line, gains_over_start

    rows = [{"round": 0, "auroc": {"a": 0.6, "b": 0.5}, "auroc_multimodal": {"a": 0.7, "b": 0.55}},
            {"round": 1, "auroc": {"a": 0.62, "b": 0.5}, "auroc_multimodal": {"a": 0.8, "b": 0.6}},
            {"round": 2, "auroc": {"a": 0.65, "b": 0.45}, "auroc_multimodal": {"a": 0.9, "b": 0.5}}]
    gains = gains_over_start(rows, ["a", "b"])
    assert gains["auroc_multimodal"] == {"a": pytest.approx(0.2), "b": pytest.approx(-0.05)}
    assert gains["auroc"] == {"a": pytest.approx(0.05), "b": pytest.approx(-0.05)}
    line = gain_line(rows, ["a", "b"])
    assert "round 0 -> round 2" in line and "multimodal a 0.700 -> 0.900 (+0.200)" in line
    assert "multimodal b 0.550 -> 0.500 (-0.050)" in line
    assert gain_line(rows[1:], ["a", "b"]) is None  # no start row: nothing to compare with
