"""Distributed noise in a ledger, recomputed: does each entry's share add up to its noise?

A hospital with ``policy.noise = 'distributed'`` records, for every training round, the
noise multiplier of the *secure sum* (what the accountant uses), the number of honest peers
it assumed and the noise multiplier it added itself. The audit recomputes the share from the
one rule (:func:`fedrg.policy.noise_share`) and checks the entry is one noisy step, as the
analysis requires (docs/privacy.md, distributed noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedrg.policy import noise_share
from fedrg.privacy.ledger import LedgerEntry

DISTRIBUTED = "distributed"


def is_distributed(entry: LedgerEntry) -> bool:
    """True when ``entry`` records a round with distributed noise."""
    return entry.details.get("noise") == DISTRIBUTED


def distributed_noise_problems(entries: Sequence[LedgerEntry]) -> list[str]:
    """Problems of the entries that claim distributed noise (an empty list: none).

    Each must be a training round of one step, assume at least one honest peer, and record
    the share ``noise_multiplier * noise_share(honest_peers)`` it added.
    """
    problems = []
    for e in entries:
        if not is_distributed(e):
            continue
        where = f"entry {e.seq} (run {e.run_id}, round {e.round})"
        h = e.details.get("honest_peers")
        added = e.details.get("noise_multiplier_added")
        if e.kind != "train" or e.steps != 1:
            problems.append(f"{where}: distributed noise covers one noisy training step per "
                            f"round, this entry records {e.steps} step(s) of kind {e.kind!r}")
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            problems.append(f"{where}: distributed noise without a valid honest-peer "
                            f"assumption ({h!r})")
            continue
        want = e.noise_multiplier * noise_share(noise=DISTRIBUTED, honest_peers=h)
        if not isinstance(added, (int, float)) or not math.isclose(added, want, rel_tol=1e-9):
            problems.append(f"{where}: records noise multiplier {added!r} added by the hospital, "
                            f"but {h} honest peers and a sum at {e.noise_multiplier:.4g} mean "
                            f"{want:.6g}")
    return problems
