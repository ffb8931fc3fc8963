"""End-to-end deployment: `fedrg server` (SuperLink with TLS + SuperNode authentication,
registration, `flwr run` of fedrg's ServerApp) and three `fedrg client` hospitals (SuperNodes
running fedrg's ClientApp on their own synthetic cohorts), all real processes on 127.0.0.1.

Two rounds with DP-SGD and secure aggregation; the server prints each round as it finishes
and each hospital a line per trained round; afterwards the run directory holds a trained
adapter, metrics, plots and the hospitals' public ledger copies (sent through Flower
messages), `fedrg audit RUN` passes, each hospital holds its own privacy ledger, and no
process is left.
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

pytestmark = pytest.mark.slow

# three hospitals: each one's default policy (min_secagg_peers=2) wants two other hospitals
# in every secure sum
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
MARK = PROCESS_MARK

EXPERIMENT = """
[federation]
hospitals = 3
rounds = 2
min_hospitals = 2
fraction_evaluate = 0.0  # federated evaluation adds a message per round; not needed here
[data]
image_shape = [32, 32]
[model]
public_init = "none"   # random start: no public pre-training build for this small config
[privacy]
enabled = true
target_epsilon = 8.0
[secagg]
enabled = true
[training]
local_epochs = 0.5
batch_size = 6   # within each hospital's policy max_sample_rate (0.5) for ~15 training patients
threads = 1
"""


@pytest.fixture
def procs():
    """`python -m fedrg.cli` subprocesses, each in its own process group; all stopped at the end
    (also on failure), and nothing they started may survive."""
    import psutil

    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark}
    started: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        p = start_fedrg(args, log, env=env)
        started.append(p)
        return p

    yield start
    stop_all(started)  # SIGTERM: fedrg stops its Flower processes in `finally`
    deadline = time.monotonic() + 20
    left = marked_processes(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = marked_processes(mark)
    for p in left:
        p.kill()
    psutil.wait_procs(left, timeout=5)
    assert not left, f"processes left running: {[(p.pid, p.name()) for p in left]}"


def test_tls_federation_three_hospitals_two_rounds_dp_secagg(tmp_path, procs):
    from fedrg.deploy.testbed import write_testbed

    source_pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_bytes()
    write_testbed(tmp_path, experiment=EXPERIMENT, hospitals=HOSPITALS, patients=24, seed=11)
    run_dir = tmp_path / "run"

    server_log = tmp_path / "server.out"
    server = procs(["server", "--config", str(tmp_path / "server.toml")], server_log)
    wait_for_text("submitted", server_log, server, timeout=120)
    clients = {}
    for h in HOSPITALS:
        log = tmp_path / f"{h}.out"
        clients[h] = (procs(["client", "--config", str(tmp_path / f"{h}.toml")], log), log)
    for proc, log in clients.values():
        wait_for_text("connected to", log, proc, timeout=180)
    # the server prints round 1 while round 2 runs (the run is still going)
    wait_for_text(f"{len(HOSPITALS)} hospital(s) trained", server_log, server, timeout=1500)
    assert server.poll() is None

    try:
        rc = server.wait(timeout=1700)
    except subprocess.TimeoutExpired:
        rc = None
    out = server_log.read_text(errors="replace")
    assert rc == 0, f"server exit {rc}:\n{out[-6000:]}"
    assert "finished:completed" in out
    run_logs = list((tmp_path / "server-state" / "logs").glob("run-*.log"))
    assert len(run_logs) == 1 and run_logs[0].stat().st_size > 0  # the ServerApp's log

    # the trained adapter and the per-round metrics are in the run output
    assert (run_dir / "adapter" / "adapter_config.json").is_file(), sorted(
        str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["participants"] == len(HOSPITALS) for r in rounds)
    # secure aggregation over real Flower messages: round 1 sets itself up (five messages),
    # round 2 was set up during round 1's last two and takes three
    assert {"secagg_share", "secagg_masked"} <= set(rounds[0]["message_seconds"])
    assert {"train", "secagg_consistency", "secagg_unmask"} <= set(rounds[1]["message_seconds"])
    assert not {"secagg_share", "secagg_masked"} & set(rounds[1]["message_seconds"])
    # every hospital kept its own signed privacy ledger: one entry per round
    for h in HOSPITALS:
        ledger = tmp_path / h / "ledger.jsonl"
        assert ledger.is_file(), f"{h} has no ledger"
        entries = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert len(entries) == 2
        assert all("signature" in json.dumps(e) for e in entries)
    # per-round progress: the server's round lines, one line per trained round at each hospital
    flat = " ".join(out.split())  # the server's console wraps long lines
    for r in (1, 2):
        assert f"round {r} {len(HOSPITALS)} hospital(s) trained loss " in flat, out[-3000:]
    assert "epsilon hospital-1 " in flat and "hospital-2 " in flat
    assert (run_dir / "plots").is_dir() and any((run_dir / "plots").glob("*.png"))
    for h, (_, log) in clients.items():
        text = " ".join(log.read_text(errors="replace").split())
        assert "approved app: fedrg" in text
        for r in (1, 2):
            assert f"{h}: round {r} trained, " in text and "epsilon spent " in text, text[-2000:]
        assert "left, delta" in text
    # the hospitals' public ledger copies came back through Flower messages: audit the run
    for h in HOSPITALS:
        copy = run_dir / "ledgers" / h
        assert (copy / "ledger.jsonl").read_bytes() == (tmp_path / h / "ledger.jsonl").read_bytes()
        assert not (copy / "ledger_ed25519.pem").exists()
    audit = subprocess.run([sys.executable, "-m", "fedrg.cli", "audit", str(run_dir)],
                           capture_output=True, text=True, timeout=600)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "hospital-1" in audit.stdout and "hospital-2" in audit.stdout
    # `flwr run` rewrites the pyproject it is given: the source tree's must be untouched
    assert (Path(__file__).resolve().parent.parent / "pyproject.toml").read_bytes() == \
        source_pyproject
    # the server holds no hospital data: no cohort file, no ledger in its state or run dir
    # (the public ledger copies under run/ledgers are the only ledgers there)
    server_files = [p for d in (tmp_path / "server-state", run_dir) for p in d.rglob("*")]
    assert all("ledgers" in p.parts for p in server_files if p.name == "ledger.jsonl")
    assert "manifest.csv" not in [p.name for p in server_files]
    assert not [p for p in server_files if p.suffix == ".pem" and "ledger" in p.name]
