"""The hospital side of the site policy: a server's experiment config is only a request.

:func:`check_request` runs before any patient file is read and needs no data: it refuses a
request the policy forbids (DP off, secure aggregation off, a low Shamir threshold, too few
peers in the round, too many rounds, an unlisted base model, a fixed sigma below the floor,
oversized model or image dimensions) and returns the *effective* config, in which every
privacy value the site fixes (accountant, clipping cap, per-run epsilon cap, validation
split) is the policy's. :func:`plan_under_policy` then plans the round from the hospital's
own training-set size and its own ledger: delta from the policy, sample rate and steps
checked against their caps, sigma calibrated by the hospital from its per-run cap (and
re-planned when this run has already spent some of it), the floor on sigma enforced.

Every refusal is a :class:`~fedrg.errors.PolicyViolationError` naming the setting, the
requested value and the allowed range; :func:`refusal_reply` turns it into the typed reply
(no data, no paths).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedrg.config import ExperimentConfig
from fedrg.errors import FedrgError, PolicyViolationError, PrivacyError
from fedrg.policy import BUILTIN_BASE, SitePolicy

REFUSAL_REASON = "policy_violation"
#: Relative slack when comparing a planned run epsilon with the per-run cap.
RUN_CAP_RTOL = 1e-6

#: Largest sizes a server message may ask a hospital to allocate (memory / CPU bounds).
LIMITS: dict[str, int | float] = {
    "data.image_shape (each side, 2d)": 1024,
    "data.image_shape (each side, 3d)": 256,
    "model.encoder_width": 1024,
    "model.lora_rank": 256,
    "model.image_tokens": 64,
    "model.genomics_tokens": 64,
    "model.max_report_tokens": 1024,
    "training.local_epochs": 100.0,
    "training.max_physical_batch_size": 1024,
}


def _refuse(setting: str, requested: object, allowed: str) -> PolicyViolationError:
    return PolicyViolationError(setting=setting, requested=requested, allowed=allowed)


def check_sizes(cfg: ExperimentConfig) -> None:
    """Refuse model, image and loop sizes beyond :data:`LIMITS` (and threads beyond the CPUs).

    Raises
    ------
    PolicyViolationError
        Naming the first oversized setting and its limit.
    """
    side_key = f"data.image_shape (each side, {cfg.data.image_mode})"
    if max(cfg.data.image_shape) > LIMITS[side_key]:
        raise _refuse("data.image_shape", cfg.data.image_shape, f"each side <= {LIMITS[side_key]}")
    for key in ("model.encoder_width", "model.lora_rank", "model.image_tokens",
                "model.genomics_tokens", "model.max_report_tokens", "training.local_epochs",
                "training.max_physical_batch_size"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value > LIMITS[key]:
            raise _refuse(key, value, f"<= {LIMITS[key]}")
    cpus = os.cpu_count() or 1
    if cfg.training.threads > cpus:
        raise _refuse("training.threads", cfg.training.threads, f"0..{cpus} (this machine's CPUs)")


def base_model_id(base: str) -> str:
    """``'builtin:tiny'`` by name, a local directory by its content hash."""
    if base == BUILTIN_BASE:
        return BUILTIN_BASE
    from fedrg.model.fingerprint import model_content_hash

    return model_content_hash(base)


def check_base_model(base: str, policy: SitePolicy) -> None:
    """Refuse a base model whose name/content hash the policy does not list."""
    allowed = {a.removeprefix("sha256:") for a in policy.allowed_base_models}
    if base == BUILTIN_BASE:
        ok = BUILTIN_BASE in allowed
    else:
        try:
            ok = base_model_id(base) in allowed
        except FedrgError:  # not a readable model directory: not an allowed model either
            ok = False
    if not ok:
        shown = ", ".join(policy.allowed_base_models) or "none"
        raise _refuse("model.base", base, f"a model in policy.allowed_base_models ({shown}); "
                      "`fedrg model-hash DIR` prints a directory's content hash")


def check_request(cfg: ExperimentConfig, policy: SitePolicy, *, round_: int,
                  hospitals_in_round: int | None) -> ExperimentConfig:
    """Check a train request against the policy before any data is read.

    Parameters
    ----------
    cfg : ExperimentConfig
        The server's request.
    policy : SitePolicy
        The hospital's own policy.
    round_ : int
        The round the server asks for.
    hospitals_in_round : int or None
        How many hospitals the server says take part in this round (this one included).

    Returns
    -------
    ExperimentConfig
        The effective config: accountant, clipping norm (capped), per-run epsilon cap and the
        validation split are the policy's; everything else is the request's.

    Raises
    ------
    PolicyViolationError
        When the request is outside the policy.
    """
    check_sizes(cfg)
    p, s = cfg.privacy, cfg.secagg
    if policy.require_dp and not p.enabled:
        raise _refuse("privacy.enabled", False, "true (policy.require_dp)")
    if policy.require_secagg and not s.enabled:
        raise _refuse("secagg.enabled", False, "true (policy.require_secagg)")
    if s.enabled and s.threshold_fraction < policy.min_threshold_fraction:
        raise _refuse("secagg.threshold_fraction", s.threshold_fraction,
                      f">= {policy.min_threshold_fraction} (policy.min_threshold_fraction)")
    if s.enabled:
        others = None if hospitals_in_round is None else int(hospitals_in_round) - 1
        if others is None or others < policy.min_secagg_peers:
            raise _refuse("hospitals in the round", hospitals_in_round,
                          f">= {policy.min_secagg_peers + 1} (this hospital and at least "
                          f"{policy.min_secagg_peers} others, policy.min_secagg_peers)")
    rounds = cfg.federation.rounds
    if rounds > policy.max_rounds_per_run:
        raise _refuse("federation.rounds", rounds, f"<= {policy.max_rounds_per_run} "
                      "(policy.max_rounds_per_run)")
    if not 1 <= round_ <= rounds:
        raise _refuse("round", round_, f"1..{rounds} (federation.rounds of the request)")
    check_base_model(cfg.model.base, policy)
    if p.enabled and p.noise_multiplier is not None and p.noise_multiplier < policy.min_noise_multiplier:
        raise _refuse("privacy.noise_multiplier", p.noise_multiplier,
                      f">= {policy.min_noise_multiplier} (policy.min_noise_multiplier)")
    privacy = p.model_copy(update={
        "accountant": policy.accountant,
        "max_grad_norm": min(p.max_grad_norm, policy.max_grad_norm_cap),
        "target_epsilon": min(p.target_epsilon, policy.epsilon_per_run),
    })
    data = cfg.data.model_copy(update={"val_fraction": policy.val_fraction,
                                       "split_seed": policy.split_seed})
    return cfg.model_copy(update={"privacy": privacy, "data": data})


@dataclass(frozen=True)
class PolicyPlan:
    """One round as the hospital will run it (no data touched to make it)."""

    private: bool
    sample_rate: float
    steps: int
    target_delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: float = 0.0
    epsilon_run_cap: float = math.inf
    epsilon_run_spent: float = 0.0
    replanned: bool = False

    def to_meta(self) -> dict[str, Any]:
        """Aggregate plan numbers a reply may carry (no data)."""
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps, "target_delta": self.target_delta,
                "accountant": self.accountant, "replanned": self.replanned}


def plan_under_policy(cfg: ExperimentConfig, policy: SitePolicy, *, n_train: int, round_: int,
                      run_history: Sequence[tuple[float, float, int]] = (),
                      release_noise_multiplier: float | None = None, releases_per_run: int = 0,
                      releases_done: int = 0, state_dir: str | None = None) -> PolicyPlan:
    """Plan a round from the hospital's own ``n_train`` and this run's ledger history.

    Parameters
    ----------
    cfg : ExperimentConfig
        The effective config from :func:`check_request`.
    policy : SitePolicy
        The hospital's policy.
    n_train : int
        The hospital's training-set size (privacy units).
    round_ : int
        This round.
    run_history : sequence of (noise_multiplier, sample_rate, steps)
        What this run (same run id) already spent at this hospital, from its own ledger.
    release_noise_multiplier, releases_per_run, releases_done : optional
        The run's planned evaluation releases (Gaussian mechanisms charged to the same ledger,
        see :mod:`fedrg.privacy.release`) and how many of them ``run_history`` already holds:
        sigma leaves room for them, so training and releases together stay within the cap.
    state_dir : str, optional
        The hospital's state directory: a calibration without prior spend is cached there
        (:func:`fedrg.privacy.calibration.cached_noise_multiplier`, re-verified on read).

    Returns
    -------
    PolicyPlan
        sigma calibrated by the hospital so that the whole run stays within
        ``min(request target_epsilon, policy.epsilon_per_run)``; re-planned for the rounds
        left when earlier rounds of this run (a resumed run, a repeated round) already spent
        part of it.

    Raises
    ------
    PolicyViolationError
        Sample rate, steps or sigma outside the policy, or no room left in the run's cap.
    """
    from fedrg.privacy.accounting import (
        PrivacyHistory,
        calibrate_noise_multiplier,
        epsilon_of,
        local_steps,
        poisson_sample_rate,
    )

    t = cfg.training
    q = poisson_sample_rate(batch_size=t.batch_size, n_records=n_train)
    if q > policy.max_sample_rate:
        raise _refuse("training.batch_size", t.batch_size,
                      f"<= {math.floor(policy.max_sample_rate * n_train)} for this site "
                      f"(sample rate <= {policy.max_sample_rate}, policy.max_sample_rate)")
    steps = local_steps(local_epochs=t.local_epochs, batch_size=t.batch_size, n_records=n_train)
    if steps > policy.max_local_steps:
        raise _refuse("training.local_epochs", t.local_epochs,
                      f"at most {policy.max_local_steps} steps per round "
                      f"(policy.max_local_steps; this request makes {steps})")
    delta = policy.delta_for(n_train)
    common = {"sample_rate": q, "steps": steps, "target_delta": delta,
              "accountant": policy.accountant, "max_grad_norm": cfg.privacy.max_grad_norm}
    if not cfg.privacy.enabled:
        return PolicyPlan(private=False, **common)
    cap = cfg.privacy.target_epsilon  # already min(request, policy.epsilon_per_run)
    acc = policy.accountant
    past = PrivacyHistory([tuple(s) for s in run_history])
    reserve = reserve_left = PrivacyHistory()
    if release_noise_multiplier is not None and releases_per_run > 0:
        reserve = PrivacyHistory([(release_noise_multiplier, 1.0, releases_per_run)])
        left_releases = max(releases_per_run - releases_done, 0)
        reserve_left = PrivacyHistory([(release_noise_multiplier, 1.0, left_releases)])
    spent = epsilon_of(past, target_delta=delta, accountant=acc) if past.total_steps else 0.0
    left = cfg.federation.rounds - round_ + 1
    replanned = False
    if cfg.privacy.noise_multiplier is not None:
        sigma = float(cfg.privacy.noise_multiplier)
        after = epsilon_of(past.extended(noise_multiplier=sigma, sample_rate=q, steps=steps),
                           target_delta=delta, accountant=acc)
        if after > cap * (1 + RUN_CAP_RTOL):
            raise _refuse("privacy.noise_multiplier", sigma,
                          f"a sigma that keeps this run within epsilon {cap:.4g} (this round "
                          f"would take it from {spent:.4g} to {after:.4g})")
    else:
        try:
            if state_dir is not None and not reserve.total_steps:
                from fedrg.privacy.calibration import cached_noise_multiplier

                sigma = cached_noise_multiplier(state_dir, target_epsilon=cap, target_delta=delta,
                                                sample_rate=q, steps=steps * cfg.federation.rounds,
                                                accountant=acc)
            else:
                sigma = calibrate_noise_multiplier(target_epsilon=cap, target_delta=delta,
                                                   sample_rate=q, steps=steps * cfg.federation.rounds,
                                                   accountant=acc,
                                                   prior=reserve if reserve.total_steps else None)
            if past.total_steps:
                projected = epsilon_of((past + reserve_left).extended(
                    noise_multiplier=sigma, sample_rate=q, steps=steps * left),
                    target_delta=delta, accountant=acc)
                if projected > cap * (1 + RUN_CAP_RTOL):
                    replanned = True
                    sigma = calibrate_noise_multiplier(target_epsilon=cap, target_delta=delta,
                                                       sample_rate=q, steps=steps * left,
                                                       accountant=acc, prior=past + reserve_left)
        except PrivacyError as err:
            raise _refuse("privacy.target_epsilon", cfg.privacy.target_epsilon,
                          f"room left in this run's cap {cap:.4g} (spent {spent:.4g}; {err})"
                          ) from None
    if sigma < policy.min_noise_multiplier:
        raise _refuse("privacy.noise_multiplier (calibrated)", round(sigma, 4),
                      f">= {policy.min_noise_multiplier} (policy.min_noise_multiplier); ask "
                      "for fewer steps or rounds, or a lower target_epsilon")
    return PolicyPlan(private=True, noise_multiplier=sigma, epsilon_run_cap=cap,
                      epsilon_run_spent=spent, replanned=replanned, **common)


def refusal_reply(err: PolicyViolationError) -> dict[str, Any]:
    """The typed reply of a refused request (setting, allowed range; never data)::

        {"status": "declined", "reason": "policy_violation", "setting": str,
         "requested": str, "allowed": str, "message": str}
    """
    return {"status": "declined", "reason": REFUSAL_REASON, "setting": err.setting,
            "requested": repr(err.requested), "allowed": err.allowed,
            "message": err.public_message()}
