"""Noise calibration cached in a hospital's state directory (checked again on every read).

Calibrating sigma for a planned federation (:func:`fedrg.privacy.accounting.
calibrate_noise_multiplier`) is a pure function of ``(target_epsilon, target_delta,
sample_rate, steps, accountant)`` that costs seconds (a bisection over the accountant). Every
round of a run, and every run with the same plan, asks for the same value. The accounting
module memoises it per process; this module adds an on-disk cache in the hospital's own
state directory (``calibration.json``) so a fresh process (a Flower ClientApp, a Ray actor,
a new run) does not redo it.

The file is never trusted blindly: a cached sigma is accepted only if one epsilon
computation (a fraction of the calibration's cost) confirms it spends at most
``target_epsilon`` and at least ``(1 - CALIBRATION_RTOL) * target_epsilon``, the same
contract a fresh calibration meets. A corrupt, edited or stale entry is recomputed and
overwritten; nothing else in the state directory is touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import TypedDict

from fedrg.privacy.accounting import (
    CALIBRATION_RTOL,
    PrivacyHistory,
    calibrate_noise_multiplier,
    epsilon_of,
)

log = logging.getLogger("fedrg.privacy")

CACHE_NAME = "calibration.json"


class _Calibration(TypedDict):
    """The inputs the calibrated sigma is a pure function of (the cache key)."""

    target_epsilon: float
    target_delta: float
    sample_rate: float
    steps: int
    accountant: str


def _key(*, target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
         accountant: str) -> str:
    # repr of floats round-trips exactly: two keys are equal only for identical inputs
    return json.dumps([accountant, repr(float(target_epsilon)), repr(float(target_delta)),
                       repr(float(sample_rate)), int(steps)])


def _meets_target(sigma: float, *, target_epsilon: float, target_delta: float,
                  sample_rate: float, steps: int, accountant: str) -> bool:
    if not (isinstance(sigma, float) and math.isfinite(sigma) and sigma > 0):
        return False
    eps = epsilon_of(PrivacyHistory([(sigma, sample_rate, steps)]), target_delta=target_delta,
                     accountant=accountant)
    return (1 - CALIBRATION_RTOL) * target_epsilon - 1e-9 <= eps <= target_epsilon


def cached_noise_multiplier(state_dir: str | Path | None, *, target_epsilon: float,
                            target_delta: float, sample_rate: float, steps: int,
                            accountant: str = "rdp") -> float:
    """Calibrated noise multiplier for a planned federation, cached in ``state_dir``.

    Parameters
    ----------
    state_dir
        The hospital's state directory (``None``: in-process memo only).
    target_epsilon, target_delta, sample_rate, steps, accountant
        As for :func:`fedrg.privacy.accounting.calibrate_noise_multiplier` (``steps`` is
        the total planned over all rounds).

    Returns
    -------
    float
        Exactly the value a fresh :func:`~fedrg.privacy.accounting.calibrate_noise_multiplier`
        returns for these inputs (a cached value is re-verified against the target before use).
    """
    args: _Calibration = {"target_epsilon": float(target_epsilon), "target_delta": float(target_delta),
            "sample_rate": float(sample_rate), "steps": int(steps), "accountant": accountant}
    if state_dir is None:
        return calibrate_noise_multiplier(**args)
    path = Path(state_dir) / CACHE_NAME
    key = _key(**args)
    entries: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text())
        if isinstance(loaded, dict):
            entries = {k: v for k, v in loaded.items() if isinstance(v, float)}
    cached = entries.get(key)
    if cached is not None:
        if _meets_target(cached, **args):
            return cached
        log.warning("%s: cached noise multiplier %r does not meet target_epsilon=%s; "
                    "recalibrating", path, cached, target_epsilon)
    sigma = calibrate_noise_multiplier(**args)
    entries[key] = sigma
    try:
        from fedrg.files import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(entries, indent=1, sort_keys=True).encode(), mode=0o600)
    except OSError as err:  # a read-only state dir costs time, never the round
        log.warning("could not write the calibration cache %s (%s); it is recomputed next time",
                    path, err)
    return sigma
