"""Ctrl-C and SIGTERM for long-running commands: stop quickly, say how to go on.

:func:`graceful_interrupt` installs handlers for SIGINT and SIGTERM around a command. The
first signal prints one line (what was interrupted and how to resume) to stderr and raises
:class:`Interrupted` in the main thread, so ``finally`` blocks and atomic writes (ledgers,
checkpoints) finish or roll back as usual. If the command has not returned ``grace_s``
seconds later (a blocking call that ignores the exception, such as Flower's simulation
engine waiting on Ray), a watchdog runs the given ``cleanup`` (which only stops what this
process started, e.g. its own Ray instance) and exits with status 130. A second signal
exits at once with the same status. Nothing is ever sent to processes this command did
not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

#: Exit status of a command stopped by a signal (the shell's convention for SIGINT).
EXIT_INTERRUPTED = 130
#: Seconds between the first signal and the forced exit.
DEFAULT_GRACE_S = 7.0


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT or SIGTERM."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def _say(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def graceful_interrupt(
    what: str,
    *,
    hint: str | Callable[[], str],
    cleanup: Callable[[], None] | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    on_signal: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Handle SIGINT/SIGTERM during the ``with`` block (main thread only; else a no-op).

    Parameters
    ----------
    what
        What is running, for the message (``"fedrg simulate"``).
    hint
        How to continue, printed with the message (``"resume with: fedrg simulate
        --resume runs/x"``), or a function that says it when the signal arrives.
    cleanup
        Called (for at most 2 s) by the watchdog before a forced exit; must stop only
        what this process started.
    grace_s
        Seconds the command gets to unwind after the first signal.
    on_signal
        Called at the first signal, before unwinding (e.g. silence a library's console
        log, whose worker threads report the interruption as errors).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"count": 0}

    def say_hint() -> str:
        with contextlib.suppress(Exception):
            return hint() if callable(hint) else hint
        return ""

    def force_exit() -> None:
        run_briefly(cleanup)
        with contextlib.suppress(Exception):
            if sys.stderr.isatty():  # a live progress display may have hidden the cursor
                sys.stderr.write("\x1b[?25h")
        _say(f"{what}: stopped. {say_hint()}")
        os._exit(EXIT_INTERRUPTED)

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        state["count"] += 1
        if state["count"] > 1:
            _say(f"{what}: second {name}, exiting now. {say_hint()}")
            os._exit(EXIT_INTERRUPTED)
        if on_signal is not None:
            with contextlib.suppress(Exception):
                on_signal()
        _say(f"{what}: {name} received, stopping (at most {grace_s:.0f} s).")
        timer = threading.Timer(grace_s, force_exit)
        timer.daemon = True
        timer.start()
        raise Interrupted(name)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_briefly(fn: Callable[[], None] | None, timeout_s: float = 2.0) -> None:
    """Call ``fn`` in a daemon thread and wait for it at most ``timeout_s`` seconds."""
    if fn is None:
        return

    def guarded() -> None:
        with contextlib.suppress(BaseException):
            fn()

    th = threading.Thread(target=guarded, daemon=True)
    th.start()
    th.join(timeout_s)


def exit_interrupted(what: str, hint: str, *, cleanup: Callable[[], None] | None = None) -> None:
    """Finish an interrupted command: run ``cleanup`` briefly, print ``hint``, exit 130.

    Exits with ``os._exit`` so that threads of libraries that do not stop on their own
    (Flower's ServerApp thread in a simulation) cannot keep the process alive; output
    streams are flushed first. Only call it once every file this process writes is closed
    (fedrg writes ledgers and checkpoints atomically, so an interrupted write leaves the
    previous version).
    """
    run_briefly(cleanup)
    _say(f"{what}: stopped. {hint}")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_INTERRUPTED)


def silence_flower() -> None:
    """Drop Flower's log records: once stopping, its engine threads report the workers
    going away as errors with tracebacks, which say nothing about the run."""
    import logging

    logging.getLogger("flwr").setLevel(logging.CRITICAL + 1)


def stop_own_ray() -> None:
    """Shut down the Ray instance this process started, if any (never an outside one),
    then end any of this process's own descendants (Ray workers) that outlived it."""
    import psutil

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        ours = psutil.Process().children(recursive=True)  # taken before they are orphaned
    except psutil.Error:
        ours = []
    ray.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=1.0)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=1.0)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
