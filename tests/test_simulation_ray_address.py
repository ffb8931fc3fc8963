"""`fedrg simulate --ray-address`: a clear error fast; a real local Ray cluster (slow)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from fedrg.errors import FedrgError
from fedrg.flower.simulation import _connect_ray

SMALL = ["--set", "model.public_init=none", "--set", "data.synthetic_patients=32", "--set", "data.image_shape=[32, 32]",
         "--set", "training.local_epochs=0.5",
         "--set", "training.batch_size=8"]  # q = 8/24: within the sites' max_sample_rate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:", ":6379", "127.0.0.1:abc"])
def test_malformed_address_is_refused_with_the_fix(address):
    with pytest.raises(FedrgError, match="HOST:PORT"):
        _connect_ray(address, {})


def test_unreachable_address_fails_fast_naming_the_option():
    port = _free_port()  # nothing listens there
    with pytest.raises(FedrgError, match=rf"--ray-address 127.0.0.1:{port}.*ray start --head"):
        _connect_ray(f"127.0.0.1:{port}", {})


@pytest.mark.slow
def test_simulate_on_an_existing_local_ray_cluster(tmp_path):
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "ray")
    port = _free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # Ray's socket paths are short
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(ray_tmp)}
    start = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1",
                            "--port", str(port), "--num-cpus", "2", "--include-dashboard",
                            "false", "--disable-usage-stats", "--temp-dir", str(ray_tmp)],
                           capture_output=True, text=True, env=env, timeout=300)
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        run = tmp_path / "run"
        policy = tmp_path / "two-hospitals.toml"  # the sites' own: one other in each sum
        policy.write_text("[policy]\nmin_secagg_peers = 1\n")
        cmd = [sys.executable, "-m", "fedrg.cli", "simulate", "--ray-address", f"127.0.0.1:{port}",
               "--state-dir", str(tmp_path / "sites"), "--set",
               f"data.synthetic_dir={tmp_path / 'cohorts'}", *SMALL, "--hospitals", "2",
               "--rounds", "1", "--out", str(run), "--site-policy", str(policy)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        rows = json.loads((run / "metrics.json").read_text())["rounds"]
        assert [r["participants"] for r in rows] == [0, 2]  # round 0: the start, evaluated
        for h in ("hospital-1", "hospital-2"):
            kinds = [json.loads(line)["kind"] for line in
                     (tmp_path / "sites" / h / "ledger.jsonl").read_text().splitlines()]
            assert kinds == ["evaluation", "train", "evaluation"]
        # the cluster outlives the run (it is the operator's, not fedrg's)
        status = subprocess.run([str(ray_bin), "status", "--address", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, env=env, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]
    finally:
        _stop_cluster(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _stop_cluster(ray_tmp: Path) -> None:
    """Stop only this test's cluster: the processes whose command line names its temp dir
    (and their children), by pid; never `ray stop`, which ends every Ray on the machine."""
    ours = [p for p in psutil.process_iter(["cmdline"])
            if str(ray_tmp) in " ".join(p.info.get("cmdline") or [])]
    procs = {p.pid: p for p in ours}
    for p in ours:
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in p.children(recursive=True)})
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
