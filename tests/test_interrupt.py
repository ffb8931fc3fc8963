"""Ctrl-C / SIGTERM with real signals on real `fedrg` subprocesses; unwritable --out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_fixtures import tiny_base, tiny_cohort
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.interrupt import EXIT_INTERRUPTED

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _train_args(fx_root: Path, out: Path, epochs: int) -> list[str]:
    base, cohort = tiny_base(fx_root), tiny_cohort(fx_root)
    sets = [f"model.base={json.dumps(str(base))}", "model.encoder_width=16",
            "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]",
            f"training.train_epochs={epochs}", "training.batch_size=8"]
    args = ["train", "--cohort", str(cohort), "--out", str(out), "--no-dp"]
    for s in sets:
        args += ["--set", s]
    return args


def _wait_for(proc: subprocess.Popen, needle: str, timeout_s: float) -> str:
    """Read stderr lines until one contains ``needle``; return everything read."""
    seen = ""
    deadline = time.monotonic() + timeout_s
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never appeared; stderr so far:\n{seen}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_train_stops_within_ten_seconds_on_a_real_signal(fx_root, tmp_path, sig) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedrg.cli", *_train_args(fx_root, out, epochs=400)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path,
    )
    try:
        seen = _wait_for(proc, "fedrg train: training", timeout_s=240)
        time.sleep(0.5)  # inside the training loop
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = seen + err
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert elapsed < 10
    assert "Traceback" not in err and "Exception ignored" not in err
    assert "run the same command again" in err and signal.Signals(sig).name in err
    assert not (out / "metrics.json").exists()  # nothing half-written passes for a result


def test_unwritable_out_is_refused_before_training(fx_root, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = CliRunner().invoke(app, _train_args(fx_root, blocker / "out", epochs=1))
    assert res.exit_code == 2
    assert "--out" in res.output and str(blocker / "out") in res.output
    assert "Traceback" not in res.output and "training" not in res.output
    assert blocker.read_text() == "not a directory"


def _server_toml(tmp_path: Path, rounds: int) -> Path:
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'state_dir = "state"\n[run]\nrun_dir = "run"\n'
                   f'overrides = ["federation.rounds={rounds}"]\n')
    return cfg


def test_server_resume_of_a_complete_run_says_so_and_starts_nothing(tmp_path) -> None:
    import numpy as np

    from fedrg.federated.checkpoint import RunCheckpoint, save_checkpoint

    cfg = _server_toml(tmp_path, rounds=2)
    res = CliRunner().invoke(app, ["server", "--config", str(cfg), "--insecure", "--resume"])
    assert res.exit_code == 2 and "holds no checkpoint" in res.output
    save_checkpoint(tmp_path / "run", RunCheckpoint(
        round=2, global_arrays=[np.zeros(3, np.float32)], optimizer_state={},
        metrics={"rounds": []}, config_hash="x", run_id="r"))
    res = CliRunner().invoke(app, ["server", "--config", str(cfg), "--insecure", "--resume"])
    assert res.exit_code == 0, res.output
    assert "already complete (2 of 2 rounds)" in " ".join(res.output.split())
    assert not (tmp_path / "state").exists()  # no SuperLink, nothing started


@pytest.mark.parametrize("option", ["--out", "--state-dir"])
def test_simulate_refuses_unwritable_dirs_before_any_work(tmp_path, option) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ["simulate", "--set", f"data.synthetic_dir={tmp_path / 'cohorts'}",
            "--out", str(tmp_path / "run"), "--state-dir", str(tmp_path / "sites")]
    args[args.index(option) + 1] = str(blocker / "sub")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"{option} {blocker / 'sub'} is not writable" in text and "Traceback" not in text
    assert not (tmp_path / "cohorts").exists()  # no synthetic cohort was made


_STUBBORN = """
import sys, time
from pathlib import Path
from fedrg.interrupt import Interrupted, graceful_interrupt

marker = Path(sys.argv[1])
def cleanup():
    marker.write_text("cleaned")
with graceful_interrupt("stubborn", hint="HINT", cleanup=cleanup, grace_s=1.0):
    deadline = time.monotonic() + 30
    announced = False
    while True:   # like a library that swallows the interrupt and carries on
        try:
            if not announced:
                announced = True
                print("ready", flush=True)
            while time.monotonic() < deadline:
                time.sleep(0.05)
            break
        except Interrupted:
            pass
print("not reached", flush=True)
"""


def test_watchdog_forces_exit_and_cleans_up_when_the_command_does_not_unwind(tmp_path):
    """A real SIGINT to code that swallows the exception: the watchdog runs the cleanup,
    prints the hint and exits 130 after the grace period (not after 30 s)."""
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN, str(marker)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED and elapsed < 10, err
    assert "not reached" not in out and marker.read_text() == "cleaned"
    assert "SIGINT received" in err and "stubborn: stopped. HINT" in err


def test_second_signal_exits_at_once(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN.replace("grace_s=1.0", "grace_s=60"),
                             str(tmp_path / "m")], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED and elapsed < 5
    assert "second SIGINT, exiting now. HINT" in err
