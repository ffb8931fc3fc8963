"""Content hash of a local base-model directory (what a site's ``allowed_base_models`` lists).

``sha256`` over the directory's regular files in sorted relative-path order: for each file,
its relative POSIX path, a NUL byte, the sha256 of its bytes and a newline. Renaming,
adding, removing or changing any file changes the hash; the directory's own path does not.
The built-in base is rebuilt from a fixed recipe and is named, not hashed
(:data:`fedrg.policy.BUILTIN_BASE`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedrg.errors import ModelError
from fedrg.files import file_sha256

_CACHE: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def model_content_hash(directory: str | Path) -> str:
    """The content hash of a local model directory.

    Parameters
    ----------
    directory : str or Path
        A directory holding a Hugging Face causal LM and its tokenizer.

    Returns
    -------
    str
        64 hex digits (cached per process while no file's size or mtime changes).

    Raises
    ------
    ModelError
        When ``directory`` is not a directory or holds no file.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ModelError(f"model.base={str(directory)!r} is not a directory; give 'builtin:tiny' "
                         "or a local directory written with save_pretrained")
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ModelError(f"model.base={str(directory)!r} holds no file")
    sig = tuple((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(root.resolve()), sig)
    if key not in _CACHE:
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + file_sha256(p).encode() + b"\n")
        _CACHE[key] = h.hexdigest()
    return _CACHE[key]
