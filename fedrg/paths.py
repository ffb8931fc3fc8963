"""Well-known locations (cache for built-in models and synthetic cohorts)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root cache directory: ``$FEDRG_CACHE`` or ``~/.cache/fedrg`` (created on demand)."""
    root = Path(os.environ.get("FEDRG_CACHE") or Path.home() / ".cache" / "fedrg")
    root.mkdir(parents=True, exist_ok=True)
    return root


def ensure_writable(directory: str | os.PathLike[str], *, setting: str) -> Path:
    """Create ``directory`` if needed and prove it is writable, before any work starts.

    Parameters
    ----------
    directory
        An output directory (run directory, ``--out``).
    setting
        The option or setting that named it, for the message (``"--out"``).

    Returns
    -------
    Path
        The directory.

    Raises
    ------
    FedrgError
        When it cannot be created or written; the message names the setting, the path,
        the reason and the fix.
    """
    import tempfile

    from fedrg.errors import FedrgError

    path = Path(directory)
    try:
        if path.exists() and not path.is_dir():
            raise FedrgError(f"{setting} {path} is a file, not a directory; choose a directory "
                             "path (it is created if missing)")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fedrg-write-test-"):
            pass
    except OSError as err:
        raise FedrgError(
            f"{setting} {path} is not writable ({err.strerror or err}); choose a directory you "
            "can write to, or fix its permissions. Nothing was started."
        ) from None
    return path
