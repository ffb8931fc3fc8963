"""`fedrg simulate --ray-address` across two real Ray nodes (issue 25, item 5). Slow: runs in CI.

Two `ray start` processes on this machine, a head and a second node, each with one CPU and
a custom resource that names it. Flower's simulation engine makes one hospital actor per
CPU of each node (``pool_size_from_resources``) and each actor needs one CPU, so the two
actors cannot share a node. The test checks that hospitals ran on both nodes (the worker
log line naming the Ray node of each hospital) and that the run's metrics and adapter
equal those of a single-node run of the same config, with seeded DP noise in the workers
(tests/seeded_simulate.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
RAY = Path(sys.executable).parent / "ray"
NODES = {"fedrg_test_head": "head", "fedrg_test_second": "second"}  # custom resource -> node
SMALL = ["--hospitals", "3", "--rounds", "2",
         "--set", "model.public_init=none", "--set", "data.synthetic_patients=32",
         "--set", "data.image_shape=[32, 32]", "--set", "training.local_epochs=0.5",
         "--set", "training.batch_size=8"]  # q = 8/24: within the sites' max_sample_rate
NODE_LINE = re.compile(r"(hospital-\d+) runs on Ray node ([0-9a-f]+) \(worker pid (\d+)\)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own session (what it leaves running can be found and stopped)."""
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, err = popen.communicate()
    return subprocess.CompletedProcess(cmd, popen.returncode, out, err)


def _seeded_simulate(tmp: Path, name: str, env: dict[str, str], *extra: str) -> Path:
    """`fedrg simulate` through the seeded-noise driver; its own ledgers; returns the run."""
    run = tmp / name
    cmd = [sys.executable, str(TESTS / "seeded_simulate.py"), "simulate", *SMALL,
           "--state-dir", str(tmp / f"sites-{name}"),
           "--set", f"data.synthetic_dir={tmp / 'cohorts'}", "--out", str(run), *extra]
    proc = _run(cmd, env, timeout=900)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return run


def _start_node(ray_tmp: Path, env: dict[str, str], resource: str, *where: str) -> None:
    node_tmp = ray_tmp / NODES[resource]  # each node its own temp dir (short: socket paths)
    cmd = [str(RAY), *("start", *where, "--num-cpus", "1", "--num-gpus", "0"),
           "--resources", json.dumps({resource: 1}), "--temp-dir", str(node_tmp),
           "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(_free_port()),
           "--metrics-export-port", str(_free_port())]
    proc = _run(cmd, env, timeout=300)
    assert proc.returncode == 0, f"ray start {resource}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _cluster_nodes(address: str, env: dict[str, str]) -> dict[str, str]:
    """Node id -> our custom resource, as the cluster itself reports its live nodes."""
    code = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR', "
            "log_to_driver=False); print(json.dumps({n['NodeID']: sorted(n['Resources']) "
            "for n in ray.nodes() if n['Alive']})); ray.shutdown()")
    proc = _run([sys.executable, "-c", code], env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nodes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {node: next(r for r in res if r in NODES) for node, res in nodes.items()}


def _ours(ray_tmp: Path) -> list[psutil.Process]:
    """Live processes whose command line names this test's Ray temp dir (both nodes: GCS,
    raylets, agents, workers), and their children."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(ray_tmp) in " ".join(p.info.get("cmdline") or []):
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
    alive = []
    for p in found.values():
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def _stop_cluster(ray_tmp: Path, env: dict[str, str]) -> None:
    """Stop only this test's two nodes, by pid (never a bare `ray stop`: it ends every Ray
    on the machine, other users' included)."""
    procs = _ours(ray_tmp)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def test_hospitals_run_on_two_ray_nodes_with_the_results_of_one(tmp_path):
    assert RAY.exists(), f"the venv's ray CLI is missing at {RAY}"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)  # never a cluster named by the caller's shell

    t = [time.perf_counter()]  # phase times, printed only (never pass/fail)
    # the reference: the same config on one node (fedrg's private local Ray)
    single = _seeded_simulate(tmp_path, "single", env)
    t.append(time.perf_counter())

    ray_tmp = Path(tempfile.mkdtemp(prefix="fr2n", dir="/tmp"))  # Ray's socket paths are short
    port = _free_port()
    address = f"127.0.0.1:{port}"
    try:
        _start_node(ray_tmp, env, "fedrg_test_head", "--head", "--node-ip-address", "127.0.0.1",
                    "--port", str(port), "--ray-client-server-port", str(_free_port()),
                    "--include-dashboard", "false")
        _start_node(ray_tmp, env, "fedrg_test_second", "--address", address,
                    "--node-ip-address", "127.0.0.1")
        nodes = _cluster_nodes(address, env)
        assert sorted(nodes.values()) == sorted(NODES), nodes  # two live nodes, one CPU each
        t.append(time.perf_counter())
        two = _seeded_simulate(tmp_path, "two-nodes", env, "--ray-address", address)
        t.append(time.perf_counter())
    finally:
        _stop_cluster(ray_tmp, env)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    t.append(time.perf_counter())
    print("\nseconds: single-node run {:.1f}, two nodes up {:.1f}, two-node run {:.1f}, "
          "stop {:.1f}; load {}".format(*(b - a for a, b in itertools.pairwise(t)), os.getloadavg()))
    assert not _ours(ray_tmp), "Ray processes of the test's cluster left running"

    # (a) the hospitals ran on both nodes: each worker logs the Ray node of each hospital
    # it answered for (fedrg/flower/simulation.py, RUN/logs/worker-<pid>.log)
    ran: dict[str, set[str]] = {}
    for log in (two / "logs").glob("worker-*.log"):
        for hospital, node, _pid in NODE_LINE.findall(log.read_text()):
            assert node in nodes, (node, nodes)  # a node of this cluster, not another Ray
            ran.setdefault(NODES[nodes[node]], set()).add(hospital)
    assert set(ran) == {"head", "second"}, ran
    assert set().union(*ran.values()) == {"hospital-1", "hospital-2", "hospital-3"}, ran
    print(f"\nhospitals per Ray node: { {k: sorted(v) for k, v in ran.items()} }")

    # (b) the results equal the single-node run's: metrics of every round, the adapter
    rows = {name: json.loads((run / "metrics.json").read_text())["rounds"]
            for name, run in (("single", single), ("two", two))}
    keys = ("round", "participants", "loss", "auroc", "auroc_multimodal", "findings_f1", "epsilon")
    assert [r["round"] for r in rows["two"]] == [0, 1, 2]
    assert [{k: r.get(k) for k in keys} for r in rows["two"]] == \
        [{k: r.get(k) for k in keys} for r in rows["single"]]
    assert all(r["participants"] == 3 for r in rows["two"][1:])
    from safetensors.numpy import load_file

    for name in ("adapter_model.safetensors", "fedrg_modules.safetensors"):
        a, b = (load_file(run / "adapter" / name) for run in (single, two))
        assert a.keys() == b.keys() and a
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    # ... with DP noise in the training (equal because seeded, not because absent)
    for h in ("hospital-1", "hospital-2", "hospital-3"):
        entries = [json.loads(line) for line in
                   (tmp_path / "sites-two-nodes" / h / "ledger.jsonl").read_text().splitlines()]
        train = [e for e in entries if e["kind"] == "train"]
        assert [e["round"] for e in train] == [1, 2]
        assert all(e["mechanism"]["noise_multiplier"] > 0 for e in train), train
