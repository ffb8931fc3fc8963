"""The process environment fedrg wants when *it* is the program: offline, no telemetry.

Importing fedrg changes nothing in the host process. The ``fedrg`` command, the Flower
ServerApp/ClientApp modules and fedrg's own child processes call :func:`apply_offline_env`
(they are fedrg's processes); a library user who wants the same for one call wraps it in
:func:`offline_env`, which restores the previous values afterwards. Model loading does not
depend on either: :func:`fedrg.model.base.load_base` passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping

__all__ = ["OFFLINE_ENV", "apply_offline_env", "offline_env", "torch_threads"]

#: No Flower telemetry or update checks, no Hugging Face hub access or telemetry.
OFFLINE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def apply_offline_env(env: MutableMapping[str, str] | None = None) -> None:
    """Set :data:`OFFLINE_ENV` in ``env`` (default ``os.environ``) where not already set.

    Call this only where fedrg owns the process (CLI entry, Flower app modules).
    """
    target = os.environ if env is None else env
    for key, value in OFFLINE_ENV.items():
        target.setdefault(key, value)


@contextlib.contextmanager
def offline_env() -> Iterator[None]:
    """Set :data:`OFFLINE_ENV` (where unset) for the duration of a ``with`` block, then restore."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    apply_offline_env()
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` torch intra-op threads inside the block (0/None = leave as is), then restore."""
    if not threads:
        yield
        return
    import torch  # here, so that the CLI and deploy helpers importing this module stay light

    saved = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(saved)
