"""Progress lines while a deployment runs: new lines of files that other processes append to.

``fedrg client`` follows the hospital's own privacy ledger (one entry per trained round) and
the app-refusal log; ``fedrg server`` follows the run's ``metrics.json`` (rewritten after
every round). Nothing here talks to Flower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class LineFollower:
    """Yields the complete lines appended to a file since the last call."""

    def __init__(self, path: str | Path, *, from_start: bool = False) -> None:
        self.path = Path(path)
        self.offset = 0
        if not from_start and self.path.is_file():
            self.offset = self.path.stat().st_size

    def new_lines(self) -> list[str]:
        """Complete new lines (a half-written last line waits for the next call)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # replaced by a shorter file: start again
            self.offset = 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(size - self.offset)
        end = data.rfind(b"\n")
        if end == -1:
            return []
        self.offset += end + 1
        return [line for line in data[:end].decode(errors="replace").split("\n") if line]


def ledger_line(entry: dict[str, Any]) -> str:
    """One hospital progress line from a ledger entry, by its ``kind``.

    A training entry says the round, its DP-SGD steps (or that it was not private) and the
    epsilon spent and left; an evaluation release says that metrics were released (with DP
    or exactly), never that the round was trained; a re-initialisation says so. The ledger's
    ``epsilon`` is the cumulative (lifetime) epsilon after the entry.
    """
    mech = entry.get("mechanism") or {}
    eps = float(entry.get("epsilon", 0.0))
    budget = float(entry.get("budget", 0.0))
    who = entry.get("hospital", "hospital")
    spent = (f"epsilon spent {eps:.3f} of {budget:g} ({max(budget - eps, 0.0):.3f} left, "
             f"delta {entry.get('delta')})")
    kind = entry.get("kind", "train")
    private = mech.get("accountant") not in (None, "none")
    if kind == "evaluation":
        how = "with DP" if private else "exactly (no DP)"
        return f"{who}: round {entry.get('round')} evaluation metrics released {how}, {spent}"
    if kind == "reinit":
        return f"{who}: privacy ledger re-initialised, {spent}"
    if not private:
        return f"{who}: round {entry.get('round')} trained WITHOUT DP (ledgered), {spent}"
    return f"{who}: round {entry.get('round')} trained, {mech.get('steps', '?')} DP-SGD steps, {spent}"


def ledger_lines(follower: LineFollower) -> list[str]:
    """Progress lines for the ledger entries appended since the last call."""
    out = []
    for raw in follower.new_lines():
        try:
            out.append(ledger_line(json.loads(raw)))
        except (ValueError, TypeError, AttributeError):
            continue
    return out


class MetricsFollower:
    """New per-round rows of a run's ``metrics.json`` (rewritten atomically every round)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.seen = 0
        self.mtime = 0.0

    def new_rounds(self) -> list[dict[str, Any]]:
        """Rows of rounds finished since the last call."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return []
        if mtime == self.mtime:
            return []
        try:
            rows = json.loads(self.path.read_text()).get("rounds", [])
        except (ValueError, OSError):
            return []  # caught mid-write: next call
        self.mtime = mtime
        new = rows[self.seen:]
        self.seen = len(rows)
        return [r for r in new if isinstance(r, dict)]


def round_line(row: dict[str, Any], markers: list[str]) -> str:
    """One server progress line: participants, loss, AUROC per marker (with its noise
    interval when DP-released), epsilon per hospital, whose releases the metrics are."""
    from fedrg.federated.report import metric_interval, metric_text, release_text

    auroc = row.get("auroc") or {}
    eps = row.get("epsilon") or {}
    parts = [f"round {row.get('round')}", f"{row.get('participants', 0)} hospital(s) trained",
             f"loss {row['loss']:.4f}" if isinstance(row.get("loss"), (int, float)) else "loss -"]
    parts += [f"AUROC {m} {metric_text(row, 'auroc', m)}" for m in markers
              if isinstance(auroc.get(m), (int, float)) or metric_interval(row, "auroc", m)]
    if eps:
        parts.append("epsilon " + ", ".join(f"{h} {v:.3f}" for h, v in sorted(eps.items())
                                            if isinstance(v, (int, float))))
    if row.get("declined"):
        parts.append(f"declined: {', '.join(map(str, row['declined']))}")
    if release_text(row):
        parts.append(release_text(row))
    if row.get("reason"):
        parts.append(str(row["reason"]))
    return "  ".join(parts)
