"""Opt-in experiment tracking: the per-round rows of metrics.json as TensorBoard scalars.

The round loop hands each row it appends to ``metrics.json`` to every tracker
(:func:`open_trackers`, from ``[tracking]``). Files are written locally (TensorBoard event
files under ``tracking.dir``, default ``RUN_DIR/tracking``); nothing is sent anywhere. The
rows hold what the server already has: aggregate metrics, epsilon per hospital, bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedrg.config import TrackingConfig
from fedrg.errors import ConfigError

__all__ = ["RoundTracker", "TensorBoardTracker", "flatten_row", "open_trackers"]


class RoundTracker(Protocol):
    """Receives each round's metrics row; closed once at the end of the run."""

    def log_round(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def flatten_row(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics row as ``{"auroc/idh_mutant": 0.8, ...}``.

    Booleans, strings, lists, ``None`` and non-finite numbers are left out; ``round`` is the step.
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_row(value, prefix=f"{name}/"))
        elif (isinstance(value, (int, float)) and not isinstance(value, bool) and name != "round"
              and math.isfinite(float(value))):
            out[name] = float(value)
    return out


class TensorBoardTracker:
    """Writes each row's numeric values as scalars at step ``row["round"]``.

    Parameters
    ----------
    log_dir
        Folder for the event files (created).
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                f"tracking.tensorboard = true needs the tensorboard package ({err}); install it "
                "with `pip install tensorboard` or set tracking.tensorboard = false"
            ) from None
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Add every numeric value of ``row`` as a scalar and flush to disk."""
        step = int(row.get("round", 0))
        for tag, value in sorted(flatten_row(row).items()):
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


def open_trackers(cfg: TrackingConfig, run_dir: str | Path) -> list[RoundTracker]:
    """The trackers ``cfg`` turns on (none by default)."""
    root = Path(cfg.dir) if cfg.dir else Path(run_dir) / "tracking"
    trackers: list[RoundTracker] = []
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker(root / "tensorboard"))
    return trackers
