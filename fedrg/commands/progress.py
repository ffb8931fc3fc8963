"""Console progress for long phases of ``fedrg simulate`` (rich when a terminal, plain
lines when not)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fedrg.privacy.ledger import NON_PRIVATE

if TYPE_CHECKING:
    from fedrg.audit.coverage import Coverage

PHASES = {
    "train": "local training",
    "secagg_setup": "secure aggregation (keys)",
    "secagg_share": "secure aggregation (shares)",
    "secagg_masked": "secure aggregation (masked updates)",
    "secagg_unmask": "secure aggregation (unmasking)",
    "evaluate": "evaluation",
}


@contextlib.contextmanager
def phase(console: Console, text: str) -> Iterator[Callable[[str], None]]:
    """A spinner with ``text`` on a terminal; one plain line otherwise.

    Yields a function that reports a step within the phase: the spinner shows it on a
    terminal, otherwise it is printed as an indented line with the phase's elapsed seconds
    (so a log written without a terminal shows progress too).
    """
    t0 = time.perf_counter()
    if console.is_terminal:
        with console.status(text) as status:
            def update(step: str) -> None:
                status.update(f"{text}: {step}")

            yield update
    else:
        console.print(f"{text} ...", highlight=False)

        def say(step: str) -> None:
            console.print(f"  {step} ({time.perf_counter() - t0:.0f}s)", highlight=False)

        yield say


class RoundProgress:
    """Rounds done out of planned, the phase of the current round and its elapsed time.

    ``on_phase(action, round, n)`` is called (from the ServerApp's thread) before each
    exchange with the hospitals; :meth:`round_done` after each round.
    """

    def __init__(self, console: Console, *, rounds: int, start_round: int = 1,
                 training: str = "") -> None:
        self.console = console
        self.rounds = rounds
        self.training = training
        self.progress: Progress | None = None
        self.task = None
        if console.is_terminal:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=16),
                MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
            self.task = self.progress.add_task("starting the simulation engine",
                                               total=rounds, completed=start_round - 1)

    def __enter__(self) -> RoundProgress:
        if self.progress is not None:
            self.progress.start()
        else:
            self.console.print("starting the simulation engine (Ray) ...", highlight=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def on_phase(self, action: str, rnd: int, n: int) -> None:
        """Show the phase of round ``rnd`` that starts now."""
        text = f"round {rnd}/{self.rounds}: {PHASES.get(action, action)} at {n} hospital(s)"
        if action == "train" and self.training:
            text += f" ({self.training})"
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=text)
        elif action in ("train", "evaluate"):
            self.console.print(text + " ...", highlight=False)

    def round_done(self) -> None:
        """Advance the bar by one round."""
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)


def last_train_entries(state_dirs: list[Path], rnd: int) -> list[dict[str, Any]]:
    """Each hospital's training entry for round ``rnd`` (its latest training entry of that
    round; evaluation releases and re-initialisations are skipped; public fields only, as
    parsed JSON: ``hospital``, ``mechanism``...).

    Round ``rnd``'s row can come after the next round's training (its evaluation rides on
    that train message): one training entry of round ``rnd + 1`` after it is skipped too.
    """
    found = []
    for d in state_dirs:
        try:
            lines = (Path(d) / "ledger.jsonl").read_text().splitlines()
        except OSError:
            continue
        skipped_next = False
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                break
            if entry.get("kind", "train") != "train":
                continue
            if entry.get("round") == rnd + 1 and not skipped_next:
                skipped_next = True
                continue
            if entry.get("round") == rnd:
                found.append(entry)
            break
    return found


def last_entry_steps(state_dirs: list[Path], rnd: int) -> list[int]:
    """DP-SGD steps each hospital recorded for round ``rnd`` (:func:`last_train_entries`)."""
    return [int(e["mechanism"]["steps"]) for e in last_train_entries(state_dirs, rnd)]


def entry_is_dp(entry: dict[str, Any]) -> bool:
    """True when a parsed ledger entry is a DP mechanism (an accountant and noise)."""
    mech = entry.get("mechanism") or {}
    return mech.get("accountant") != NON_PRIVATE and (
        float(mech.get("noise_multiplier", 0.0)) > 0.0 or int(mech.get("steps", 0)) == 0)


def run_coverage(state_dirs: list[Path], run_id: str) -> dict[str, Coverage]:
    """What each hospital's entries of run ``run_id`` were: DP-SGD rounds, rounds without
    DP, DP and exact releases (:func:`fedrg.audit.coverage.coverage_of`), by hospital name.

    Read for the console only (not verified); a ledger that cannot be read is left out.
    """
    from fedrg.audit.coverage import coverage_of
    from fedrg.privacy.ledger import LedgerEntry

    out: dict[str, Coverage] = {}
    for d in state_dirs:
        try:
            lines = (Path(d) / "ledger.jsonl").read_text().splitlines()
            entries = [LedgerEntry.from_dict(json.loads(line)) for line in lines if line]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        mine = [e for e in entries if e.run_id == run_id]
        if mine:
            out[mine[-1].hospital] = coverage_of(mine)
    return out


def rounds_without_dp(state_dirs: list[Path], run_id: str) -> dict[int, set[str]]:
    """Round -> the hospitals whose training entry of that round in run ``run_id`` was made
    without DP (read for the console only)."""
    out: dict[int, set[str]] = {}
    for d in state_dirs:
        try:
            lines = (Path(d) / "ledger.jsonl").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                break
            if (entry.get("run_id") == run_id and entry.get("kind", "train") == "train"
                    and not entry_is_dp(entry)):
                out.setdefault(int(entry["round"]), set()).add(str(entry.get("hospital")))
    return out
