"""Process supervision: start, track and stop Flower's long-running processes.

Every long-running process is started in its own process group, tracked by PID in a
:class:`ProcessGroup`, has its output captured to a log file, and is stopped (process
group *and* every descendant, e.g. the detached ``flower-superexec`` and the
``flwr-serverapp`` / ``flwr-clientapp`` it spawns) when the group is closed, on exit or on
failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedrg.errors import DeployError

# --------------------------------------------------------------------------- processes

@dataclass
class ManagedProcess:
    """One started program: its Popen, name and log file."""

    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        """Exit status, or None while running."""
        return self.popen.poll()

    def log_text(self) -> str:
        """Everything the process has written so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the log, ANSI colours removed."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log_text())
        return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to send SIGTERM to this (child) process when its parent dies."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@dataclass
class ProcessGroup:
    """Owns every process it starts and stops all of them on :meth:`close` (also on error).

    Use as a context manager::

        with ProcessGroup(log_dir) as group:
            link = group.start("superlink", [...], env=env)
            ...
    """

    log_dir: Path
    processes: list[ManagedProcess] = field(default_factory=list)
    _seen: dict[int, psutil.Process] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: str | Path | None = None
    ) -> ManagedProcess:
        """Start ``argv`` in a new process group with output to ``log_dir/<name>.log``.

        A previous log of the same name is kept as ``<name>.prev.log``. On Linux the
        process also gets SIGTERM when the thread that started it ends without cleaning up
        (even on SIGKILL), so start long-lived processes from the main thread.
        """
        log_path = self.log_dir / f"{name}.log"
        if log_path.exists():
            log_path.replace(self.log_dir / f"{name}.prev.log")
        with open(log_path, "wb") as log:
            try:
                popen = subprocess.Popen(
                    list(argv),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=dict(env),
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            except FileNotFoundError:
                raise DeployError(
                    f"cannot start {name}: program {argv[0]!r} not found; install fedrg "
                    "(it brings flwr) into this Python environment"
                ) from None
        proc = ManagedProcess(name, list(argv), popen, log_path)
        self.processes.append(proc)
        self._remember(proc.pid)
        return proc

    def _remember(self, pid: int) -> None:
        try:
            self._seen.setdefault(pid, psutil.Process(pid))
        except psutil.Error:
            return
        for child in _descendants(pid):
            self._seen.setdefault(child.pid, child)

    def refresh(self) -> None:
        """Record the current descendants of every tracked process (call while waiting)."""
        for proc in self.processes:
            if proc.alive():
                self._remember(proc.pid)

    def tracked_pids(self) -> list[int]:
        """PIDs of started processes and every descendant seen so far."""
        self.refresh()
        return sorted(self._seen)

    def living(self) -> list[psutil.Process]:
        """Tracked processes (and descendants seen) that still run."""
        out = []
        for p in self._seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def stop(self, proc: ManagedProcess, *, timeout: float = 10.0) -> int | None:
        """Stop one process, its group and descendants; returns its exit status."""
        self._terminate([proc], extra=[], timeout=timeout)
        return proc.returncode()

    def close(self, *, timeout: float = 10.0) -> None:
        """Stop every process started by this group (SIGTERM, then SIGKILL after ``timeout``)."""
        self.refresh()
        self._terminate(
            list(reversed(self.processes)), extra=list(self._seen.values()), timeout=timeout
        )

    def _terminate(
        self, procs: list[ManagedProcess], *, extra: list[psutil.Process], timeout: float
    ) -> None:
        # Our own children are waited for through Popen (psutil would reap them and lose
        # their exit status); descendants (e.g. the detached flower-superexec) through psutil.
        own = {proc.pid for proc in self.processes}
        targets: dict[int, psutil.Process] = {p.pid: p for p in extra if p.pid not in own}
        for proc in procs:
            if proc.alive():
                self._remember(proc.pid)
            for child in _descendants(proc.pid):
                if child.pid not in own:
                    targets[child.pid] = child
        targets = {pid: p for pid, p in targets.items() if _same_running(p)}
        for proc in procs:
            if proc.alive():
                _signal_group(proc.pid, signal.SIGTERM)
        for p in targets.values():
            _signal_proc(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        _, alive = psutil.wait_procs(list(targets.values()),
                                     timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:
            if proc.alive():
                _signal_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
        for p in alive:
            _signal_proc(p, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)


def _same_running(p: psutil.Process) -> bool:
    """True when ``p`` still runs and is the same process (PID not reused)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # started with start_new_session: pgid == pid


def _signal_proc(p: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.Error):
        p.send_signal(sig)
