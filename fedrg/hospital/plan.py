"""One immutable plan per message: every privacy number a hospital uses, computed once.

:func:`plan_training` (a ``train`` message) and :func:`plan_release` (an evaluation release)
turn the hospital's own policy, the checked request (:func:`fedrg.hospital.request.check_request`),
its training-set size and its verified ledger into a frozen :class:`RoundPlan`: sample rate,
steps, delta, accountant, noise multiplier, the run's and the lifetime epsilon before and after,
the release reserve. DP-SGD, the ledger entry, the reply and the evaluation read the plan;
nothing recomputes any of it. Each rule has one definition, which the audit imports too:

* sample rate and steps: :mod:`fedrg.train.schedule`;
* delta: :meth:`fedrg.policy.SitePolicy.delta_for`;
* the noise of one evaluation release: :func:`release_noise_multiplier`;
* the releases a run reserves room for: :func:`releases_reserved` (from the policy, never
  from the request's ``fraction_evaluate``);
* the per-run cap: ``min(request target_epsilon, policy.epsilon_per_run)``, fixed by
  :func:`~fedrg.hospital.request.check_request`, checked for every release, evaluation included;
* the lifetime budget and the run cap: :func:`fedrg.privacy.mechanism.within_budget`,
  :func:`~fedrg.privacy.mechanism.within_run_cap`.

A plan that would pass the run's cap or the lifetime budget is refused or declined before any
patient file is read. Training is planned *within what is left*: when the lifetime budget
cannot hold the whole run at the noise its cap allows, sigma is raised so that it does, and
the plan says so (``budget_limited``); when even that is below the policy's noise floor, the
round is declined up front, before anything is spent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedrg.config import ExperimentConfig
from fedrg.errors import BudgetExceededError, PolicyViolationError, PrivacyError
from fedrg.hospital.replies import DeclinedError
from fedrg.policy import SitePolicy
from fedrg.privacy.accounting import PrivacyHistory, calibrate_noise_multiplier, epsilon_of
from fedrg.privacy.ledger import NON_PRIVATE, LedgerEntry
from fedrg.privacy.mechanism import within_budget, within_run_cap
from fedrg.privacy.release import sensitivity
from fedrg.train.schedule import local_steps, poisson_sample_rate

TRAIN = "train"
RELEASE = "evaluation"


@dataclass(frozen=True)
class Spent:
    """What the dataset has spent, from its verified ledger (:meth:`from_ledger`).

    Attributes
    ----------
    lifetime : PrivacyHistory
        Every DP mechanism ever run on the dataset (all runs, releases included).
    run : PrivacyHistory
        The DP mechanisms of this run alone.
    releases_this_run : int
        Evaluation releases this run has made (DP or exact).
    """

    lifetime: PrivacyHistory = field(default_factory=PrivacyHistory)
    run: PrivacyHistory = field(default_factory=PrivacyHistory)
    releases_this_run: int = 0

    @classmethod
    def from_ledger(cls, entries: Sequence[LedgerEntry], run_id: str) -> Spent:
        """The one reading of a ledger into spent privacy (non-private entries spend no DP)."""
        private = [e for e in entries if e.private and e.steps > 0]
        return cls(lifetime=PrivacyHistory([e.segment for e in private]),
                   run=PrivacyHistory([e.segment for e in private if e.run_id == run_id]),
                   releases_this_run=sum(1 for e in entries
                                         if e.run_id == run_id and e.kind == RELEASE))


def release_noise_multiplier(policy: SitePolicy, *, target_delta: float) -> float:
    """Sigma of one evaluation release: one Gaussian mechanism (sample rate 1, one step)
    calibrated to ``policy.evaluation.epsilon_per_release`` at ``target_delta``.

    Raises
    ------
    DeclinedError
        ``evaluation_epsilon_unreachable`` when no Gaussian release meets that epsilon.
    """
    ev = policy.evaluation
    try:
        return calibrate_noise_multiplier(target_epsilon=ev.epsilon_per_release,
                                          target_delta=target_delta, sample_rate=1.0, steps=1,
                                          accountant=policy.accountant)
    except PrivacyError as err:
        raise DeclinedError("evaluation_epsilon_unreachable", (
            f"policy.evaluation.epsilon_per_release={ev.epsilon_per_release} cannot be met by one "
            f"Gaussian release at delta {target_delta:g} with the {policy.accountant} accountant "
            f"({err}); raise it in the hospital's [policy.evaluation]")) from None


def releases_reserved(policy: SitePolicy, *, rounds: int) -> int:
    """How many DP evaluation releases a run of ``rounds`` rounds keeps room for.

    From the policy only (at most one of the starting adapter and one per trained round, at
    most ``policy.evaluation.max_releases_per_run``), whatever the request says about evaluation:
    a server that asks for no evaluation while training and then for releases still finds
    the run's cap checked against every release.
    """
    if policy.evaluation.release != "dp":
        return 0
    # the starting adapter (round 0) and each trained round
    return min(int(rounds) + 1, policy.evaluation.max_releases_per_run)


@dataclass(frozen=True)
class RoundPlan:
    """What the hospital will do for one message, fixed before any patient file is read.

    ``n_train`` never leaves the site; :meth:`ledger_fields` is what the signed ledger entry
    records, :meth:`reply_meta` what the reply carries (numbers the ledger releases too).
    """

    kind: str
    run_id: str
    round: int
    private: bool
    n_train: int
    sample_rate: float
    steps: int
    target_delta: float
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    budget: float
    epsilon_run_cap: float
    epsilon_run_before: float
    epsilon_run_after: float
    epsilon_lifetime_before: float
    epsilon_lifetime_after: float
    lifetime_history: PrivacyHistory = field(repr=False)
    releases_reserved: int = 0
    release_noise_multiplier: float | None = None
    replanned: bool = False
    budget_limited: bool = False
    #: ``'local'`` (all the noise added here) or ``'distributed'`` (this site adds its share;
    #: the secure sum of at least ``honest_peers + 1`` hospitals carries ``noise_multiplier``)
    noise_mode: str = "local"
    honest_peers: int = 0
    noise_share: float = 1.0

    @property
    def noise_multiplier_added(self) -> float:
        """The noise multiplier of what this site adds itself (its share of the round's)."""
        return self.noise_multiplier * self.noise_share

    @property
    def expected_batch_size(self) -> float:
        """Divisor of the summed clipped gradients (``q * n``)."""
        return self.sample_rate * self.n_train

    @property
    def ledger_accountant(self) -> str:
        """The accountant the ledger records (``'none'`` for a non-private entry)."""
        return self.accountant if self.private else NON_PRIVATE

    def ledger_fields(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`fedrg.privacy.ledger.Ledger.append` the plan fixes."""
        return {"run_id": self.run_id, "round": self.round,
                "noise_multiplier": self.noise_multiplier if self.private else 0.0,
                "sample_rate": self.sample_rate, "steps": self.steps,
                "max_grad_norm": self.max_grad_norm, "accountant": self.ledger_accountant,
                "target_delta": self.target_delta, "epsilon": self.epsilon_lifetime_after,
                "budget": self.budget, "kind": self.kind}

    def ledger_details(self) -> dict[str, Any]:
        """What the entry's ``details`` record about the noise (distributed noise: the mode,
        the honest peers assumed and the share added here; ``fedrg audit`` recomputes it)."""
        if self.noise_mode == "local":
            return {}
        return {"noise": self.noise_mode, "honest_peers": self.honest_peers,
                "noise_multiplier_added": self.noise_multiplier_added}

    def reply_meta(self) -> dict[str, Any]:
        """What the reply says about privacy: this run's and the lifetime epsilon after the
        message (as the ledger entry records them) and whether it was private."""
        return {"epsilon": self.epsilon_run_after, "epsilon_lifetime": self.epsilon_lifetime_after,
                "private": self.private}


def _refuse(setting: str, requested: object, allowed: str) -> PolicyViolationError:
    return PolicyViolationError(setting=setting, requested=requested, allowed=allowed)


def _site_delta(policy: SitePolicy, n_train: int) -> float:
    """``policy.delta_for(n_train)``, refused when it is not well below ``1/n`` (the message
    names the policy setting, never ``n``)."""
    delta = policy.delta_for(n_train)
    if delta >= 1.0 / max(n_train, 1):
        raise _refuse("policy.target_delta", delta, "a delta well below 1/n for this site's "
                      "cohort (a mechanism that publishes one patient's record is already "
                      "(0, 1/n)-DP); lower target_delta in the hospital's [policy] or leave it "
                      "unset (min(1e-5, 1/(10 n)))")
    return delta


def _eps(history: PrivacyHistory, delta: float, accountant: str) -> float:
    return epsilon_of(history, target_delta=delta, accountant=accountant) if history.total_steps else 0.0


def plan_schedule(cfg: ExperimentConfig, policy: SitePolicy, *, n_train: int) -> tuple[float, int]:
    """The round's Poisson sample rate and step count for ``n_train`` training patients,
    refused when outside the policy (the first check of :func:`plan_training`).

    Parameters
    ----------
    cfg : ExperimentConfig
        The effective config (``training.batch_size``, ``training.local_epochs``).
    policy : SitePolicy
        The hospital's policy (``max_sample_rate``, ``max_local_steps``, ``noise``).
    n_train : int
        Training patients.

    Returns
    -------
    tuple[float, int]
        The sample rate ``q`` and the steps of one round.

    Raises
    ------
    PolicyViolationError
        A batch too large for the cohort (sample rate above the policy's) or too many steps.
    """
    t = cfg.training
    q = poisson_sample_rate(batch_size=t.batch_size, n_records=n_train)
    if q > policy.max_sample_rate:
        raise _refuse("training.batch_size", t.batch_size,
                      f"a batch of at most policy.max_sample_rate={policy.max_sample_rate} of "
                      "this site's training patients; ask for a smaller batch")
    distributed = policy.noise == "distributed" and cfg.privacy.enabled
    # distributed noise covers one noisy step per release (docs/privacy.md): one step a round
    steps = 1 if distributed else local_steps(local_epochs=t.local_epochs,
                                              batch_size=t.batch_size, n_records=n_train)
    if steps > policy.max_local_steps:
        raise _refuse("training.local_epochs", t.local_epochs,
                      f"at most policy.max_local_steps={policy.max_local_steps} steps per round "
                      f"at training.batch_size={t.batch_size} on this site; ask for fewer local "
                      "epochs or a larger batch")
    return q, steps


def plan_training(cfg: ExperimentConfig, policy: SitePolicy, *, n_train: int, spent: Spent,
                  run_id: str, round_: int, state_dir: str | None = None) -> RoundPlan:
    """Plan one training round from the hospital's own policy, cohort size and ledger.

    Parameters
    ----------
    cfg : ExperimentConfig
        The effective config (:func:`fedrg.hospital.request.check_request`).
    policy : SitePolicy
        The hospital's policy.
    n_train : int
        Training patients (privacy units); stays on site.
    spent : Spent
        What the dataset spent so far (:meth:`Spent.from_ledger` of its verified ledger).
    run_id, round_ : str, int
        This run and round.
    state_dir : str, optional
        Where a calibration without prior spend is cached
        (:func:`fedrg.privacy.calibration.cached_noise_multiplier`).

    Returns
    -------
    RoundPlan
        sigma calibrated by the hospital so that the whole run, with the releases the policy
        reserves, stays within the run's cap and within the lifetime budget.

    Raises
    ------
    PolicyViolationError
        Sample rate, steps or sigma outside the policy, or no room left in the run's cap
        (no message carries a number computed from ``n_train``).
    BudgetExceededError
        When not even the smallest step fits in the lifetime budget.
    """
    q, steps = plan_schedule(cfg, policy, n_train=n_train)
    distributed = policy.noise == "distributed" and cfg.privacy.enabled
    delta = _site_delta(policy, n_train)
    acc = policy.accountant
    lifetime, run = spent.lifetime, spent.run
    spent_life = _eps(lifetime, delta, acc)
    spent_run = _eps(run, delta, acc)
    cap = cfg.privacy.target_epsilon  # min(request, policy.epsilon_per_run): check_request
    common: dict[str, Any] = dict(
        kind=TRAIN, run_id=run_id, round=round_, n_train=n_train, sample_rate=q, steps=steps,
        target_delta=delta, accountant=acc, max_grad_norm=cfg.privacy.max_grad_norm,
        budget=policy.epsilon_budget, epsilon_run_cap=cap, epsilon_run_before=spent_run,
        epsilon_lifetime_before=spent_life, lifetime_history=lifetime)
    if not cfg.privacy.enabled:
        return RoundPlan(private=False, noise_multiplier=0.0, epsilon_run_after=spent_run,
                         epsilon_lifetime_after=spent_life, **common)
    reserved = releases_reserved(policy, rounds=cfg.federation.rounds)
    sigma_release = release_noise_multiplier(policy, target_delta=delta) if reserved else None
    reserve_left = PrivacyHistory()
    if sigma_release is not None:
        reserve_left = PrivacyHistory([(sigma_release, 1.0, max(reserved - spent.releases_this_run, 0))])
    left = cfg.federation.rounds - round_ + 1
    replanned = budget_limited = False
    if cfg.privacy.noise_multiplier is not None:
        sigma = float(cfg.privacy.noise_multiplier)
    else:
        sigma, replanned = _run_sigma(cap, delta, acc, q=q, steps=steps, rounds=cfg.federation.rounds,
                                      left=left, run=run, reserved=reserved,
                                      sigma_release=sigma_release, reserve_left=reserve_left,
                                      state_dir=state_dir, spent=spent_run)
        # within what the lifetime budget has left (the whole remaining run, releases included)
        rest = (lifetime + reserve_left).extended(noise_multiplier=sigma, sample_rate=q,
                                                  steps=steps * left)
        if not within_budget(_eps(rest, delta, acc), policy.epsilon_budget):
            budget_limited = True
            try:
                sigma = max(sigma, calibrate_noise_multiplier(
                    target_epsilon=policy.epsilon_budget, target_delta=delta, sample_rate=q,
                    steps=steps * left, accountant=acc, prior=lifetime + reserve_left))
            except PrivacyError:
                raise BudgetExceededError(epsilon_spent=spent_life, epsilon_after=math.inf,
                                          budget=policy.epsilon_budget) from None
    if sigma < policy.min_noise_multiplier:
        why = ("the lifetime budget left" if budget_limited else "this run's epsilon cap")
        raise _refuse("privacy.noise_multiplier" + ("" if cfg.privacy.noise_multiplier is not None
                                                    else " (calibrated)"),
                      "fixed" if cfg.privacy.noise_multiplier is None else sigma,
                      f">= policy.min_noise_multiplier={policy.min_noise_multiplier}: {why} "
                      f"cannot hold {left} more round(s) of this request above the noise floor; "
                      "ask for fewer steps or rounds, or a lower target_epsilon")
    life_after = _eps(lifetime.extended(noise_multiplier=sigma, sample_rate=q, steps=steps), delta, acc)
    if not within_budget(life_after, policy.epsilon_budget):
        raise BudgetExceededError(epsilon_spent=spent_life, epsilon_after=life_after,
                                  budget=policy.epsilon_budget)
    run_after = _eps(run.extended(noise_multiplier=sigma, sample_rate=q, steps=steps), delta, acc)
    if not within_run_cap(run_after, cap):
        raise _refuse("privacy.noise_multiplier", sigma,
                      f"a sigma that keeps this run within epsilon {cap:.4g} (spent "
                      f"{spent_run:.4g} so far)")
    return RoundPlan(private=True, noise_multiplier=sigma, epsilon_run_after=run_after,
                     epsilon_lifetime_after=life_after, releases_reserved=reserved,
                     release_noise_multiplier=sigma_release, replanned=replanned,
                     budget_limited=budget_limited, noise_mode=policy.noise,
                     honest_peers=policy.distributed_honest_peers if distributed else 0,
                     noise_share=policy.noise_share, **common)


def _run_sigma(cap: float, delta: float, acc: str, *, q: float, steps: int, rounds: int, left: int,
               run: PrivacyHistory, reserved: int, sigma_release: float | None,
               reserve_left: PrivacyHistory, state_dir: str | None,
               spent: float) -> tuple[float, bool]:
    """Sigma for the whole run within ``cap`` (calibrated once; re-planned for the rounds left
    when this run already spent more than planned). Returns ``(sigma, replanned)``."""
    reserve = (PrivacyHistory([(sigma_release, 1.0, reserved)])
               if sigma_release is not None and reserved else PrivacyHistory())
    try:
        if state_dir is not None and not reserve.total_steps:
            from fedrg.privacy.calibration import cached_noise_multiplier

            sigma = cached_noise_multiplier(state_dir, target_epsilon=cap, target_delta=delta,
                                            sample_rate=q, steps=steps * rounds, accountant=acc)
        else:
            sigma = calibrate_noise_multiplier(
                target_epsilon=cap, target_delta=delta, sample_rate=q, steps=steps * rounds,
                accountant=acc, prior=reserve if reserve.total_steps else None)
        if run.total_steps:
            projected = _eps((run + reserve_left).extended(
                noise_multiplier=sigma, sample_rate=q, steps=steps * left), delta, acc)
            if not within_run_cap(projected, cap):
                return calibrate_noise_multiplier(
                    target_epsilon=cap, target_delta=delta, sample_rate=q, steps=steps * left,
                    accountant=acc, prior=run + reserve_left), True
    except PrivacyError as err:
        raise _refuse("privacy.target_epsilon", cap, f"room left in this run's cap {cap:.4g} "
                      f"(spent {spent:.4g}; {err})") from None
    return sigma, False


def plan_release(cfg: ExperimentConfig, policy: SitePolicy, *, n_train: int, spent: Spent,
                 run_id: str, round_: int) -> RoundPlan:
    """Plan one evaluation release (a Gaussian mechanism on validation aggregates).

    Every release is checked against this run's cap and the lifetime budget, however the
    training rounds were planned. With ``policy.evaluation.release = 'exact'`` the release
    is non-private (no noise, recorded as such).

    Raises
    ------
    DeclinedError
        ``evaluation_not_released`` (policy ``release = 'none'``),
        ``evaluation_epsilon_unreachable`` or ``evaluation_run_cap``.
    BudgetExceededError
        When the release would pass the lifetime budget.
    """
    ev = policy.evaluation
    if ev.release == "none":
        raise DeclinedError("evaluation_not_released", "this hospital's policy releases no "
                       "evaluation metrics (evaluation.release = 'none')")
    delta = _site_delta(policy, n_train)
    acc = policy.accountant
    lifetime, run = spent.lifetime, spent.run
    spent_life = _eps(lifetime, delta, acc)
    spent_run = _eps(run, delta, acc)
    cap = min(cfg.privacy.target_epsilon, policy.epsilon_per_run)
    common: dict[str, Any] = dict(
        kind=RELEASE, run_id=run_id, round=round_, n_train=n_train, sample_rate=1.0, steps=1,
        target_delta=delta, accountant=acc, max_grad_norm=sensitivity(len(cfg.data.markers)),
        budget=policy.epsilon_budget, epsilon_run_cap=cap, epsilon_run_before=spent_run,
        epsilon_lifetime_before=spent_life, lifetime_history=lifetime)
    if ev.release == "exact":
        return RoundPlan(private=False, noise_multiplier=0.0, epsilon_run_after=spent_run,
                         epsilon_lifetime_after=spent_life, **common)
    sigma = release_noise_multiplier(policy, target_delta=delta)
    run_after = _eps(run.extended(noise_multiplier=sigma, sample_rate=1.0, steps=1), delta, acc)
    if not within_run_cap(run_after, cap):
        raise DeclinedError("evaluation_run_cap", (
            f"this run already spent epsilon {spent_run:.4f}; one more release would take it "
            f"to {run_after:.4f}, past the run's cap {cap:.4g} (policy.epsilon_per_run / the "
            "request's privacy.target_epsilon)"))
    life_after = _eps(lifetime.extended(noise_multiplier=sigma, sample_rate=1.0, steps=1), delta, acc)
    if not within_budget(life_after, policy.epsilon_budget):
        raise BudgetExceededError(epsilon_spent=spent_life, epsilon_after=life_after,
                                  budget=policy.epsilon_budget)
    return RoundPlan(private=True, noise_multiplier=sigma, epsilon_run_after=run_after,
                     epsilon_lifetime_after=life_after, release_noise_multiplier=sigma, **common)
