"""ProcessGroup stops what it started, including detached grandchildren, also on errors."""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from fedrg.deploy.processes import ProcessGroup, explain_supernode_failure, node_config_arg
from fedrg.errors import DeployError

# A parent that starts a grandchild in a NEW session (as flower-superlink starts
# flower-superexec), so a process-group kill of the parent alone would miss it.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _wait_for_pid_line(path, timeout=20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.strip():
            return int(text.split()[0])
        time.sleep(0.05)
    raise AssertionError("the parent did not report its child")


def test_close_stops_detached_grandchildren_even_when_the_body_fails(tmp_path):
    env = dict(os.environ)
    with pytest.raises(RuntimeError, match="boom"), ProcessGroup(tmp_path) as group:
        proc = group.start("parent", [sys.executable, "-c", PARENT], env=env)
        grandchild = _wait_for_pid_line(proc.log_path)
        assert os.getsid(grandchild) != os.getsid(proc.pid)  # really detached
        group.refresh()
        assert {proc.pid, grandchild} <= set(group.tracked_pids())
        raise RuntimeError("boom")
    assert proc.returncode() is not None
    assert not group.living()
    assert not psutil.pid_exists(grandchild) or \
        psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE


def test_stop_escalates_to_sigkill(tmp_path):
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)\n"
    with ProcessGroup(tmp_path) as group:
        proc = group.start("stubborn", [sys.executable, "-c", stubborn], env=dict(os.environ))
        _wait_for_line(proc.log_path, "ready")
        t0 = time.monotonic()
        group.stop(proc, timeout=1.0)
        assert proc.returncode() == -9
        assert time.monotonic() - t0 < 15


def _wait_for_line(path, text, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}")


def test_missing_program_is_a_clear_error(tmp_path):
    with ProcessGroup(tmp_path) as group, pytest.raises(DeployError, match="not found"):
        group.start("x", ["/nonexistent/flower-superlink"], env=dict(os.environ))


def test_node_config_rendering_and_refusals():
    assert node_config_arg({"cohort": "/a b/c", "epsilon-budget": 2.5, "on": True}) == \
        'cohort="/a b/c" epsilon-budget=2.5 on=true'
    with pytest.raises(DeployError, match="quote or backslash"):
        node_config_arg({"cohort": "/it's/here"})
    with pytest.raises(DeployError, match="may only hold"):
        node_config_arg({"bad key": 1})


@pytest.mark.parametrize(("log", "expected"), [
    ("Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
     "[code: 2004] Failed to activate SuperNode.\n", "not registered"),
    ("Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
     "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
     "certificate (_ssl.c:1006)\n", "does not vouch for (unable to get local issuer certificate)"),
    ("Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
     "[Errno 111] Connection refused\n", "cannot reach the server at h:1 ([Errno 111]"),
])
def test_supernode_failures_are_translated(log, expected):
    assert expected in explain_supernode_failure(log, 1, superlink="h:1")


OWNER = """
import os, sys, time
from pathlib import Path
from fedrg.deploy.processes import ProcessGroup
group = ProcessGroup(Path(sys.argv[1]))
child = group.start("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"],
                    env=dict(os.environ))
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_children_die_when_their_owner_is_killed(tmp_path):
    """Even SIGKILL of the fedrg process (no cleanup code runs) stops what it started."""
    import subprocess

    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "logs")],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(owner.stdout.readline())
        assert psutil.pid_exists(child)
        owner.kill()
        owner.wait(timeout=10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(child) and time.monotonic() < deadline:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.1)
        gone = not psutil.pid_exists(child) or \
            psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        if not gone:
            psutil.Process(child).kill()
        assert gone, "child outlived its killed owner"
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.wait(timeout=10)


def test_connection_lost_only_after_a_connection():
    from fedrg.deploy.processes import connection_lost

    assert connection_lost("INFO SuperNode ID: 7\n...\nWARNING Giving up reconnection after 3 s")
    assert not connection_lost("WARNING Giving up reconnection after 3 s\nExit Code: 305")
    assert not connection_lost("INFO SuperNode ID: 7\nINFO Receiving: train message")
