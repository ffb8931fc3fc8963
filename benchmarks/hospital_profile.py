"""Shares of hospital CPU time from the per-message profiles ``FEDRG_PROFILE_DIR`` writes,
and what a simulated round costs beside its training.

    python benchmarks/hospital_profile.py --run            # times a warm default `fedrg simulate`
    FEDRG_PROFILE_DIR=/tmp/prof fedrg simulate --state-dir /tmp/perf-state
    python benchmarks/hospital_profile.py /tmp/prof        # profiles of a run made by hand

Prints JSON: total profiled seconds of all hospital messages and, per component, its
cumulative CPU seconds (process_time: all threads) and share (components can nest). With
``--run`` it first runs ``fedrg simulate`` (the README's main command, its defaults; the
cache of ``$FEDRG_CACHE`` should be warm: run it once before) with a fresh profile
directory, and adds ``simulate_wall_s`` (the command's wall time), ``dp_sgd_s`` (the sum of
the hospitals' DP-SGD training, ``train_local``), ``ratio_wall_to_dp_sgd`` (the first over the
second; issue 25's goal is at most 1.5) and the load average before and after (the machine
may be shared: timings are only comparable at similar load).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPONENTS = {
    "dp_sgd_training": ("fedrg/train/loop.py", "train_local"),
    "evaluation": ("fedrg/hospital/evaluation.py", "release_aggregates"),
    "noise_calibration": ("fedrg/privacy/accounting.py", "calibrate_noise_multiplier"),
    "epsilon": ("fedrg/privacy/accounting.py", "epsilon_of"),
    "cohort_loading": ("fedrg/hospital/site.py", "cohort"),
    "model_build": ("fedrg/model/adapter.py", "build_model"),
    "secure_aggregation": ("fedrg/hospital/secure.py", "client_stage"),
    # module imports (torch, transformers, peft, opacus: once per worker process)
    "imports": ("<frozen importlib._bootstrap>", "_find_and_load"),
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


def run_simulate(extra: list[str]) -> dict:
    """Run a default ``fedrg simulate`` with profiling on; its timing and profile shares."""
    fedrg = shutil.which("fedrg", path=str(Path(sys.executable).parent)) or "fedrg"
    with tempfile.TemporaryDirectory(prefix="fedrg-profile-") as tmp:
        prof, out = Path(tmp) / "prof", Path(tmp) / "run"
        env = {**os.environ, "FEDRG_PROFILE_DIR": str(prof), "FLWR_TELEMETRY_ENABLED": "0"}
        cmd = [fedrg, "simulate", "--out", str(out), *extra]
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}")
        summary = shares(prof)
    dp = summary["components"]["dp_sgd_training"]["seconds"]
    return {"command": " ".join(["fedrg", "simulate", *extra]), "simulate_wall_s": round(wall, 2),
            "dp_sgd_s": dp, "ratio_wall_to_dp_sgd": round(wall / dp, 2) if dp else None,
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after], "cpus": os.cpu_count(), **summary}


def main(argv: list[str] | None = None) -> None:
    """Command line: a profile directory, or ``--run`` (extra ``fedrg simulate`` options after ``--``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prof_dir", nargs="?", default="/tmp/prof")
    ap.add_argument("--run", action="store_true", help="run a default `fedrg simulate` first")
    ap.add_argument("simulate_args", nargs=argparse.REMAINDER,
                    help="after --: extra `fedrg simulate` options (with --run)")
    args = ap.parse_args(argv)
    extra = [a for a in args.simulate_args if a != "--"]
    out = run_simulate(extra) if args.run else shares(Path(args.prof_dir))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
