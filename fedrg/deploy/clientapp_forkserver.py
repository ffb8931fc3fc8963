"""Fork server for the hospital's ``flwr-clientapp`` processes (Flower imported once).

Flower starts a new ``flwr-clientapp`` for every message; each start paid Python and Flower
imports (about 1.3 s of CPU, 2-3 s wall on a busy 2-core machine) for a message the hospital
worker answers in milliseconds. ``fedrg client`` starts this server next to the worker. It
imports Flower's ClientApp runtime and fedrg's pinned launcher once, then, for each request
of :mod:`fedrg.hospital.clientapp_launch`, forks a child that runs
:func:`fedrg.deploy.pinned_clientapp.main` with the launcher's arguments, environment,
working directory and standard streams. The child is the same code Flower would have
started (the app bundle is checked against the hospital's pin before anything of it is
written or imported); only the interpreter start and imports are skipped.

* **Who may ask**: the socket is ``clientapp.sock`` in the hospital's private socket
  directory (:mod:`fedrg.hospital.local_socket`: ``<state_dir>/sockets`` or, for a long state
  path, an unpredictable 0700 directory; checked: owned by this user, mode 0700, not a link),
  created 0600. Every connection's peer must run as this user (``SO_PEERCRED``) and prove the
  key in ``<state_dir>/clientapp.key`` (0600, fresh at every start) before its request is
  read; the server proves the key first, so the launcher never hands its token,
  environment or streams to anything else.
* **No app code in the server**: the server never imports the bundle's modules
  (``clients.app``, ``server.app``); each child imports them after the bundle check.
* **Failure**: if the server is not running, the launcher starts the pinned ClientApp in a
  fresh interpreter (slower, same result).

Run by ``fedrg client``; by hand: ``python -m fedrg.deploy.clientapp_forkserver --state-dir DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedrg.deploy import pinned_clientapp
from fedrg.errors import FedrgError
from fedrg.hospital import local_socket
from fedrg.hospital.clientapp_launch import PURPOSE, key_path, socket_path

log = logging.getLogger("fedrg.forkserver")

_HEADER = struct.Struct(">I")
_MAX_REQUEST = 1 << 20
PRELOAD = (
    "flwr.supernode.runtime.run_clientapp",
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.clientapp",
    "flwr.serverapp",
    "fedrg.deploy.pinned_clientapp",
    "fedrg.flower.apps",
    "fedrg.hospital.worker",
    "fedrg.deploy.settings",
)
"""Modules imported once in the server (never the app bundle's own modules)."""


def preload() -> None:
    """Import Flower's ClientApp runtime and fedrg's ClientApp glue (once, before any fork)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    pinned_clientapp.require_reviewed_flower()  # once here; each forked child inherits it


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    msg, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size + _MAX_REQUEST, 3)
    if len(msg) < _HEADER.size:
        raise ValueError("short fork-server request")
    (size,) = _HEADER.unpack_from(msg)
    if size > _MAX_REQUEST:
        raise ValueError("fork-server request too large")
    body = msg[_HEADER.size:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("truncated fork-server request")
        body += chunk
    request = json.loads(body)
    if (not isinstance(request.get("argv"), list) or not isinstance(request.get("env"), dict)
            or not isinstance(request.get("cwd"), str) or len(fds) != 3):
        for fd in fds:
            os.close(fd)
        raise ValueError("malformed fork-server request")
    return request, fds


def _run_child(request: dict[str, Any], fds: list[int]) -> int:
    """In the forked child: become the launcher's process and run the pinned ClientApp."""
    log.handlers.clear()  # the server's own log handler writes to its log, not the task's
    log.propagate = True
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    os.chdir(request["cwd"])
    sys.argv = ["flwr-clientapp", *map(str, request["argv"])]
    try:
        pinned_clientapp.main([str(a) for a in request["argv"]])
    except SystemExit as done:
        code = done.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # report like an interpreter would, then fail the task
        import traceback

        traceback.print_exc()
        return 1
    return 0


class ForkServer:
    """Forks a ready ClientApp process per request, on a user-only Unix socket."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.key_file = key_path(self.state_dir)
        self.address: Path | None = None  # in the private socket directory, made by open()
        self._key = b""
        self._sock: socket.socket | None = None
        self._children: dict[int, socket.socket] = {}

    def open(self) -> None:
        """Write a fresh key and listen (a stopped server's socket is replaced).

        Raises
        ------
        FedrgError
            If another fork server already listens for this state directory, or the socket
            directory fails its checks (:class:`~fedrg.hospital.local_socket.UnsafeSocketError`).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        address = socket_path(self.state_dir, create=True)
        assert address is not None
        self._sock, self._key = local_socket.listen(
            address, self.key_file, what=f"ClientApp fork server (state dir {self.state_dir})")
        self.address = address

    def _spawn(self, conn: socket.socket) -> None:
        try:
            local_socket.authenticate_client(conn, self._key, purpose=PURPOSE)
        except local_socket.UnsafeSocketError as err:
            log.warning("refused a fork-server connection: %s", err)
            conn.close()
            return
        conn.settimeout(5.0)
        try:
            request, fds = _recv_request(conn)
        except (OSError, ValueError) as err:
            log.warning("unreadable fork-server request: %s", err)
            conn.close()
            return
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                assert self._sock is not None
                self._sock.close()
                for other in self._children.values():
                    other.close()
                conn.close()
                code = _run_child(request, fds)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        log.info("forked ClientApp process %d in %.3f s", pid, time.perf_counter() - t0)
        with contextlib.suppress(OSError):
            conn.sendall(f"{pid}\n".encode())
        self._children[pid] = conn

    def _reap(self) -> None:
        for pid in list(self._children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 1 << 8
            if done == 0:
                continue
            conn = self._children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code  # killed by a signal: like a shell
            with contextlib.suppress(OSError):
                conn.sendall(f"{code}\n".encode())
            conn.close()

    def serve(self, stop: threading.Event | None = None) -> None:
        """Serve requests until ``stop`` is set (or forever)."""
        assert self._sock is not None, "call open() first"
        while stop is None or not stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.02 if self._children else 0.2)
            if ready:
                conn, _ = self._sock.accept()
                self._spawn(conn)
            self._reap()

    def close(self) -> None:
        """Stop listening; remove the socket and the key (running children finish on their own)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
            for path in (self.address, self.key_file):  # only this server's own files
                if path is not None:
                    with contextlib.suppress(OSError):
                        path.unlink()
        for conn in self._children.values():
            conn.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m fedrg.deploy.clientapp_forkserver --state-dir DIR``: serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True, help="the hospital's state directory")
    args = parser.parse_args(argv)
    # this logger only: a forked child must start with the logging a fresh process has
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    t0 = time.perf_counter()
    server = ForkServer(args.state_dir)
    try:
        preload()
        server.open()
    except FedrgError as err:
        log.error("the ClientApp fork server cannot start: %s", err)
        return 1

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    log.info("ClientApp fork server ready on %s (imports %.1f s)", server.address,
             time.perf_counter() - t0)
    print(f"fedrg ClientApp fork server ready: {server.address}", flush=True)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
