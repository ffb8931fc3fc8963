"""Atomic run checkpoints: global adapter, server optimiser state, metrics so far, and the
last round's evaluation still to be asked for (it rides on the next train message)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedrg.errors import FedrgError
from fedrg.files import fsync_dir

CHECKPOINT_DIR = "checkpoint"


@dataclass
class RunCheckpoint:
    """Everything the server needs to continue a run after round ``round``."""

    round: int
    global_arrays: list[np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    metrics: dict[str, Any]
    config_hash: str
    run_id: str
    #: round ``round``'s metrics row waiting for its evaluation
    #: (:meth:`fedrg.federated.evaluation_fold.PendingEvaluation.to_json`); None when none
    pending_evaluation: dict[str, Any] | None = None


def save_checkpoint(run_dir: str | Path, ckpt: RunCheckpoint) -> Path:
    """Write ``run_dir/checkpoint`` atomically (temp dir + rename); returns its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / CHECKPOINT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
    try:
        save_file({f"{i:05d}": np.ascontiguousarray(a) for i, a in enumerate(ckpt.global_arrays)},
                  str(tmp / "global.safetensors"))
        if ckpt.optimizer_state:
            save_file({k: np.ascontiguousarray(v) for k, v in ckpt.optimizer_state.items()},
                      str(tmp / "server_optimizer.safetensors"))
        state = {"round": ckpt.round, "config_hash": ckpt.config_hash, "run_id": ckpt.run_id,
                 "metrics": ckpt.metrics, "pending_evaluation": ckpt.pending_evaluation}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = run_dir / (CHECKPOINT_DIR + ".old")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        fsync_dir(run_dir)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(run_dir: str | Path) -> RunCheckpoint:
    """Read the latest checkpoint of ``run_dir`` (or the backup if a save was interrupted)."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_DIR
    if not (path / "state.json").is_file():
        backup = run_dir / (CHECKPOINT_DIR + ".old")
        if (backup / "state.json").is_file():
            path = backup
        else:
            raise FedrgError(f"no checkpoint in run directory {run_dir}; --resume needs a run that "
                             "finished at least one round (look for RUN/checkpoint/state.json)")
    state = json.loads((path / "state.json").read_text())
    arrays = load_file(str(path / "global.safetensors"))
    opt_path = path / "server_optimizer.safetensors"
    opt = load_file(str(opt_path)) if opt_path.is_file() else {}
    return RunCheckpoint(
        round=int(state["round"]),
        global_arrays=[arrays[k] for k in sorted(arrays)],
        optimizer_state=opt,
        metrics=state["metrics"],
        config_hash=state["config_hash"],
        run_id=state["run_id"],
        pending_evaluation=state.get("pending_evaluation"),
    )


def completed_rounds(run_dir: str | Path) -> int | None:
    """Rounds finished by the run in ``run_dir`` per its checkpoint (or the backup of an
    interrupted save), with their metrics row recorded; ``None`` when there is no readable
    checkpoint.

    A round whose evaluation is still pending (it rides on the next train message) is not
    counted: a resumed run still asks for it and records its row.
    """
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        state = Path(run_dir) / name / "state.json"
        if state.is_file():
            try:
                obj = json.loads(state.read_text())
                return int(obj["round"]) - (1 if obj.get("pending_evaluation") else 0)
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return None
