"""A server's experiment config is only a request: the hospital checks it before any data.

:func:`check_request` needs no data: it refuses a request the policy forbids (DP off, secure
aggregation off, a low Shamir threshold, too few peers in the round, too many rounds, an
unlisted base model, a fixed sigma below the floor, oversized model or image dimensions)
and returns the *effective* config, in which every privacy value the site fixes (clipping
cap, per-run epsilon cap, validation split) is the policy's. The round itself is then
planned once from the hospital's own cohort size and ledger (:mod:`fedrg.hospital.plan`).

Every refusal is a :class:`~fedrg.errors.PolicyViolationError` naming the setting, the
requested value and the allowed range, never a number computed from patient data; the
typed reply is made in :mod:`fedrg.hospital.replies`.
"""

from __future__ import annotations

import os

from fedrg.config import ExperimentConfig
from fedrg.errors import FedrgError, PolicyViolationError
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
    if s.enabled and (hospitals_in_round is None
                      or int(hospitals_in_round) < policy.min_secure_sum_size):
        raise _refuse("hospitals in the round", hospitals_in_round,
                      f">= {policy.min_secure_sum_size} (this hospital and at least "
                      f"{policy.min_secagg_peers} others, policy.min_secagg_peers)")
    if policy.noise == "distributed" and p.enabled and p.hospital_level:
        raise _refuse("privacy.hospital_level", True, "false: this site adds patient-level "
                      "noise shares to a secure sum (policy.noise = 'distributed'), not "
                      "hospital-level noise")
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
        "max_grad_norm": min(p.max_grad_norm, policy.max_grad_norm_cap),
        "target_epsilon": min(p.target_epsilon, policy.epsilon_per_run),
    })
    return with_site_split(cfg.model_copy(update={"privacy": privacy}), policy)


def with_site_split(cfg: ExperimentConfig, policy: SitePolicy) -> ExperimentConfig:
    """``cfg`` with the site's own validation split (``policy.val_fraction``, ``split_seed``):
    training and every evaluation release use the hospital's split, never the request's."""
    data = cfg.data.model_copy(update={"val_fraction": policy.val_fraction,
                                       "split_seed": policy.split_seed})
    return cfg.model_copy(update={"data": data})
