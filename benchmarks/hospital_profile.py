"""Shares of hospital CPU time from the per-message profiles ``FEDRG_PROFILE_DIR`` writes.

    FEDRG_PROFILE_DIR=/tmp/prof fedrg simulate --state-dir /tmp/perf-state
    python benchmarks/hospital_profile.py /tmp/prof

Prints JSON: total profiled seconds of all hospital messages and, per component, its
cumulative CPU seconds (process_time: all threads) and share (components can nest).
"""

from __future__ import annotations

import json
import pstats
import sys
from pathlib import Path

COMPONENTS = {
    "dp_sgd_training": ("fedrg/train/loop.py", "train_local"),
    "evaluation": ("fedrg/hospital/evaluation.py", "release_aggregates"),
    "noise_calibration": ("fedrg/privacy/accounting.py", "calibrate_noise_multiplier"),
    "epsilon": ("fedrg/privacy/accounting.py", "epsilon_of"),
    "cohort_loading": ("fedrg/hospital/site.py", "cohort"),
    "model_build": ("fedrg/model/adapter.py", "build_model"),
    "secure_aggregation": ("fedrg/federated/secure.py", "client_stage"),
}


def shares(prof_dir: Path) -> dict:
    """Aggregate every ``*.prof`` file under ``prof_dir``; return the JSON-ready summary."""
    files = sorted(prof_dir.glob("*.prof"))
    if not files:
        raise SystemExit(f"no *.prof files in {prof_dir}; run with FEDRG_PROFILE_DIR={prof_dir}")
    stats = pstats.Stats(str(files[0]))
    for f in files[1:]:
        stats.add(str(f))
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_f, _l, _n), (_cc, _nc, tt, _ct, _c) in raw.items())
    out = {"messages": len(files), "hospital_cpu_s": round(total, 2), "components": {}}
    for name, (path, func) in COMPONENTS.items():
        # outermost calls only: cumulative time counts recursion once in pstats
        ct = sum(v[3] for (f, _l, n), v in raw.items() if f.endswith(path) and n == func)
        out["components"][name] = {"seconds": round(ct, 2),
                                   "share": round(ct / total, 3) if total else 0.0}
    by_action: dict[str, int] = {}
    for f in files:
        action = f.name.rsplit("-", 2)[0]
        by_action[action] = by_action.get(action, 0) + 1
    out["messages_by_action"] = by_action
    return out


if __name__ == "__main__":
    print(json.dumps(shares(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/prof")), indent=1))
