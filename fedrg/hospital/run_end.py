"""The hospital's note that the server ended its run normally (``<state_dir>/run-ended.json``).

The server's last message of a deployed run asks every hospital for its public ledger copy
(``ledger``). Answering it, the hospital notes the end of the run; any later message of a
new run removes the note. ``fedrg client`` reads it when the server goes away: with the note
the server finished normally (exit status 0, one line), without it the connection was lost
mid-run (exit status 3). The note is the hospital's own observation, not a claim of the
server's, and decides nothing but that message.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

NOTE = "run-ended.json"


def note_run_end(state_dir: str | Path) -> None:
    """Record that the server asked for the ledger copy, its last message of a run."""
    path = Path(state_dir) / NOTE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"time": time.time()}))
    os.replace(tmp, path)


def clear_run_end(state_dir: str | Path) -> None:
    """A message of a run arrived: the run has not ended (again)."""
    (Path(state_dir) / NOTE).unlink(missing_ok=True)


def run_ended_since(state_dir: str | Path, since: float) -> bool:
    """True when a run ended (its ledger copy was asked for) at or after ``since`` (epoch s)."""
    try:
        return float(json.loads((Path(state_dir) / NOTE).read_text())["time"]) >= since
    except (OSError, ValueError, KeyError, TypeError):
        return False
