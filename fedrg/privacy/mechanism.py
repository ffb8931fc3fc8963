"""The recorded form of a DP mechanism, shared by the ledger and the budget (pure, no I/O).

Kept apart from :mod:`fedrg.privacy.ledger` (which writes files) so that budget checks and
accounting depend only on this plain record.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["EPS_TOL", "MechanismSegment"]

#: Slack for float comparisons of epsilon against the budget / the previous entry.
EPS_TOL = 1e-9


class MechanismSegment(NamedTuple):
    """One stretch of DP-SGD steps with fixed parameters (Opacus accountant history form)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
