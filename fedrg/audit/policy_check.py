"""Check a hospital's ledger against its site policy (``fedrg audit --policy FILE``).

Every entry must carry the hash of the policy given (so it was made under it), and its
mechanism must lie inside that policy: DP on where required, the site's delta and
accountant, the noise floor, the caps on clipping norm, sample rate, steps, rounds, the
per-run and lifetime epsilon, and the evaluation releases. Entries written before site
policies (ledger version 1) carry no policy hash and are reported as such.

No torch; reads only the policy file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from fedrg.policy import SitePolicy
from fedrg.privacy.ledger import LedgerEntry
from fedrg.privacy.mechanism import within_budget, within_run_cap

#: The audit recomputes a run's epsilon with its own accountant: 0.1 % slack on the cap.
AUDIT_RUN_CAP_RTOL = 1e-3


def check_entries(
    entries: Sequence[LedgerEntry],
    policy: SitePolicy,
    *,
    run_epsilon: Callable[[Sequence[LedgerEntry]], float],
) -> tuple[list[str], list[str]]:
    """Problems and warnings of ``entries`` against ``policy``.

    Parameters
    ----------
    entries : sequence of LedgerEntry
        The verified ledger entries, in order.
    policy : SitePolicy
        The policy the auditor holds for this hospital.
    run_epsilon : callable
        Epsilon of a run's own entries (the audit's independent accountant).

    Returns
    -------
    tuple[list[str], list[str]]
        ``(problems, warnings)``; any problem fails the audit.
    """
    problems: list[str] = []
    warnings: list[str] = []
    want = policy.policy_hash()
    old = [e.seq for e in entries if e.version < 2]
    if old:
        problems.append(
            f"{len(old)} entr{'y' if len(old) == 1 else 'ies'} (seq {_span(old)}) predate site "
            "policies (ledger version 1, no policy_hash): they cannot be checked against the "
            "policy given")
    for e in entries:
        if e.version < 2:
            continue
        where = f"entry {e.seq} (run {e.run_id}, round {e.round}, {e.kind})"
        if e.policy_hash != want:
            problems.append(f"{where}: made under policy {(e.policy_hash or '-')[:12]}, not the "
                            f"policy given ({want[:12]})")
        if e.kind == "reinit":
            continue
        if e.accountant != policy.accountant:
            problems.append(f"{where}: accountant {e.accountant!r}, the policy fixes "
                            f"{policy.accountant!r}")
        if policy.target_delta is not None and not math.isclose(e.delta, policy.target_delta):
            problems.append(f"{where}: delta {e.delta:g}, the policy fixes {policy.target_delta:g}")
        elif policy.target_delta is None and e.delta > policy.max_delta() * (1 + 1e-9):
            problems.append(f"{where}: delta {e.delta:g} above the policy's "
                            f"min({policy.max_delta():g}, 1/(10 n))")
        if e.budget > policy.epsilon_budget * (1 + 1e-9):
            problems.append(f"{where}: budget {e.budget:g} above the policy's lifetime budget "
                            f"{policy.epsilon_budget:g}")
        if not within_budget(e.epsilon, policy.epsilon_budget):
            problems.append(f"{where}: cumulative epsilon {e.epsilon:.4f} passes the policy's "
                            f"lifetime budget {policy.epsilon_budget:g}")
        if e.kind == "train" and e.steps > 0 and e.noise_multiplier > 0.0:
            mode = e.details.get("noise", "local")
            if mode != policy.noise:
                problems.append(f"{where}: {mode} noise, the policy adds noise "
                                f"{policy.noise}ly")
            elif mode == "distributed" and e.details.get("honest_peers") != policy.distributed_honest_peers:
                problems.append(f"{where}: assumed {e.details.get('honest_peers')} honest peers, "
                                f"the policy assumes {policy.distributed_honest_peers}")
        if e.kind == "train" and e.steps > 0:
            if e.noise_multiplier == 0.0 and policy.require_dp:
                problems.append(f"{where}: trained without DP noise; the policy requires DP")
            elif e.noise_multiplier < policy.min_noise_multiplier:
                problems.append(f"{where}: noise multiplier {e.noise_multiplier:.4g} below the "
                                f"policy's floor {policy.min_noise_multiplier:g}")
            if e.steps > policy.max_local_steps:
                problems.append(f"{where}: {e.steps} steps, the policy allows "
                                f"{policy.max_local_steps} per round")
            if e.sample_rate > policy.max_sample_rate * (1 + 1e-9):
                problems.append(f"{where}: sample rate {e.sample_rate:.4g} above the policy's "
                                f"{policy.max_sample_rate:g}")
            if e.max_grad_norm > policy.max_grad_norm_cap * (1 + 1e-9):
                problems.append(f"{where}: clipping norm {e.max_grad_norm:g} above the policy's "
                                f"cap {policy.max_grad_norm_cap:g}")
        if e.kind == "evaluation" and policy.evaluation.release == "none":
            problems.append(f"{where}: an evaluation release, but the policy releases no "
                            "metrics (evaluation.release = 'none')")
    runs: dict[str, list[LedgerEntry]] = {}
    for e in entries:
        if e.kind != "reinit":
            runs.setdefault(e.run_id, []).append(e)
    for run_id, run in runs.items():
        train_rounds = {e.round for e in run if e.kind == "train"}
        if len(train_rounds) > policy.max_rounds_per_run:
            problems.append(f"run {run_id}: {len(train_rounds)} rounds, the policy allows "
                            f"{policy.max_rounds_per_run}")
        releases = [e for e in run if e.kind == "evaluation"]
        if len(releases) > policy.evaluation.max_releases_per_run:
            problems.append(f"run {run_id}: {len(releases)} evaluation releases, the policy "
                            f"allows {policy.evaluation.max_releases_per_run}")
        eps = run_epsilon(run)
        if not within_run_cap(eps, policy.epsilon_per_run, rtol=AUDIT_RUN_CAP_RTOL):
            problems.append(f"run {run_id}: recomputed epsilon {eps:.4f} of this run alone passes "
                            f"the policy's per-run cap {policy.epsilon_per_run:g}")
    return problems, warnings


def _span(seqs: list[int]) -> str:
    return str(seqs[0]) if len(seqs) == 1 else f"{seqs[0]}-{seqs[-1]}"
