"""Run summary table within 80 columns and the plots' labels (issue 15)."""

from __future__ import annotations

import io

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
