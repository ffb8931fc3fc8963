"""A hospital's own privacy policy: what it will do with its patients' data, whatever is asked.

The server's experiment config is only a *request*. Every privacy-relevant value a hospital
uses (DP on or off, delta, the accountant, the noise floor, steps, rounds, the validation
split, secure aggregation and its peers, the base model, how metrics leave) comes from the
:class:`SitePolicy` in the hospital's own settings, or is checked against it, before any
patient file is read. A request outside the policy is refused with a typed
:class:`~fedrg.errors.PolicyViolationError` that names the setting and the allowed range.

The policy never leaves the site; only its hash (:meth:`SitePolicy.policy_hash`) is bound
into every signed ledger entry, so an auditor holding the policy can check each entry's
mechanism against it.

Pure: no torch, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, get_args

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedrg.errors import ConfigError
from fedrg.pydantic_errors import format_validation_error

#: Name of the built-in base model in ``allowed_base_models`` (it is rebuilt locally from a
#: fixed recipe, so it is named rather than hashed).
BUILTIN_BASE = "builtin:tiny"

#: The Opacus accountants a site may record epsilon with (the one list; see ``ACCOUNTANTS``).
Accountant = Literal["rdp", "prv", "gdp"]
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)

#: The largest delta a site's default (``min(1e-5, 1/(10 n))``) can give.
DEFAULT_MAX_DELTA = 1e-5


def noise_share(*, noise: str, honest_peers: int) -> float:
    """The fraction of a round's noise standard deviation one hospital adds itself.

    ``1`` with local noise; ``1 / sqrt(honest_peers + 1)`` with distributed noise, so that the
    variances of ``honest_peers + 1`` honest shares sum to the full noise. The hospital's plan
    and ``fedrg audit`` both use this one formula.
    """
    if noise == "local":
        return 1.0
    if honest_peers < 1:
        raise ValueError(f"distributed noise needs honest_peers >= 1, got {honest_peers}")
    return 1.0 / math.sqrt(honest_peers + 1)


def required_threshold(*, fraction: float, holders: int) -> int:
    """The fewest Shamir shares a secure sum may need before a hospital accepts it.

    ``ceil(fraction * holders)`` (with a 1e-9 slack against float error): the one formula the
    hospital's set-up check, its secure-aggregation session and the server's default
    threshold all use.

    Parameters
    ----------
    fraction : float
        ``policy.min_threshold_fraction`` (or the server's ``secagg.threshold_fraction``).
    holders : int
        Share holders of each secret (the client's neighbours).
    """
    return max(1, math.ceil(fraction * holders - 1e-9))


class EvaluationPolicy(BaseModel):
    """How evaluation results may leave the hospital."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    release: Literal["none", "dp", "exact"] = Field(
        "dp", description="'none': no metric leaves; 'dp': metrics leave through a DP "
        "mechanism whose cost is charged to the ledger; 'exact': an explicit opt-out for "
        "synthetic or public cohorts: the same aggregates without noise, still once per "
        "trained round and recorded in the ledger as a non-private release")
    epsilon_per_release: float = Field(
        0.5, gt=0.0, description="epsilon one released evaluation (all metrics) is calibrated "
        "to; with RDP at delta 1e-5 one Gaussian release cannot go below about 0.19")
    max_releases_per_run: int = Field(
        20, ge=0, description="at most this many evaluation releases per run (and at most one "
        "per trained round of the same global model)")


def secure_sum_size(*, min_secagg_peers: int) -> int:
    """The fewest hospitals (the site itself included) in a secure sum that a site needing
    ``min_secagg_peers`` other hospitals accepts: the one definition, also used by the
    operator's quorum (fedrg/deploy/run_plan.py)."""
    return min_secagg_peers + 1


class SitePolicy(BaseModel):
    """The hospital's privacy policy (its own settings; never sent by the server).

    Defaults are safe: DP required, secure aggregation required with at least two distinct
    peers, delta ``min(1e-5, 1/(10 n))``, a noise floor, caps on steps and rounds, and only
    the built-in base model.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- DP-SGD
    require_dp: bool = Field(
        True, description="refuse any round without DP-SGD; a site that opts out sets this "
        "to false explicitly, and non-private rounds are still written to its ledger")
    target_delta: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="delta of this dataset (None = min(1e-5, 1/(10 n)) for n training patients)")
    accountant: Accountant = Field(
        "rdp", description="the accountant the ledger records epsilon with")
    epsilon_budget: float = Field(
        10.0, gt=0.0, description="lifetime epsilon budget of the dataset, across all runs")
    epsilon_per_run: float = Field(
        8.0, gt=0.0, description="cap on the epsilon one run may spend")
    min_noise_multiplier: float = Field(
        0.5, ge=0.0, description="floor on sigma; a calibrated sigma below it is refused")
    max_grad_norm_cap: float = Field(
        10.0, gt=0.0, description="largest per-patient clipping norm the site accepts")
    max_sample_rate: float = Field(
        0.5, gt=0.0, le=1.0, description="largest Poisson sample rate (batch / n) accepted")
    max_local_steps: int = Field(200, ge=1, description="cap on DP-SGD steps per round")
    max_rounds_per_run: int = Field(50, ge=1, description="cap on rounds of one run")

    noise: Literal["local", "distributed"] = Field(
        "local", description="'local': every round's DP-SGD noise is added here in full, "
        "whatever else happens to the update; 'distributed': one noisy step per round, this "
        "site adding only its share (1/(distributed_honest_peers + 1) of the noise variance) "
        "and the secure sum of at least distributed_honest_peers + 1 hospitals carrying the "
        "full noise (docs/privacy.md, distributed noise)")
    distributed_honest_peers: int = Field(
        2, ge=1, description="with noise = 'distributed': how many other hospitals of every "
        "secure sum this site assumes add their noise share honestly; it never trusts a "
        "server's count, and refuses to set up or unmask a sum with fewer peers "
        "(needs min_secagg_peers >= this)")

    # --- secure aggregation
    require_secagg: bool = Field(
        True, description="refuse to send an update that is not masked in a secure sum")
    min_secagg_peers: int = Field(
        2, ge=1, description="fewest other distinct hospitals in the secure sum")
    min_threshold_fraction: float = Field(
        0.5, gt=0.0, le=1.0,
        description="lowest Shamir threshold accepted, as a fraction of the share holders")

    # --- data
    val_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="held-out fraction of patients (fixed by the site)")
    split_seed: int = Field(0, description="seed of the site's label-independent split")

    # --- code and models
    allowed_base_models: list[str] = Field(
        default_factory=lambda: [BUILTIN_BASE],
        description="base models that may be loaded: 'builtin:tiny' or sha256 content "
        "hashes of local model directories")

    evaluation: EvaluationPolicy = Field(default_factory=EvaluationPolicy)

    @model_validator(mode="after")
    def _check(self) -> SitePolicy:
        if self.epsilon_per_run > self.epsilon_budget:
            raise ValueError(
                f"policy.epsilon_per_run={self.epsilon_per_run} exceeds policy.epsilon_budget="
                f"{self.epsilon_budget}; lower the per-run cap or raise the lifetime budget")
        if self.noise == "distributed":
            if not self.require_secagg:
                raise ValueError("policy.noise='distributed' needs policy.require_secagg=true: "
                                 "only a secure sum carries the other hospitals' noise shares")
            if self.min_secagg_peers < self.distributed_honest_peers:
                raise ValueError(
                    f"policy.noise='distributed' assumes {self.distributed_honest_peers} honest "
                    f"peers in every sum, but policy.min_secagg_peers={self.min_secagg_peers} "
                    "would accept fewer; raise min_secagg_peers to at least "
                    "distributed_honest_peers")
        return self

    @property
    def noise_share(self) -> float:
        """The fraction of a round's noise standard deviation this site adds itself:
        1 with local noise, ``1 / sqrt(distributed_honest_peers + 1)`` with distributed noise
        (the variances of at least that many honest shares sum to the full noise)."""
        return noise_share(noise=self.noise, honest_peers=self.distributed_honest_peers)

    def delta_for(self, n_records: int) -> float:
        """The delta this site uses for a dataset of ``n_records`` patients.

        Parameters
        ----------
        n_records : int
            Number of training patients (privacy units).

        Returns
        -------
        float
            ``target_delta`` if set, else ``min(1e-5, 1 / (10 n))``.
        """
        if self.target_delta is not None:
            return float(self.target_delta)
        return min(DEFAULT_MAX_DELTA, 1.0 / (10.0 * max(int(n_records), 1)))

    def max_delta(self) -> float:
        """The largest delta any dataset of this site may be accounted at (for auditors,
        who do not know ``n``): ``target_delta`` if set, else :data:`DEFAULT_MAX_DELTA`."""
        return float(self.target_delta) if self.target_delta is not None else DEFAULT_MAX_DELTA

    @property
    def min_secure_sum_size(self) -> int:
        """The fewest hospitals (this one included) a secure sum may hold for this site."""
        return secure_sum_size(min_secagg_peers=self.min_secagg_peers)

    def min_threshold(self, holders: int) -> int:
        """The lowest Shamir threshold this site accepts with ``holders`` share holders."""
        return required_threshold(fraction=self.min_threshold_fraction, holders=holders)

    def policy_hash(self) -> str:
        """SHA-256 of the canonical JSON form (bound into every ledger entry)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


#: Tables a policy file may hold the policy under (a hospital TOML, a simulation TOML).
POLICY_TABLES = ("policy", "site_policy")


def policy_table(data: dict[str, Any]) -> dict[str, Any]:
    """The policy table of a parsed file: its ``[policy]`` or ``[site_policy]`` table, or the
    file itself when it holds the policy's keys bare."""
    for key in POLICY_TABLES:
        if isinstance(data.get(key), dict):
            return dict(data[key])
    return dict(data)


def parse_policy(table: dict[str, Any], *, source: str) -> SitePolicy:
    """Validate a policy table (the one validation every policy reader uses).

    Raises
    ------
    ConfigError
        One line per problem, naming ``source``, the key, the value and the keys allowed.
    """
    try:
        return SitePolicy.model_validate(table)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"site policy ({source})",
                                                  root=SitePolicy)) from None


def read_policy_file(path: str | os.PathLike[str]) -> SitePolicy:
    """Read a site policy from a file: a hospital TOML with a ``[policy]`` table, a simulation
    TOML with ``[site_policy]``, a TOML/JSON of the bare keys, or a JSON dump of
    :class:`SitePolicy` (``fedrg simulate`` writes ``site_policy.json``).

    Raises
    ------
    ConfigError
        Naming the file when it cannot be read, parsed or validated.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read policy file {path}: {err.strerror}; give an existing "
                          "hospital TOML or policy file") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"policy file {path} is not valid TOML/JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"policy file {path} does not hold a table of policy keys")
    return parse_policy(policy_table(raw), source=str(path))


def encode_policy(policy: SitePolicy) -> str:
    """The policy as one node-config value: base64url of its JSON (no quotes to escape)."""
    return base64.urlsafe_b64encode(policy.model_dump_json().encode()).decode()


def decode_policy(value: str) -> SitePolicy:
    """Inverse of :func:`encode_policy` (raises :class:`ConfigError` naming the key)."""
    try:
        return SitePolicy.model_validate_json(base64.urlsafe_b64decode(value.encode()))
    except (ValueError, ValidationError) as err:
        raise ConfigError(f"node-config key 'policy' does not hold a valid site policy ({err}); "
                          "start the hospital with `fedrg client --config FILE`") from None
