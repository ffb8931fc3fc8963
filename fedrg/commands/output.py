"""Failures every command shares: an unwritable output or a busy port is one line, exit 2.

Commands check what they will write before any work (:func:`check_output_dir`,
:func:`check_output_file`, :func:`check_port_free`: nothing is created by the check) and
print a :class:`~fedrg.errors.FedrgError` with :func:`fail`. Whatever file-system error a
command did not foresee (a disk that fills up half way, a folder made read-only while it
runs) is caught once for every command by :class:`FedrgGroup` and said the same way,
naming the path and the fix, instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from fedrg.errors import FedrgError

__all__ = [
    "FedrgGroup",
    "OutputError",
    "check_output_dir",
    "check_output_file",
    "check_port_free",
    "describe_os_error",
    "fail",
]

#: Exit status of a usage or input error (a bad option, an unwritable output, a busy port).
EXIT_USAGE = 2


class OutputError(FedrgError):
    """An output path cannot be written, or a port to listen on is taken."""


def fail(message: str | BaseException, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr (the text as it is: brackets are not markup) and exit."""
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(Text.assemble(("error:", "red"), " ", str(message)))
    raise typer.Exit(code)


def _blocking_file(path: Path) -> Path | None:
    """The first ancestor of ``path`` (or ``path``) that exists and is not a folder."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def _probe(directory: Path) -> OSError | None:
    """Write (and remove) a temporary file in ``directory``: the only proof it is writable."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fedrg-write-test-"):
            pass
    except OSError as err:
        return err
    return None


def _folder_problem(folder: Path, *, named: Path, option: str) -> str | None:
    """Why the folder ``folder`` (for the path ``named``) cannot be written or made, or None."""
    blocker = _blocking_file(folder)
    if blocker is not None:
        what = "is a file" if blocker == named else f"lies under {blocker}, which is a file"
        return (f"{option} {named} {what}, not a folder; choose another {option} path, or "
                "move that file away. Nothing was written.")
    existing = _nearest_existing(folder)
    err = _probe(existing)
    if err is not None:
        return (f"{option} {named} is not writable ({err.strerror or err}); choose a path you "
                f"can write to, or fix the permissions of {existing}. Nothing was written.")
    return None


def check_output_dir(path: str | os.PathLike[str], *, option: str) -> Path:
    """Check that the folder ``path`` exists and is writable, or could be created; create nothing.

    Parameters
    ----------
    path
        The output folder a command will write (``--out``).
    option
        The option or setting that named it, for the message.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OutputError
        Naming the option, the path, why, and the fix.
    """
    p = Path(path)
    problem = _folder_problem(p, named=p, option=option)
    if problem:
        raise OutputError(problem)
    return p


def check_output_file(path: str | os.PathLike[str], *, option: str) -> Path:
    """Check that the file ``path`` can be written (its folder made); create nothing.

    Raises
    ------
    OutputError
        Naming the option, the path, why, and the fix.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{option} {p} is a folder; give a file path, e.g. {p / 'out'}. "
                          "Nothing was written.")
    problem = _folder_problem(p.parent, named=p, option=option)
    if problem:
        raise OutputError(problem)
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{option} {p} exists and is read-only; choose another {option} "
                          "path, or make the file writable. Nothing was written.")
    return p


def check_port_free(host: str, port: int, *, setting: str) -> None:
    """Refuse a ``host:port`` that another program listens on, before anything is started.

    The check binds the port the way the SuperLink will (``SO_REUSEADDR``, so a port held
    only by connections closing down still counts as free) and releases it at once.

    Raises
    ------
    OutputError
        Naming the setting, the address and the fix.
    """
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), int(port)))
        except OSError as err:
            why = ("another program is listening there (an earlier fedrg server or client "
                   "still running?)" if err.errno == errno.EADDRINUSE else
                   err.strerror or str(err))
            raise OutputError(
                f"cannot listen on {host}:{port} ({setting}): {why}; stop that program, or "
                f"set {setting} to a free port. Nothing was started.") from None


def describe_os_error(err: OSError) -> str:
    """One line for a file-system error no command foresaw: the path, why, and the fix."""
    path = Path(os.fsdecode(err.filename)) if err.filename is not None else None
    code = err.errno
    if path is None:
        return f"{err.strerror or err}"
    if code == errno.ENOTDIR or (code == errno.EEXIST and not path.is_dir()):
        blocker = _blocking_file(path) or path
        return (f"cannot create {path}: {blocker} is a file, not a folder; choose another "
                "path, or move that file away")
    if code in (errno.EACCES, errno.EPERM):
        return (f"cannot write {path}: permission denied; choose a path you can write to, "
                f"or fix the permissions of {path.parent}")
    if code == errno.EROFS:
        return f"cannot write {path}: the file system is read-only; choose another path"
    if code == errno.ENOSPC:
        return f"cannot write {path}: no space left on the device; free some space or choose another disk"
    if code == errno.EISDIR:
        return f"{path} is a folder; give a file path"
    if code == errno.ENOENT:
        return f"{path} does not exist; check the path"
    return f"cannot use {path}: {err.strerror or err}"


class FedrgGroup(TyperGroup):
    """The ``fedrg`` command group: a file-system error a command let through is one line
    on stderr and exit 2 (see :func:`describe_os_error`), never a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as err:
            if err.filename is None:  # not about a path: a bug to see in full
                raise
            fail(describe_os_error(err))
