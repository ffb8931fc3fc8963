"""Writing secret and public files with the right permissions (deployment wording of
:mod:`fedrg.files`: an existing key or certificate is refused unless ``overwrite``)."""

from __future__ import annotations

import stat
from pathlib import Path

from fedrg.errors import DeployError
from fedrg.files import PRIVATE_MODE, PUBLIC_MODE, atomic_write

__all__ = ["PRIVATE_MODE", "PUBLIC_MODE", "check_private_mode", "write_private", "write_public"]


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
    return atomic_write(path, data, mode=mode)


def check_private_mode(path: str | Path) -> None:
    """Raise :class:`DeployError` when a private key file is readable by group or others."""
    p = Path(path)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise DeployError(
            f"private key {p} has mode {mode:04o}: group/others can read it; "
            f"run `chmod 600 {p}`"
        )
