"""Pins on the few library internals fedrg relies on where no public API exists.

Where Flower, Opacus or torch offer no public API for what fedrg needs, exactly one fedrg
module reaches into the library (:mod:`fedrg.deploy.fast_supernode` for Flower's SuperNode
loop, :mod:`fedrg.deploy.pinned_clientapp` for Flower's ClientApp runtime,
:mod:`fedrg.privacy.fused` for Opacus' DP optimizer, :mod:`fedrg.privacy.torch_internals`
for torch's per-sample convolution gradients). That module lists the library
functions its code depends on, each with the SHA-256 of its source as reviewed, and calls
:func:`require_unchanged` before it patches or relies on them. A library whose code differs
is an error naming the library and version, the function, both digests and the fedrg module
to review; never a silent fallback to other behaviour.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
from collections.abc import Mapping

from fedrg.errors import FedrgError


class LibraryChangedError(FedrgError):
    """A library function that fedrg patches or reproduces is not the reviewed code."""

    def public_message(self) -> str:
        return "LibraryChangedError: an installed library differs from the one fedrg was built for"


def source_digest(obj: object) -> str:
    """SHA-256 (hex) of the source of a function, method or class, as :mod:`inspect` reads it.

    Raises
    ------
    LibraryChangedError
        If the source cannot be read (a library installed without its ``.py`` files).
    """
    try:
        source = inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError) as err:
        raise LibraryChangedError(f"cannot read the source of {obj!r} ({err}); fedrg checks "
                                  "it before relying on it: install the library with its "
                                  "source files") from None
    return hashlib.sha256(source.encode()).hexdigest()


def require_unchanged(library: str, pinned: Mapping[str, str], objects: Mapping[str, object],
                      *, module: str) -> None:
    """Raise unless every ``objects[name]`` has the source digest ``pinned[name]``.

    Parameters
    ----------
    library : str
        The distribution name (``"flwr"``, ``"opacus"``), for its version in the message.
    pinned : mapping
        ``qualified name -> SHA-256`` of the reviewed source.
    objects : mapping
        ``qualified name -> the installed function/method`` (same keys as ``pinned``).
    module : str
        The fedrg module that relies on them (named in the message as the one to review).

    Raises
    ------
    LibraryChangedError
        On the first function whose source differs, or a missing/extra name.
    """
    if set(pinned) != set(objects):
        raise LibraryChangedError(f"{module}: pinned names {sorted(pinned)} differ from the "
                                  f"checked names {sorted(objects)}")
    try:
        version = importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed as a distribution)"
    for name in sorted(pinned):
        got = source_digest(objects[name])
        if got != pinned[name]:
            raise LibraryChangedError(
                f"{library} {version}: {name} is not the code {module} was written against "
                f"(source sha256 {got[:16]}..., reviewed {pinned[name][:16]}...). {module} "
                f"patches or reproduces it; review {module} against the installed {library}, "
                "then update its pinned digests, or install the reviewed release")
