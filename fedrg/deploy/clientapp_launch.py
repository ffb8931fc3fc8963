"""The hospital's ``flwr-clientapp`` launcher: hand the task to the warm fork server.

Flower's SuperExec starts one ``flwr-clientapp`` process per message. Starting Python and
importing Flower costs 1-3 s per message on a busy 2-core machine, for a message whose work
takes milliseconds (the hospital worker answers it). ``fedrg client`` therefore runs a fork
server (:mod:`fedrg.deploy.clientapp_forkserver`) that has Flower and fedrg's ClientApp
code imported once; this launcher, run by the ``flwr-clientapp`` script that
:func:`fedrg.deploy.pinned_clientapp.write_launcher` writes, asks it to fork a child that
runs **the same** :func:`fedrg.deploy.pinned_clientapp.main` (bundle check first) with this
process's arguments, environment, working directory and standard streams, and then exits
with the child's exit status. Signals it receives are passed on to the child.

It imports the standard library only (the script runs it with ``python -I -S``), so it
starts in tens of milliseconds. When no fork server answers, it runs the pinned ClientApp
in a fresh interpreter as before (same checks, slower).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import tempfile
from pathlib import Path

HEADER = struct.Struct(">I")  # length prefix of the request
MAX_REQUEST = 1 << 20
SOCKET_NAME = "clientapp.sock"
LAUNCHER_SCRIPT = Path(__file__).resolve()
_MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to about 107 bytes


def state_socket_path(state_dir: str | Path, name: str, fallback_prefix: str) -> Path:
    """``state_dir/name``, or a per-state-dir name in the system temp dir when that path is
    too long for ``AF_UNIX`` (about 107 bytes)."""
    state = Path(state_dir).resolve()
    path = state / name
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"{fallback_prefix}-{digest}.sock"


def socket_path(state_dir: str | Path) -> Path:
    """Where the fork server of ``state_dir`` listens (system temp dir if the path is too long)."""
    return state_socket_path(state_dir, SOCKET_NAME, "fedrg-clientapp")


def send_request(sock: socket.socket, argv: list[str]) -> None:
    """Send ``argv``, the environment, the working directory and fds 0-2 to the fork server."""
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    if len(body) > MAX_REQUEST:
        raise OSError("fork-server request too large")
    socket.send_fds(sock, [HEADER.pack(len(body)) + body], [0, 1, 2])


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise EOFError("fork server closed the connection")
        buf += chunk
    return buf


def run(socket_path: str, argv: list[str]) -> int:
    """Have the fork server run ``pinned_clientapp`` with ``argv``; return its exit status.

    Raises
    ------
    OSError
        When no fork server listens at ``socket_path`` (the caller falls back).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        send_request(sock, argv)
        pid = int(_read_line(sock))
    except (OSError, ValueError, EOFError) as err:
        sock.close()
        raise OSError(f"fork server at {socket_path}: {err}") from None

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    with sock:
        try:
            return int(_read_line(sock))
        except (OSError, ValueError, EOFError):
            return 1  # the fork server stopped: the child is gone with it


def main(argv: list[str]) -> int:
    """``clientapp_launch.py SOCKET STATE_DIR PYTHON -- FLWR_CLIENTAPP_ARGS...``."""
    socket_path, state_dir, python = argv[0], argv[1], argv[2]
    rest = argv[4:] if len(argv) > 3 and argv[3] == "--" else argv[3:]
    pinned = ["--fedrg-state-dir", state_dir, *rest]
    try:
        return run(socket_path, pinned)
    except OSError:
        # no fork server: Flower's per-message process, as before (same bundle check)
        os.execv(python, [python, "-m", "fedrg.deploy.pinned_clientapp", *pinned])
    return 1  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
