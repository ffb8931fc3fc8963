"""Console progress for long phases of ``fedrg simulate`` (rich when a terminal, plain
lines when not)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

PHASES = {
    "train": "local training",
    "secagg_setup": "secure aggregation (keys)",
    "secagg_share": "secure aggregation (shares)",
    "secagg_masked": "secure aggregation (masked updates)",
    "secagg_unmask": "secure aggregation (unmasking)",
    "evaluate": "evaluation",
}


@contextlib.contextmanager
def phase(console: Console, text: str) -> Iterator[None]:
    """A spinner with ``text`` on a terminal; one plain line otherwise."""
    if console.is_terminal:
        with console.status(text):
            yield
    else:
        console.print(f"{text} ...", highlight=False)
        yield


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
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def on_phase(self, action: str, rnd: int, n: int) -> None:
        """Show the phase of round ``rnd`` that starts now."""
        text = f"round {rnd}/{self.rounds}: {PHASES.get(action, action)} at {n} hospital(s)"
        if action == "train" and self.training:
            text += f" ({self.training})"
        if self.progress is not None:
            self.progress.update(self.task, description=text)
        elif action in ("train", "evaluate"):
            self.console.print(text + " ...", highlight=False)

    def round_done(self) -> None:
        """Advance the bar by one round."""
        if self.progress is not None:
            self.progress.advance(self.task)


def last_entry_steps(state_dirs: list[Path], rnd: int) -> list[int]:
    """DP-SGD steps each hospital recorded for round ``rnd`` (its latest training entry of
    that round; evaluation releases and re-initialisations are skipped; public fields only).

    Round ``rnd``'s row can come after the next round's training (its evaluation rides on
    that train message): one training entry of round ``rnd + 1`` after it is skipped too.
    """
    steps = []
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
                steps.append(int(entry["mechanism"]["steps"]))
            break
    return steps
