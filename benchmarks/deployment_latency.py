"""Deployed round latency: real SuperLink + 2 SuperNodes on localhost over TLS, DP + secagg.

Starts ``fedrg server`` (SuperLink with TLS and SuperNode authentication) and two ``fedrg
client`` hospitals (each with its long-lived worker and ClientApp fork server) on synthetic
cohorts, the same set-up as ``tests/test_deploy_e2e.py`` but with two hospitals whose own
``[policy]`` sets ``min_secagg_peers = 1`` (the default, 2, refuses a two-hospital secure
sum), runs the federation and prints JSON:

* ``per_round[].wall_s``: the server's wall time of the round (``metrics.json``);
* ``per_round[].training_s``: the slowest hospital's time answering that round's ``train``
  message inside its worker (from the hospitals' local ``logs/worker.log``), without the
  previous round's evaluation folded into that message;
* ``per_round[].round_overhead_s``: their difference (messages, polls, secure aggregation);
* ``per_round[].message_seconds``: the server's wall time per message exchange;
* ``per_round[].evaluation_s`` / ``messaging_overhead_s``: with ``--fraction-evaluate`` > 0,
  the slowest hospital's evaluation work inside the round's wall time (the previous round's
  evaluation, folded into this round's ``train`` message; after the last round also its own,
  a plain ``evaluate``), and the overhead without it;
* ``per_round[].messages``: message exchanges the server started for the round;
* ``messages_answered_by_workers``, ``clientapp_processes_forked``: per hospital;
* ``load_average`` at the end (timings on a shared machine move with it).

    python benchmarks/deployment_latency.py --rounds 3

With ``--tutorial`` it runs docs/deployment.md's "Try it on one machine" as written (the
commands read from the document: three hospitals of 160 patients, the public initial
adapter, evaluation every round), then ``fedrg simulate`` of the same federation (same
experiment, overrides, cohorts and hospital policy), and prints both rounds' seconds and
``ratio`` (mean deployed round / mean simulated round).

Every process it starts is stopped at the end (by process group id).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

# The federation: 2 hospitals. Each hospital's default policy (min_secagg_peers = 2)
# refuses a secure sum with only one other hospital in it (that hospital could subtract its own
# update and read this one's), so the benchmark hospitals set ``[policy] min_secagg_peers = 1``
# explicitly: a benchmark set-up, not a recommendation (see docs/deployment.md).
HOSPITALS = ("hospital-1", "hospital-2")
MIN_SECAGG_PEERS = 1
EXPERIMENT = """
[federation]
hospitals = 2
rounds = {rounds}
min_hospitals = 2
fraction_evaluate = {fraction_evaluate}
[data]
image_shape = [32, 32]
[model]
public_init = "none"   # the initial adapter does not change a round's messaging cost
[privacy]
enabled = true
target_epsilon = 8.0
[secagg]
enabled = true
[training]
local_epochs = 0.5
batch_size = 8
threads = 1
"""
_ANSWERED = re.compile(r"answered (\w+) in ([0-9.]+) s")
_FOLDED = re.compile(r"folded evaluation of round (\d+) answered in ([0-9.]+) s")


def _setup(root: Path, rounds: int, patients: int, fraction_evaluate: float) -> None:
    from fedrg.deploy.testbed import write_testbed

    write_testbed(root, experiment=EXPERIMENT.format(rounds=rounds, fraction_evaluate=fraction_evaluate),
                  hospitals=HOSPITALS, patients=patients, seed=11,
                  policy=f"epsilon_budget = 50.0\nmin_secagg_peers = {MIN_SECAGG_PEERS}\n",
                  run="timeout_s = 3000\n", connect_timeout_s=180)


def worker_times(log: Path) -> list[tuple[str, float]]:
    """``(action, seconds)`` of every message a hospital's worker answered, in order."""
    if not log.is_file():
        return []
    return [(m.group(1), float(m.group(2))) for m in _ANSWERED.finditer(log.read_text(errors="replace"))]


def folded_times(log: Path) -> dict[int, float]:
    """Seconds of each evaluation a hospital answered inside a train message, by evaluated round."""
    if not log.is_file():
        return {}
    return {int(m.group(1)): float(m.group(2)) for m in _FOLDED.finditer(log.read_text(errors="replace"))}


def _count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text) if log.is_file() else 0


def run(root: Path, *, rounds: int, patients: int, fraction_evaluate: float) -> dict:
    """Run the deployed federation under ``root``; return the JSON-ready measurements."""
    from fedrg.deploy.testbed import start_fedrg, stop_all, wait_for_text

    _setup(root, rounds, patients, fraction_evaluate)
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    try:
        server = start_fedrg(["server", "--config", str(root / "server.toml")], root / "server.out")
        procs.append(server)
        wait_for_text("submitted", root / "server.out", server, timeout=300)
        for h in HOSPITALS:
            procs.append(start_fedrg(["client", "--config", str(root / f"{h}.toml")], root / f"{h}.out"))
        rc = server.wait(timeout=3600)
        total = time.perf_counter() - t0
    finally:
        stop_all(procs, timeout=60)
    if rc != 0:
        raise SystemExit(f"server exit {rc}:\n{(root / 'server.out').read_text(errors='replace')[-4000:]}")
    rows = json.loads((root / "run" / "metrics.json").read_text())["rounds"]
    times = {h: worker_times(root / h / "logs" / "worker.log") for h in HOSPITALS}
    trains = {h: [s for a, s in t if a == "train"] for h, t in times.items()}
    evals = {h: [s for a, s in t if a == "evaluate"] for h, t in times.items()}  # the last round's
    folded = {h: folded_times(root / h / "logs" / "worker.log") for h in HOSPITALS}
    per_round = []
    for i, row in enumerate(rows):
        rnd = int(row["round"])
        # in round rnd's train message: its training and round rnd - 1's evaluation
        training = max((t[i] - folded[h].get(rnd - 1, 0.0) for h, t in trains.items() if len(t) > i),
                       default=None)
        evaluation = max((folded[h].get(rnd - 1, 0.0) + (evals[h][-1] if i == len(rows) - 1 and evals[h]
                                                          else 0.0) for h in HOSPITALS), default=0.0)
        wall = float(row["seconds"])
        per_round.append({"round": row["round"], "wall_s": round(wall, 2),
                          "training_s": None if training is None else round(training, 2),
                          "round_overhead_s": None if training is None else round(wall - training, 2),
                          # with fraction_evaluate > 0: the slowest hospital's evaluation
                          # work, and what is left once it is taken out as well
                          "evaluation_s": round(evaluation, 2),
                          "messaging_overhead_s": None if training is None
                          else round(wall - training - evaluation, 2),
                          # server wall time per message exchange (push to last reply)
                          "message_seconds": row.get("message_seconds", {}),
                          "messages": len(row.get("message_seconds", {}))})
    messages = {h: len(worker_times(root / h / "logs" / "worker.log")) for h in HOSPITALS}
    forks = {h: _count(root / h / "logs" / "clientapp-forkserver.log", "forked ClientApp process")
             for h in HOSPITALS}
    overheads = [r["round_overhead_s"] for r in per_round if r["round_overhead_s"] is not None]
    return {"benchmark": "deployment_latency", "hospitals": len(HOSPITALS), "rounds": rounds,
            "tls": True, "dp": True, "secure_aggregation": True, "worker": True,
            "per_round": per_round,
            "mean_round_overhead_s": round(sum(overheads) / len(overheads), 2) if overheads else None,
            "messages_answered_by_workers": messages,
            "clientapp_processes_forked": forks, "total_wall_s": round(total, 1),
            "load_average": os.getloadavg()}


def _rounds_seconds(metrics: Path) -> list[float]:
    rows = json.loads(metrics.read_text())["rounds"]
    return [float(r["seconds"]) for r in rows if int(r["round"]) >= 1]


def run_tutorial(root: Path) -> dict:
    """docs/deployment.md's "Try it on one machine" (its commands, read from the document:
    public initial adapter, three hospitals of 160 patients), then ``fedrg simulate`` of the
    same federation (same experiment, overrides and cohorts); per-round seconds and ratio."""
    import shlex
    import sys

    from fedrg.deploy.processes import free_port
    from fedrg.deploy.settings import load_server_settings
    from fedrg.deploy.testbed import start_fedrg, stop_all, wait_for_text
    from fedrg.deploy.tutorial import read_tutorial, tutorial_workdir

    source = Path(__file__).resolve().parent.parent
    tutorial = read_tutorial(source / "docs" / "deployment.md")
    work = tutorial_workdir(source, root / "tutorial", port=free_port())
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                  os.environ["PATH"]])}
    for line in tutorial.setup:
        subprocess.run(["bash", "-c", line], cwd=work, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    try:
        server = start_fedrg(tutorial.server, work / "server.out", env=env, cwd=work)
        procs.append(server)
        wait_for_text("submitted", work / "server.out", server, timeout=300)
        procs += [start_fedrg(args, work / f"client-{i}.out", env=env, cwd=work)
                  for i, args in enumerate(tutorial.clients, 1)]
        rc = server.wait(timeout=3600)
        deployed_total = time.perf_counter() - t0
        client_rc = [p.wait(timeout=120) for p in procs[1:]]
    finally:
        stop_all(procs, timeout=60)
    if rc != 0:
        raise SystemExit(f"server exit {rc}:\n{(work / 'server.out').read_text()[-4000:]}")
    settings = load_server_settings(work / tutorial.server[tutorial.server.index("--config") + 1])
    deployed = _rounds_seconds(Path(settings.run.run_dir) / "metrics.json")
    # the same federation in `fedrg simulate`: experiment, overrides, the tutorial's cohorts
    # and the hospitals' policy (simulate's own default releases metrics exactly)
    sets = [a for o in settings.run.overrides for a in ("--set", o)]
    cohorts = [a for c in sorted((work / "deploy" / "cohorts").iterdir()) if c.is_dir()
               for a in ("--cohort", str(c))]
    sim_out = root / "simulate"
    argv = [sys.executable, "-m", "fedrg.cli", "simulate", "--config", settings.run.experiment,
            *sets, *cohorts, "--site-policy", str(work / "configs" / "hospital.example.toml"),
            "--out", str(sim_out), "--state-dir", str(root / "sim-state")]
    t1 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    simulated_total = time.perf_counter() - t1
    simulated = _rounds_seconds(sim_out / "metrics.json")
    mean_d, mean_s = sum(deployed) / len(deployed), sum(simulated) / len(simulated)
    return {"benchmark": "deployment_latency --tutorial", "hospitals": len(tutorial.clients),
            "commands": [shlex.join(["fedrg", *tutorial.server]),
                         *(shlex.join(["fedrg", *c]) for c in tutorial.clients)],
            "overrides": settings.run.overrides, "client_exit_status": client_rc,
            "deployed_round_s": deployed, "simulated_round_s": simulated,
            "mean_deployed_round_s": round(mean_d, 2), "mean_simulated_round_s": round(mean_s, 2),
            "ratio": round(mean_d / mean_s, 2), "deployed_total_s": round(deployed_total, 1),
            "simulated_total_s": round(simulated_total, 1), "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--patients", type=int, default=40,
                        help="mean synthetic cohort size (batch 8 needs >= 16 training patients "
                        "per hospital: policy.max_sample_rate 0.5)")
    parser.add_argument("--fraction-evaluate", type=float, default=0.0)
    parser.add_argument("--keep", type=Path, default=None, help="keep everything in this directory")
    parser.add_argument("--tutorial", action="store_true",
                        help="run docs/deployment.md's tutorial as written (public initial "
                        "adapter, full-size cohorts) and the same federation in `fedrg "
                        "simulate`; print the round times and their ratio")
    args = parser.parse_args()
    os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    if args.tutorial:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            print(json.dumps(run_tutorial(args.keep), indent=1))
        else:
            with tempfile.TemporaryDirectory(prefix="fedrg-tutorial-") as tmp:
                print(json.dumps(run_tutorial(Path(tmp)), indent=1))
        return
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.keep, rounds=args.rounds, patients=args.patients,
                     fraction_evaluate=args.fraction_evaluate)
    else:
        with tempfile.TemporaryDirectory(prefix="fedrg-latency-") as tmp:
            result = run(Path(tmp), rounds=args.rounds, patients=args.patients,
                         fraction_evaluate=args.fraction_evaluate)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
