"""Scale: ``fedrg simulate`` with DP and secure aggregation at 3, 10, 30 and 100 hospitals.

For each hospital count it runs one simulation in a subprocess (private state and run
directories, small synthetic cohorts unless told otherwise) and prints JSON per count:

* ``wall_s_per_round``: the server's wall time of each round (``metrics.json``);
* ``secagg_s_per_round``: wall time of the secure-aggregation protocol inside each round
  (its messages included);
* ``secagg_server_s_per_round``: the server's own secure-aggregation work in each round
  (key checks, share routing, Shamir reconstruction, unmasking; waiting excluded);
* ``peak_rss_mb``: peak resident memory of the whole process tree (driver, Ray, actors),
  sampled every 0.5 s;
* ``total_wall_s`` and ``peak_rss_ratio_to_first`` (peak RSS / that of the first count).

    python benchmarks/scale.py --hospitals 3,10 --rounds 2

Every process it starts is ended at the end (the simulation's own tree, by pid).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SMALL = ["--set", "model.public_init=none", "--set", "data.synthetic_patients=32",
         "--set", "data.image_shape=[32, 32]",
         "--set", "training.local_epochs=0.5",
         "--set", "training.batch_size=8"]  # q = 8/24 within the sites' policy max_sample_rate 0.5


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in members:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def run_one(root: Path, hospitals: int, rounds: int, extra: list[str]) -> dict:
    """One ``fedrg simulate`` at ``hospitals``; returns its measurements."""
    run = root / f"run-{hospitals}"
    cmd = [sys.executable, "-m", "fedrg.cli", "simulate", "--hospitals", str(hospitals),
           "--rounds", str(rounds), "--state-dir", str(root / f"sites-{hospitals}"),
           "--set", f"data.synthetic_dir={root / f'cohorts-{hospitals}'}",
           "--set", f"federation.min_hospitals={min(2, hospitals)}",
           "--out", str(run), *extra]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    t0 = time.perf_counter()
    with open(root / f"simulate-{hospitals}.log", "wb") as log:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc = psutil.Process(popen.pid)
    peak = 0
    try:
        while popen.poll() is None:
            peak = max(peak, _tree_rss(proc))
            time.sleep(0.5)
    finally:
        if popen.poll() is None:  # interrupted: end this simulation's tree only
            for p in [*proc.children(recursive=True), proc]:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            popen.wait(timeout=30)
    total = time.perf_counter() - t0
    if popen.returncode != 0:
        tail = (root / f"simulate-{hospitals}.log").read_text(errors="replace")[-3000:]
        return {"hospitals": hospitals, "error": f"exit {popen.returncode}", "log_tail": tail}
    rows = json.loads((run / "metrics.json").read_text())["rounds"]
    return {"hospitals": hospitals, "rounds": len(rows),
            "participants_per_round": [r["participants"] for r in rows],
            "wall_s_per_round": [r["seconds"] for r in rows],
            "secagg_s_per_round": [r.get("secagg_seconds") for r in rows],
            "secagg_server_s_per_round": [r.get("secagg_server_seconds") for r in rows],
            "peak_rss_mb": round(peak / 2**20, 1), "total_wall_s": round(total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", default="3,10,30,100",
                        help="comma-separated hospital counts (default 3,10,30,100)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--full-size", action="store_true",
                        help="default cohort size and images instead of the small settings")
    parser.add_argument("--keep", type=Path, default=None, help="keep run directories here")
    args = parser.parse_args()
    try:
        counts = [int(c) for c in args.hospitals.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"--hospitals {args.hospitals!r}: give counts like 3,10,30") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"--hospitals {args.hospitals!r}: give counts >= 1, like 3,10,30")
    extra = [] if args.full_size else SMALL
    results = []
    with tempfile.TemporaryDirectory(prefix="fedrg-scale-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for n in counts:
            results.append(run_one(root, n, args.rounds, extra))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    first = next((r["peak_rss_mb"] for r in results if "peak_rss_mb" in r), None)
    for r in results:
        if first and "peak_rss_mb" in r:
            r["peak_rss_ratio_to_first"] = round(r["peak_rss_mb"] / first, 2)
    print(json.dumps({"benchmark": "scale", "rounds": args.rounds, "small": not args.full_size,
                      "load_average": os.getloadavg(), "results": results}, indent=1))
    failed = [r["hospitals"] for r in results if "error" in r]
    if failed:  # a run that did not complete is a failure, not a data point
        raise SystemExit(f"scale: the runs with {failed} hospitals did not complete (see 'error')")


if __name__ == "__main__":
    main()
