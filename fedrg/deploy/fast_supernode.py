"""``flower-supernode`` with a shorter idle poll (Flower 1.42 sleeps a hard-coded 3 s).

Flower's SuperNode pulls the SuperLink for messages and, when there is none, sleeps 3 s
(``flwr/supernode/start_client_internal.py``); it also checks for a ClientApp's reply every
0.5 s. Each message of a round can therefore wait up to 3 s at every hospital before it is
picked up, and its reply up to another 3 s. ``fedrg client`` runs the SuperNode through this
module, which replaces only those sleeps *inside that Flower module* (the ``time`` name
it uses) and then runs Flower's own ``flower-supernode`` entry point unchanged:

* the idle pull sleep becomes ``FEDRG_SUPERNODE_POLL_S`` seconds (default 0.5), and
  ``FEDRG_SUPERNODE_ACTIVE_POLL_S`` (default 0.1) for ``ACTIVE_WINDOW_S`` (30 s) after a
  message arrived: during a run the next message (a round is several) and the ClientApp's
  reply are picked up within 0.1 s, while an idle SuperNode polls no faster than before;
* the 0.5 s reply checks become at most 0.1 s.

Nothing else changes: same arguments, same TLS and authentication, same messages. A
quicker poll means more (small) pull requests at the SuperLink: with hundreds of hospitals
set ``FEDRG_SUPERNODE_POLL_S`` higher. If Flower's module no longer looks as expected, the
SuperNode runs unpatched.
"""

from __future__ import annotations

import logging
import os
import sys
import time as _time
import types

POLL_ENV = "FEDRG_SUPERNODE_POLL_S"
ACTIVE_POLL_ENV = "FEDRG_SUPERNODE_ACTIVE_POLL_S"
DEFAULT_POLL_S = 0.5
DEFAULT_ACTIVE_POLL_S = 0.1
ACTIVE_WINDOW_S = 30.0
REPLY_CHECK_S = 0.1
_real_sleep = _time.sleep
_last_message = {"at": -float("inf")}  # monotonic time the SuperNode last received a message
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


def patch_supernode_poll(interval: float, active: float | None = None) -> bool:
    """Shorten the SuperNode's sleeps in Flower's module only; ``False`` if it is not there.

    ``interval`` is the idle poll; ``active`` (default: ``interval``) the poll for
    :data:`ACTIVE_WINDOW_S` seconds after a message arrived.
    """
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return False
    if getattr(sci, "time", None) is not _time:
        return False  # not the Flower module this was written for: leave it alone
    fast = interval if active is None else min(active, interval)
    pull = getattr(sci, "_pull_and_store_message", None)
    if fast < interval and callable(pull) and not getattr(pull, "_fedrg_noted", False):

        def noting_pull(*args: object, **kwargs: object) -> object:
            run_id = pull(*args, **kwargs)
            if run_id is not None:  # a message arrived: more of the run will follow
                _last_message["at"] = _time.monotonic()
            return run_id

        noting_pull._fedrg_noted = True  # type: ignore[attr-defined]
        sci._pull_and_store_message = noting_pull  # type: ignore[assignment]

    def sleep(seconds: float) -> None:
        if seconds >= 3:
            recent = _time.monotonic() - _last_message["at"] < ACTIVE_WINDOW_S
            _real_sleep(fast if recent else interval)
        elif seconds >= 0.5:
            _real_sleep(min(seconds, REPLY_CHECK_S))
        else:
            _real_sleep(seconds)

    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(_time).items() if not k.startswith("__")})
    shim.sleep = sleep  # type: ignore[attr-defined]
    sci.time = shim
    return True


def main() -> int:
    """Run Flower's ``flower-supernode`` with the shorter poll (same arguments)."""
    interval = poll_interval()
    active = poll_interval(ACTIVE_POLL_ENV, DEFAULT_ACTIVE_POLL_S)
    if not patch_supernode_poll(interval, active):
        log.warning("Flower's SuperNode module changed: running it with its own 3 s poll")
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
