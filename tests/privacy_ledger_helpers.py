"""Helpers for the ledger/audit tests: write real ledgers whose epsilon comes from Opacus."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedrg.privacy.accounting import RDP_ALPHAS
from fedrg.privacy.ledger import Ledger, LedgerEntry

CONFIG_HASH = "c0" * 32
FINGERPRINT = "f1" * 32


def opacus_epsilon(
    segments: Sequence[tuple[float, float, int]], *, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``segments`` recorded the way the training code records it (Opacus)."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, n in segments:  # one Opacus evaluation per distinct mechanism (faster)
        merged[(sigma, q)] = merged.get((sigma, q), 0) + n
    if accountant == "rdp":  # what RDPAccountant.get_epsilon does, one-step curves cached
        orders = list(RDP_ALPHAS)
        total = sum(n * _one_step_rdp(sigma, q) for (sigma, q), n in merged.items())
        eps, _ = get_privacy_spent(orders=orders, rdp=total, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, q, n) for (sigma, q), n in merged.items()]
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def _one_step_rdp(sigma: float, q: float) -> np.ndarray:
    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                  orders=list(RDP_ALPHAS)))


def write_ledger(
    state_dir: Path,
    rounds: Sequence[tuple[str, int, float, float, int]],
    *,
    hospital: str = "hospital-1",
    delta: float = 1e-5,
    budget: float = 10.0,
    accountant: str = "rdp",
    max_grad_norm: float = 1.0,
) -> tuple[Ledger, list[LedgerEntry]]:
    """Append ``rounds`` = [(run_id, round, noise_multiplier, sample_rate, steps)], each with
    the cumulative Opacus epsilon over the ledger's whole history."""
    ledger = Ledger.open(state_dir, hospital=hospital)
    written = []
    for run_id, rnd, sigma, q, steps in rounds:
        segs = [*ledger.history(), (sigma, q, steps)]
        eps = opacus_epsilon(segs, delta=delta, accountant=accountant)
        written.append(ledger.append(
            run_id=run_id, round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps,
            max_grad_norm=max_grad_norm, accountant=accountant, target_delta=delta,
            epsilon=eps, budget=budget, config_hash=CONFIG_HASH,
            dataset_fingerprint=FINGERPRINT,
        ))
    return ledger, written


STANDARD_ROUNDS = [
    ("run-a", 1, 1.1, 0.05, 30),
    ("run-a", 2, 1.1, 0.05, 30),
    ("run-a", 3, 1.1, 0.05, 30),
    ("run-b", 1, 0.9, 0.04, 25),
    ("run-b", 2, 0.9, 0.04, 25),
]
