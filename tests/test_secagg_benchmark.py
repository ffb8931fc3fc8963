"""The overhead benchmark runs end to end on a small size and reports consistent numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "secagg_overhead.py"


def test_benchmark_small_run_reports_ratios(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("secagg_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    report = module.main(["--clients", "4", "--params", "2000", "--reps", "2",
                          "--neighbours", "0,2", "--scale", "10,40", "--server-round-clients", "40",
                          "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    assert set(report["secure"]) == {"neighbours=all", "neighbours=2"}
    for s in report["secure"].values():
        assert s["max_abs_error_vs_plain"] <= s["error_bound"]
        assert s["ratio_sequential"] > 0 and s["ratio_critical_path"] > 0
        # masked upload: one uint32 per value plus the weight word, plus shares
        assert s["bytes_up_per_client"] > 4 * 2000
        assert s["bytes_down_per_client"] > 0
    assert report["plain"]["bytes_up_per_client"] == 4 * 2000 + 8
    assert all(s["message_round_trips"] == 5 for s in report["secure"].values())
    # the floor: self mask + one per neighbour at the slowest client, one per survivor at the server
    assert report["secure"]["neighbours=all"]["masks_on_critical_path"] == {"client": 4, "server": 4}
    assert report["secure"]["neighbours=2"]["masks_on_critical_path"] == {"client": 3, "server": 4}
    assert report["mask_s"] > 0
    for s in report["secure"].values():
        assert s["critical_path_floor_s"] == (report["plain"]["critical_path_min_s"] + sum(
            s["masks_on_critical_path"].values()) * report["mask_s"])
        assert s["ratio_critical_path_floor"] > 1
        pipe = s["pipelined"]  # client masks expanded before the update: same sum
        assert pipe["max_abs_error_vs_plain"] <= s["error_bound"]
        assert pipe["masks_before_training_s"] > 0 and pipe["ratio_critical_path"] > 0
        assert 1 < pipe["ratio_critical_path_floor"] < s["ratio_critical_path_floor"]
        assert len(s["fastest_repetition"]["client_s_per_stage_max"]) == 5
        assert len(s["fastest_repetition"]["server_s_per_stage"]) == 6
    # Shamir reconstruction timing per holder count, and a whole round's server time
    assert set(report["shamir_reconstruction"]) == {"10", "40"}
    for row in report["shamir_reconstruction"].values():
        assert row["per_secret_ms"] > 0 and row["first_ms"] > 0 and row["threshold"] >= 2
    server = report["server_round_40"]
    assert server["hospitals"] == 40 and server["included"] == 39  # one dropped at upload
    assert 0 < server["server_s"] <= server["all_parties_s"]
    assert set(server["server_s_per_stage"]) == {
        "setup_requests", "receive_setup", "receive_shares", "receive_masked",
        "receive_consistency", "receive_unmask"}
