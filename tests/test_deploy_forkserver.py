"""The hospital's ClientApp fork server (fedrg/deploy/clientapp_forkserver.py) and launcher.

Real processes: the launcher script `fedrg client` writes, the fork server started as
`fedrg client` starts it, and Flower's own `flwr-clientapp` argument handling in the child.
A task run through the fork server must behave exactly like one in a fresh interpreter
(same output, same exit status), run the pinned ClientApp (the pin is read first), and the
server must refuse a second instance and survive a malformed request or an unauthenticated
connection. Attacks by other local users: tests/adversary/test_socket_attacks.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from fedrg.deploy.clientapp_forkserver import ForkServer
from fedrg.deploy.pinned_clientapp import write_launcher
from fedrg.deploy.pinning import PIN_FILE, installed_pin
from fedrg.errors import FedrgError
from fedrg.hospital import clientapp_launch, local_socket
from fedrg.hospital.clientapp_launch import key_path, socket_path

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env


def _launch(launcher: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(launcher), *args], capture_output=True, text=True, env=_env(),
                          timeout=120)


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    s = tmp_path / "st"
    s.mkdir(mode=0o700)
    write_launcher(s, installed_pin())
    return s


def _start_server(state: Path) -> tuple[subprocess.Popen, IO[str]]:
    log = open(state / "forkserver.log", "w+")  # noqa: SIM115 - closed by the caller
    proc = subprocess.Popen([sys.executable, "-m", "fedrg.deploy.clientapp_forkserver",
                             "--state-dir", str(state)], stdout=log, stderr=subprocess.STDOUT,
                            env=_env())
    deadline = time.monotonic() + 120
    while not (state / "forkserver.log").read_text().count("fork server ready"):
        assert proc.poll() is None, (state / "forkserver.log").read_text()
        assert time.monotonic() < deadline, "fork server did not start"
        time.sleep(0.1)
    return proc, log


@pytest.fixture()
def server(state: Path):
    proc, log = _start_server(state)
    yield proc
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_task_through_the_fork_server_behaves_like_a_fresh_interpreter(state, server):
    launcher = state / "bin" / "flwr-clientapp"
    fresh = {}
    # without the server's socket the launcher starts a fresh interpreter
    sock = socket_path(state)
    hidden = sock.with_name("hidden.sock")
    sock.rename(hidden)
    try:
        fresh["help"] = _launch(launcher, "--help")
        fresh["bad"] = _launch(launcher, "--no-such-flag")
    finally:
        hidden.rename(sock)
    forked = {"help": _launch(launcher, "--help"), "bad": _launch(launcher, "--no-such-flag")}
    for key in fresh:
        assert forked[key].returncode == fresh[key].returncode, key
        assert forked[key].stdout == fresh[key].stdout, key
        assert forked[key].stderr == fresh[key].stderr, key
    assert fresh["help"].returncode == 0 and "flwr-clientapp" in forked["help"].stdout
    assert forked["bad"].returncode == 2 and "--token" in forked["bad"].stderr
    assert (state / "forkserver.log").read_text().count("forked ClientApp process") == 2


def test_forked_task_runs_the_pinned_clientapp(state, server):
    # the child reads the hospital's pin before Flower runs: without it the task fails
    (state / PIN_FILE).unlink()
    res = _launch(state / "bin" / "flwr-clientapp", "--help")
    assert res.returncode == 1
    assert PIN_FILE in res.stderr
    assert "forked ClientApp process" in (state / "forkserver.log").read_text()


def _recv_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    return out


def test_malformed_request_is_dropped_and_the_server_keeps_serving(state, server):
    # authenticated, then a malformed request: closed without forking
    with clientapp_launch.connect(state) as s:
        s.sendall(b"\x00\x00\x00\x05{bad}")
        assert _recv_all(s) == b""
    # not authenticated (no key): the server's nonce, then closed, nothing forked
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(socket_path(state)))
        s.sendall(b"\x00\x00\x00\x05{bad}")
        assert len(_recv_all(s)) == 4 + local_socket.NONCE_SIZE
    log = (state / "forkserver.log").read_text()
    assert "forked" not in log
    assert log.count("refused a fork-server connection") == 1
    assert log.count("unreadable fork-server request") == 1
    assert _launch(state / "bin" / "flwr-clientapp", "--help").returncode == 0


def test_second_fork_server_is_refused_and_a_stale_socket_replaced(tmp_path):
    first = ForkServer(tmp_path)
    first.open()
    key = key_path(tmp_path).read_bytes()
    try:
        second = ForkServer(tmp_path)
        with pytest.raises(FedrgError, match="already listens"):
            second.open()
        second.close()  # a refused server removes nothing of the running one
        assert key_path(tmp_path).read_bytes() == key and socket_path(tmp_path).exists()
    finally:
        first._sock.close()  # stopped without cleaning up: the socket file stays
    assert socket_path(tmp_path).exists()
    again = ForkServer(tmp_path)
    again.open()  # the stale socket is replaced, with a fresh key
    assert (socket_path(tmp_path).stat().st_mode & 0o777) == 0o600
    assert (key_path(tmp_path).stat().st_mode & 0o777) == 0o600
    assert key_path(tmp_path).read_bytes() != key
    assert (socket_path(tmp_path).parent.stat().st_mode & 0o777) == 0o700
    again.close()
    assert not socket_path(tmp_path).exists() and not key_path(tmp_path).exists()


def test_long_state_dir_serves_from_a_private_directory(tmp_path):
    # the state path is too long for a socket: the fork server and the launcher meet in an
    # unpredictable private directory named in <state_dir>/sockets.dir, not in a /tmp name
    state = tmp_path / ("long-state-directory-" * 5) / "st"
    state.mkdir(parents=True, mode=0o700)
    write_launcher(state, installed_pin())
    proc, log = _start_server(state)
    try:
        address = socket_path(state)
        assert address is not None and len(str(state / "clientapp.sock")) > 107
        assert (state / local_socket.POINTER_NAME).read_text().strip() == str(address.parent)
        assert (address.parent.stat().st_mode & 0o777) == 0o700
        res = _launch(state / "bin" / "flwr-clientapp", "--help")
        assert res.returncode == 0 and "flwr-clientapp" in res.stdout
        assert (state / "forkserver.log").read_text().count("forked ClientApp process") == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree((state / local_socket.POINTER_NAME).read_text().strip(),
                      ignore_errors=True)
    assert not address.exists()  # removed by the stopped server
