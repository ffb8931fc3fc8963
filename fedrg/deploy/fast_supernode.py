"""``flower-supernode`` with a shorter idle poll (Flower 1.42 sleeps a hard-coded 3 s).

Flower's SuperNode pulls the SuperLink for messages and, when there is none, sleeps 3 s
(``flwr/supernode/start_client_internal.py``); it also checks for a ClientApp's reply every
0.5 s. Each message of a round can therefore wait up to 3 s at every hospital before it is
picked up, and its reply up to another 3 s. ``fedrg client`` runs the SuperNode through this
module, which replaces only those sleeps *inside that Flower module* (the ``time`` name
it uses) and then runs Flower's own ``flower-supernode`` entry point unchanged:

* the idle pull sleep becomes ``FEDRG_SUPERNODE_POLL_S`` seconds (default 0.5);
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
DEFAULT_POLL_S = 0.5
REPLY_CHECK_S = 0.1
_real_sleep = _time.sleep
log = logging.getLogger("fedrg.deploy")


def poll_interval() -> float:
    """The idle poll from ``FEDRG_SUPERNODE_POLL_S`` (0.05-3 s; default 0.5 s)."""
    raw = os.environ.get(POLL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_POLL_S
    except ValueError:
        raise SystemExit(f"{POLL_ENV}={raw!r}: give seconds between 0.05 and 3, e.g. 0.5") from None
    if not 0.05 <= value <= 3.0:
        raise SystemExit(f"{POLL_ENV}={raw!r}: give seconds between 0.05 and 3, e.g. 0.5")
    return value


def patch_supernode_poll(interval: float) -> bool:
    """Shorten the SuperNode's sleeps in Flower's module only; ``False`` if it is not there."""
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return False
    if getattr(sci, "time", None) is not _time:
        return False  # not the Flower module this was written for: leave it alone

    def sleep(seconds: float) -> None:
        if seconds >= 3:
            _real_sleep(interval)
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
    if not patch_supernode_poll(interval):
        log.warning("Flower's SuperNode module changed: running it with its own 3 s poll")
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
