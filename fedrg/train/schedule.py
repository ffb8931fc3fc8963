"""The local loop's schedule: its Poisson sample rate and its number of steps, defined once.

DP-SGD (:mod:`fedrg.privacy.dpsgd`), the hospital's round plan (:mod:`fedrg.hospital.plan`),
the ledger entry it writes, ``fedrg train`` and the audit all take these two numbers from here
(``tests/test_layout.py`` fails if a second formula appears). Pure: no torch, no I/O.
"""

from __future__ import annotations

import math

from fedrg.errors import PrivacyError


def poisson_sample_rate(*, batch_size: int, n_records: float) -> float:
    """Poisson sample rate ``q = batch_size / n_records`` (at most 1).

    Parameters
    ----------
    batch_size : int
        The expected (logical) batch size.
    n_records : float
        Training records (patients, the privacy unit); the canary audit passes an expected
        count.

    Returns
    -------
    float
        ``min(1, batch_size / n_records)``.

    Raises
    ------
    PrivacyError
        For an empty training set.
    """
    if n_records < 1:
        raise PrivacyError("cannot sample from an empty training set")
    return min(1.0, batch_size / n_records)


def local_steps(*, local_epochs: float, batch_size: int, n_records: int) -> int:
    """Steps of one round: ``ceil(local_epochs * n_records / batch_size)``, at least 1.

    Parameters
    ----------
    local_epochs : float
        Expected passes over the training set.
    batch_size : int
        The expected (logical) batch size.
    n_records : int
        Training records; 0 gives 0 steps.

    Returns
    -------
    int
        The number of (DP-)SGD steps.
    """
    if n_records <= 0:
        return 0
    return max(1, math.ceil(local_epochs * n_records / batch_size))
