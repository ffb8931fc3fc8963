"""Writing secret and public files with the right permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedrg.errors import DeployError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def write_private(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` readable by its owner only (mode 0600).

    The file is created with mode 0600 from the start (never world-readable, even briefly)
    and replaced atomically when ``overwrite`` is true.

    Parameters
    ----------
    path : str or Path
        Destination file.
    data : bytes
        Secret content (a PEM or OpenSSH private key).
    overwrite : bool
        Replace an existing file. Without it an existing file is an error, so a key is
        never lost by accident.

    Returns
    -------
    Path
        The written path.
    """
    return _write(Path(path), data, PRIVATE_MODE, overwrite=overwrite)


def write_public(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write a public file (certificate, public key) with mode 0644."""
    return _write(Path(path), data, PUBLIC_MODE, overwrite=overwrite)


def _write(path: Path, data: bytes, mode: int, *, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise DeployError(
            f"{path} already exists; refusing to overwrite it (a key or certificate would be "
            "lost). Choose another --out directory or pass --force to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # umask may have removed bits we want (0644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_private_mode(path: str | Path) -> None:
    """Raise :class:`DeployError` when a private key file is readable by group or others."""
    p = Path(path)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise DeployError(
            f"private key {p} has mode {mode:04o}: group/others can read it; "
            f"run `chmod 600 {p}`"
        )
