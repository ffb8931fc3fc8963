"""Helpers for the ledger/audit tests: write real ledgers whose epsilon comes from Opacus."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedrg.privacy.accounting import RDP_ALPHAS
from fedrg.privacy.ledger import NON_PRIVATE, Ledger, LedgerEntry
from fedrg.privacy.release import sensitivity

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


# --------------------------------------------------------------------------- simulated runs
# Ledgers shaped like `fedrg simulate`'s: per round a DP-SGD or non-private training entry,
# then the round's metric release (a Gaussian DP release, or an exact one: accountant none).

DELTA = 1e-5
# the default synthetic federation's hospital-1: sigma 1.116, q 0.2286, 9 steps a round
SIGMA, Q, STEPS = 1.116, 0.2286, 9
RELEASE_SIGMA = 4.0


def append_round(ledger: Ledger, run_id: str, rnd: int, *, private: bool = True) -> None:
    """A training round as the site records it (site.py `_train`)."""
    history = ledger.history()
    eps = (opacus_epsilon([*history, (SIGMA, Q, STEPS)], delta=DELTA) if private
           else opacus_epsilon(history, delta=DELTA) if history else 0.0)
    ledger.append(run_id=run_id, round=rnd, noise_multiplier=SIGMA if private else 0.0,
                  sample_rate=Q, steps=STEPS, max_grad_norm=1.0,
                  accountant="rdp" if private else NON_PRIVATE, target_delta=DELTA,
                  epsilon=eps, budget=100.0, config_hash=CONFIG_HASH,
                  dataset_fingerprint=FINGERPRINT)


def append_release(ledger: Ledger, run_id: str, rnd: int, *, private: bool) -> None:
    """A metric release as the site records it (a DP release, or `_exact_release`)."""
    history = ledger.history()
    eps = (opacus_epsilon([*history, (RELEASE_SIGMA, 1.0, 1)], delta=DELTA) if private
           else ledger.epsilon_spent())
    ledger.append(run_id=run_id, round=rnd, noise_multiplier=RELEASE_SIGMA if private else 0.0,
                  sample_rate=1.0, steps=1, max_grad_norm=sensitivity(3),
                  accountant="rdp" if private else NON_PRIVATE, target_delta=DELTA,
                  epsilon=eps, budget=100.0, config_hash=CONFIG_HASH,
                  dataset_fingerprint=FINGERPRINT, kind="evaluation",
                  details={"release": rnd, **({} if private else {"exact": True})})


def write_run(state: Path, run_id: str, *, train_dp: bool, release: str | None,
              rounds: int = 3, hospital: str = "hospital-1") -> Ledger:
    """``rounds`` rounds of run ``run_id``: training (DP-SGD or not) and, unless ``release``
    is None, the round's release (``"dp"`` or ``"exact"``)."""
    ledger = Ledger.open(state, hospital=hospital)
    for rnd in range(1, rounds + 1):
        append_round(ledger, run_id, rnd, private=train_dp)
        if release is not None:
            append_release(ledger, run_id, rnd, private=release == "dp")
    return ledger
