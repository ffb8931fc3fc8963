"""`fedrg train` scores the start like the end, prints both, and keeps the better adapter
only where choosing by the held-out patients releases nothing (no DP)."""

from fedrg.commands.model import keep_better, start_and_end_lines

MARKERS = ["idh_mutant", "codeletion_1p19q", "mgmt_methylated"]


def _ev(mm, img=None):
    return {"auroc_multimodal": dict(zip(MARKERS, mm, strict=True)),
            "auroc": dict(zip(MARKERS, img or [0.5, 0.5, 0.5], strict=True))}


def test_without_dp_the_start_is_kept_when_training_lowered_the_held_out_auroc():
    start, end = _ev([0.93, 0.96, 0.73]), _ev([0.82, 0.71, 0.73])
    assert keep_better(start, end, private=False) == "start"
    assert keep_better(end, start, private=False) == "trained"


def test_under_dp_the_trained_adapter_is_always_kept():
    # a choice made by the held-out patients would be an unaccounted release
    start, end = _ev([0.93, 0.96, 0.73]), _ev([0.82, 0.71, 0.73])
    assert keep_better(start, end, private=True) == "trained"


def test_a_start_without_scores_never_wins():
    start = {"auroc_multimodal": {m: None for m in MARKERS}, "auroc": {}}
    assert keep_better(start, _ev([0.6, 0.6, 0.6]), private=False) == "trained"


def test_start_and_end_are_printed_side_by_side_with_the_change():
    lines = start_and_end_lines(_ev([0.9, 0.8, 0.7]), _ev([0.95, 0.7, 0.7]), MARKERS)
    assert "start" in lines[0] and "end" in lines[0] and "change" in lines[0]
    row = next(x for x in lines if x.startswith("multimodal idh_mutant"))
    assert row.split()[-3:] == ["0.900", "0.950", "+0.050"]
    row = next(x for x in lines if x.startswith("multimodal codeletion_1p19q"))
    assert row.split()[-1] == "-0.100"
    assert len(lines) == 1 + 2 * len(MARKERS)
