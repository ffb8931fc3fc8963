"""``flower-supernode`` with a shorter idle poll (Flower 1.42 sleeps a hard-coded 3 s).

Flower's SuperNode pulls the SuperLink for messages and, when there is none, sleeps 3 s
(``flwr/supernode/start_client_internal.py``); it also checks for a ClientApp's reply every
0.5 s. Each message of a round can therefore wait up to 3 s at every hospital before it is
picked up, and its reply up to another 3 s. Flower has no setting for either, so
``fedrg client`` runs the SuperNode through this module, which replaces only those sleeps
*inside that Flower module* (the ``time`` name it uses) and then runs Flower's own
``flower-supernode`` entry point unchanged:

* the idle pull sleep becomes ``FEDRG_SUPERNODE_POLL_S`` seconds (default 0.5), and
  ``FEDRG_SUPERNODE_ACTIVE_POLL_S`` (default 0.1) for ``ACTIVE_WINDOW_S`` (30 s) after the
  SuperNode last waited for a ClientApp's reply (it does so only for a message it pulled):
  during a run the next message (a round is several) and the ClientApp's reply are picked
  up within 0.1 s, while an idle SuperNode polls no faster than before;
* the 0.5 s reply checks become at most 0.1 s.

Nothing else changes: same arguments, same TLS and authentication, same messages. A
quicker poll means more (small) pull requests at the SuperLink: with hundreds of hospitals
set ``FEDRG_SUPERNODE_POLL_S`` higher.

**Pinned Flower code.** This is the only fedrg module that patches Flower. It patches only
the reviewed ``flwr.supernode.start_client_internal`` (:data:`FLOWER_SOURCES`: the SHA-256
of its source): if the installed Flower's module differs, :func:`patch_supernode_poll`
raises :class:`~fedrg.library_pins.LibraryChangedError` and the SuperNode does not start
(review this module against the new Flower, then update the digest). It never runs a
changed module half-patched or silently unpatched.
"""

from __future__ import annotations

import logging
import os
import sys
import time as _time
import types

from fedrg.library_pins import LibraryChangedError, require_unchanged

POLL_ENV = "FEDRG_SUPERNODE_POLL_S"
ACTIVE_POLL_ENV = "FEDRG_SUPERNODE_ACTIVE_POLL_S"
DEFAULT_POLL_S = 0.5
DEFAULT_ACTIVE_POLL_S = 0.1
ACTIVE_WINDOW_S = 30.0
REPLY_CHECK_S = 0.1
FLOWER_MODULE = "flwr.supernode.start_client_internal"
FLOWER_SOURCES = {
    # flwr 1.42.0: `time.sleep(3)` after an empty pull in start_client_internal, and
    # `time.sleep(0.5)` twice in _push_messages (waiting for the ClientApp's reply)
    FLOWER_MODULE: "d6342f743fdf768f63305b88414ae2654e9a21bda153739da19c608e8d375067",
}
_real_sleep = _time.sleep
_last_message = {"at": -float("inf")}  # monotonic time the SuperNode last awaited a reply
log = logging.getLogger("fedrg.deploy")


def poll_interval(env: str = POLL_ENV, default: float = DEFAULT_POLL_S) -> float:
    """A poll from the environment variable ``env`` (0.05-3 s; default ``default``)."""
    raw = os.environ.get(env, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{env}={raw!r}: give seconds between 0.05 and 3, e.g. {default}") from None
    if not 0.05 <= value <= 3.0:
        raise SystemExit(f"{env}={raw!r}: give seconds between 0.05 and 3, e.g. {default}")
    return value


def flower_module() -> types.ModuleType:
    """Flower's SuperNode loop module, checked to be the reviewed code.

    Raises
    ------
    LibraryChangedError
        If its source is not :data:`FLOWER_SOURCES`, or its ``time`` name is neither the
        ``time`` module nor this module's replacement.
    """
    import flwr.supernode.start_client_internal as sci

    require_unchanged("flwr", FLOWER_SOURCES, {FLOWER_MODULE: sci},
                      module="fedrg.deploy.fast_supernode")
    current = getattr(sci, "time", None)
    if current is not _time and not getattr(current, "_fedrg_shim", False):
        raise LibraryChangedError(
            f"{FLOWER_MODULE}.time is {current!r}, not the time module: something else "
            "replaced it; fedrg.deploy.fast_supernode does not patch over it")
    return sci


def patch_supernode_poll(interval: float, active: float | None = None) -> None:
    """Shorten the SuperNode's sleeps in Flower's module only.

    ``interval`` is the idle poll; ``active`` (default: ``interval``) the poll for
    :data:`ACTIVE_WINDOW_S` seconds after the SuperNode last waited for a ClientApp's reply.

    Raises
    ------
    LibraryChangedError
        If Flower's module is not the reviewed code (:func:`flower_module`).
    """
    sci = flower_module()
    fast = interval if active is None else min(active, interval)

    def sleep(seconds: float) -> None:
        if seconds >= 3:  # the idle pull sleep
            recent = _time.monotonic() - _last_message["at"] < ACTIVE_WINDOW_S
            _real_sleep(fast if recent else interval)
        elif seconds >= 0.5:  # waiting for the reply to a message it pulled: a run is on
            _last_message["at"] = _time.monotonic()
            _real_sleep(min(seconds, REPLY_CHECK_S))
        else:
            _real_sleep(seconds)

    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(_time).items() if not k.startswith("__")})
    shim.sleep = sleep  # type: ignore[attr-defined]
    shim._fedrg_shim = True  # type: ignore[attr-defined]
    sci.time = shim  # type: ignore[attr-defined]


def main() -> int:
    """Run Flower's ``flower-supernode`` with the shorter poll (same arguments)."""
    interval = poll_interval()
    active = poll_interval(ACTIVE_POLL_ENV, DEFAULT_ACTIVE_POLL_S)
    try:
        patch_supernode_poll(interval, active)
    except LibraryChangedError as err:
        raise SystemExit(f"fedrg SuperNode: {err}") from None
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
