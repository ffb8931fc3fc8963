"""docs/deployment.md's "Try it on one machine", run three times in a row, as written.

The commands are read from the document (:func:`fedrg.deploy.tutorial.read_tutorial`), not
copied here. Each run starts in a fresh directory holding a copy of ``configs/`` (the
tutorial's working directory is the fedrg source directory). In the copy, port 9092 is
replaced by a free one (a test never meets another process on that port) and the server's
``[run] overrides`` turn federated evaluation off (:data:`FAST`), to keep the test short. Every run
must succeed: the server waits for the three hospitals their default policies need, prints
its own two rounds and the trained adapter, and exits 0; each hospital prints one line per
trained round, then one line when the server has finished, and exits 0; no log holds a
traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedrg.deploy.testbed import PROCESS_MARK, marked_processes, start_fedrg, stop_all, wait_for_text
from fedrg.deploy.tutorial import read_tutorial, tutorial_workdir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deployment.md"
MARK = PROCESS_MARK


#: Added to the copied server config's ``[run] overrides`` (a documented setting, not a
#: command): without federated evaluation a run takes about a minute on a quiet 2-core
#: machine instead of several (report generation for ROUGE-L dominates an evaluation), so
#: the three runs fit CI. ``benchmarks/deployment_latency.py --tutorial`` runs it unchanged.
FAST = "federation.fraction_evaluate=0.0"


def _workers(mark: str) -> list:
    return [p for p in marked_processes(mark) if "fedrg.hospital.worker" in " ".join(p.cmdline())]


def _workdir(root: Path) -> Path:
    from fedrg.deploy.processes import free_port

    work = tutorial_workdir(ROOT, root, port=free_port())
    config = work / "configs" / "server.example.toml"
    text = config.read_text()
    assert text.count('overrides = ["') == 1
    config.write_text(text.replace('overrides = ["', f'overrides = ["{FAST}", "'))
    return work


def _run_tutorial(root: Path, env: dict[str, str], started: list) -> dict:
    tutorial = read_tutorial(DOC)
    t0 = time.monotonic()
    for line in tutorial.setup:
        done = subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{line}:\n{done.stdout}\n{done.stderr}"
    setup_s = time.monotonic() - t0
    server_log = root / "server.out"
    server = start_fedrg(tutorial.server[:], server_log, env=env, cwd=root)
    started.append(server)
    wait_for_text("submitted", server_log, server, timeout=300)
    clients = []
    for i, args in enumerate(tutorial.clients):
        log = root / f"client-{i + 1}.out"
        clients.append((start_fedrg(args, log, env=env, cwd=root), log))
        started.append(clients[-1][0])
    for proc, log in clients:
        wait_for_text("connected to", log, proc, timeout=300)
    # the example config's [worker] threads = 1: three hospitals on one machine do not
    # oversubscribe its cores (each worker's torch reads OMP_NUM_THREADS)
    workers = _workers(env[MARK])
    assert len(workers) == 3 and all(w.environ().get("OMP_NUM_THREADS") == "1" for w in workers)
    t1 = time.monotonic()
    rc = server.wait(timeout=900)
    run_s = time.monotonic() - t1
    out = server_log.read_text(errors="replace")
    assert rc == 0, f"server exit {rc}:\n{out[-6000:]}"
    flat = " ".join(out.split())
    assert "finished:completed" in flat and "trained adapter:" in flat, out[-3000:]
    # its own two rounds, once each, all three hospitals in each
    for r in (1, 2):
        assert flat.count(f"round {r} 3 hospital(s) trained") == 1, out[-3000:]
    assert "round 3 " not in flat
    run_dir = root / "runs" / "deploy"
    assert (run_dir / "adapter").is_dir()
    rows = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    trained = [r for r in rows if r["round"] >= 1]
    assert [r["participants"] for r in trained] == [3, 3]
    for proc, log in clients:  # the hospitals end on their own, with one line, exit 0
        try:
            crc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            crc = None
        text = log.read_text(errors="replace")
        assert crc == 0, f"client exit {crc}:\n{text[-3000:]}"
        lines = [x for x in text.splitlines() if x.strip()]
        assert "the server finished its run" in lines[-1], text[-2000:]
        assert "lost the connection" not in text
        words = " ".join(text.split())
        for r in (1, 2):
            assert words.count(f"round {r} trained, ") == 1, text[-3000:]
    logs = [*(root / "deploy").glob("hospital-*/logs/*.log"),
            *(root / "deploy" / "server-state" / "logs").glob("*.log"),
            server_log, *(log for _, log in clients)]
    assert len(logs) > 6
    for path in logs:
        text = path.read_text(errors="replace")
        assert "Traceback" not in text, f"{path}:\n{text[-3000:]}"
    return {"setup_s": round(setup_s, 1), "run_s": round(run_s, 1),
            "round_s": [r["seconds"] for r in trained]}


def _public_adapter_built() -> None:
    """Build (or find) the tutorial's public initial adapter in this process first: on an
    empty cache the ServerApp would otherwise build it inside the run's time limits."""
    from fedrg.config import load_config
    from fedrg.train.public_init import ensure_public_init

    cfg = load_config(ROOT / "configs" / "simulation.toml", [])
    if cfg.model.public_init == "synthetic":
        ensure_public_init(cfg.model, cfg.data, cfg.training)


def test_tutorial_three_times_in_a_row(tmp_path) -> None:
    import psutil

    _public_adapter_built()

    mark = uuid.uuid4().hex
    bindir = str(Path(sys.executable).parent)  # `fedrg` in the tutorial: this environment's
    env = {**os.environ, MARK: mark, "PATH": os.pathsep.join([bindir, os.environ["PATH"]])}
    started: list = []
    timings = []
    try:
        for i in range(3):
            timings.append(_run_tutorial(_workdir(tmp_path / f"try-{i + 1}"), env, started))
            assert not [p for p in started if p.poll() is None]
    finally:
        stop_all(started)
        deadline = time.monotonic() + 20
        left = marked_processes(mark)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = marked_processes(mark)
        for p in left:
            p.kill()
        psutil.wait_procs(left, timeout=5)
    print(json.dumps(timings))
    assert not left, f"processes left running: {[(p.pid, p.name()) for p in left]}"
