"""Durable file writes, in one place: atomic replacement and key files.

Guarantees: :func:`atomic_write` leaves either the old or the new content at ``path``, never
a torn file (temporary file in the same directory, ``fsync`` of the file, ``os.replace``,
``fsync`` of the directory); the temporary file is created with mode 0600, so a private
file is never readable by others, even briefly. :func:`create_private` creates a secret (a
signing key) with mode 0600 and refuses to overwrite one, so a key is never lost by accident.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["PRIVATE_MODE", "PUBLIC_MODE", "atomic_write", "create_private", "file_sha256", "fsync_dir"]

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a directory entry to disk (ignored where the filesystem cannot)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int = PUBLIC_MODE) -> Path:
    """Replace ``path`` with ``data`` atomically and durably.

    Parameters
    ----------
    path
        Destination file; its parent directories are created.
    data
        Content (``str`` is written as UTF-8).
    mode
        Permission bits of the result (:data:`PRIVATE_MODE` for secrets).

    Returns
    -------
    Path
        ``path``. On any failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def create_private(path: str | os.PathLike[str], data: bytes) -> Path:
    """Create ``path`` with mode 0600 and write ``data`` durably; never overwrites.

    Raises
    ------
    FileExistsError
        When ``path`` exists (a key is never replaced by accident).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # umask cannot widen it, but make the mode explicit
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return path


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
