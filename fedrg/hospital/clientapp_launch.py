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

The socket is ``clientapp.sock`` in the hospital's private socket directory
(:mod:`fedrg.hospital.local_socket`: owned by this user, mode 0700, never a shared path). The
launcher sends its arguments, environment and streams only after the listener has passed
the checks: same user (``SO_PEERCRED``) and proof of the key in ``<state_dir>/clientapp.key``
(0600, fresh at every start of the fork server). A listener that fails them gets nothing, and
the launch fails with exit status :data:`EXIT_REFUSED` and a message naming the socket and
the reason. When no fork server runs (no directory, no key, nobody listening), it runs the
pinned ClientApp in a fresh interpreter as before (same checks, slower).

It imports the standard library and :mod:`fedrg.hospital.local_socket` only (the script runs
it with ``python -I -S``), so it starts in tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path

if not __package__:  # run as a script by `python -I -S`: fedrg is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedrg.hospital import local_socket  # after the path above

HEADER = struct.Struct(">I")  # length prefix of the request
MAX_REQUEST = 1 << 20
SOCKET_NAME = "clientapp.sock"
KEY_NAME = "clientapp.key"
PURPOSE = "ClientApp fork server"
EXIT_REFUSED = 77  # sysexits' EX_NOPERM: the fork server's socket failed a check
LAUNCHER_SCRIPT = Path(__file__).resolve()


class NoForkServerError(OSError):
    """No fork server runs for this state directory (the launcher starts a fresh process)."""


def socket_path(state_dir: str | Path, *, create: bool = False) -> Path | None:
    """Where the fork server of ``state_dir`` listens; ``None`` before one has started.

    Raises
    ------
    fedrg.hospital.local_socket.UnsafeSocketError
        If the hospital's socket directory fails its checks.
    """
    return local_socket.socket_path(state_dir, SOCKET_NAME, create=create)


def key_path(state_dir: str | Path) -> Path:
    """The fork server's key file: ``<state_dir>/clientapp.key`` (0600)."""
    return Path(state_dir) / KEY_NAME


def send_request(sock: socket.socket, argv: list[str]) -> None:
    """Send ``argv``, the environment, the working directory and fds 0-2 to the fork server."""
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    if len(body) > MAX_REQUEST:
        raise OSError("fork-server request too large")
    socket.send_fds(sock, [HEADER.pack(len(body)) + body], [0, 1, 2])


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError("fork server closed the connection")
        buf += chunk
    return buf


def connect(state_dir: str | Path) -> socket.socket:
    """Connect to the fork server of ``state_dir`` and authenticate both ways.

    Raises
    ------
    NoForkServerError
        When no fork server runs (the caller starts a fresh interpreter).
    fedrg.hospital.local_socket.UnsafeSocketError
        When the directory, the key or the listener fails a check (nothing was sent).
    """
    address = socket_path(state_dir)
    key = local_socket.read_key(key_path(state_dir))
    if address is None or key is None or not os.path.lexists(address):
        raise NoForkServerError(f"no ClientApp fork server for {state_dir}")
    try:
        return local_socket.connect(address, key, purpose=PURPOSE)
    except (FileNotFoundError, ConnectionRefusedError) as err:  # a stopped server's socket
        raise NoForkServerError(f"no ClientApp fork server at {address}: {err}") from None


def run(state_dir: str | Path, argv: list[str]) -> int:
    """Have the fork server run ``pinned_clientapp`` with ``argv``; return its exit status.

    Raises
    ------
    NoForkServerError
        When no fork server runs for ``state_dir`` (the caller falls back).
    fedrg.hospital.local_socket.UnsafeSocketError
        When the socket fails a check (nothing was sent) or the fork server broke off.
    """
    sock = connect(state_dir)
    try:
        send_request(sock, argv)
        sock.settimeout(None)
        pid = int(_read_line(sock))
    except (OSError, ValueError, EOFError) as err:
        sock.close()
        raise local_socket.UnsafeSocketError(
            f"the ClientApp fork server for {state_dir} did not take the task ({err}); see "
            "its log (<state_dir>/logs/clientapp-forkserver.log)") from None

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
    """``clientapp_launch.py STATE_DIR PYTHON -- FLWR_CLIENTAPP_ARGS...``."""
    state_dir, python = argv[0], argv[1]
    rest = argv[3:] if len(argv) > 2 and argv[2] == "--" else argv[2:]
    pinned = ["--fedrg-state-dir", state_dir, *rest]
    try:
        return run(state_dir, pinned)
    except NoForkServerError:
        # no fork server: Flower's per-message process, as before (same bundle check)
        os.execv(python, [python, "-m", "fedrg.deploy.pinned_clientapp", *pinned])
    except local_socket.UnsafeSocketError as err:
        print(f"fedrg flwr-clientapp: refused to start the ClientApp: {err}", file=sys.stderr,
              flush=True)
        return EXIT_REFUSED
    return 1  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
