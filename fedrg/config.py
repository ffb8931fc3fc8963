"""Experiment configuration: pydantic models are the single source of defaults.

A TOML file (see ``configs/``) overrides them; ``section.key=value`` strings (the CLI's
``--set``) override the file. Flower's flat run-config is converted here and only here
(:func:`to_run_config` / :func:`from_run_config`).

Site-only settings (cohort path, state directory, keys and the site's privacy policy,
lifetime budget included) live in :class:`SiteConfig` and never leave the hospital.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedrg.errors import ConfigError
from fedrg.policy import SitePolicy
from fedrg.pydantic_errors import format_validation_error

DEFAULT_MARKERS = ["idh_mutant", "codeletion_1p19q", "mgmt_methylated"]

# Expression panel: modules that co-vary with IDH status (G-CIMP / mesenchymal programme),
# 1p/19q arm loss (genes on 1p and 19q), MGMT promoter methylation, and housekeeping /
# lineage genes that carry no marker signal.
DEFAULT_GENE_PANEL = [
    # higher in IDH-wildtype (mesenchymal / hypoxia / angiogenesis)
    "CHI3L1", "VEGFA", "LGALS3", "PDPN", "TIMP1", "SERPINE1", "CD44", "POSTN",
    # higher in IDH-mutant (G-CIMP proneural)
    "DLL3", "SOX4", "OLIG2", "BCAN",
    # chromosome arm 1p
    "CAMTA1", "CHD5", "DFFA", "KIF1B",
    # chromosome arm 19q
    "CIC", "ZNF420", "BAX", "LIG1",
    # MGMT and its neighbourhood
    "MGMT", "EBF3",
    # proliferation, lineage and housekeeping
    "MKI67", "TOP2A", "EGFR", "PTEN", "GFAP", "SOX2", "CDKN2A", "PDGFRA", "ACTB", "GAPDH",
]
DEFAULT_MUTATION_GENES = ["IDH1", "IDH2", "TP53", "ATRX", "TERT", "EGFR", "PTEN", "CIC", "FUBP1", "NF1"]


class StrictModel(BaseModel):
    """Base for all config sections: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FederationConfig(StrictModel):
    """How the federation is run by the server."""

    hospitals: int = Field(3, ge=1, description="number of hospitals (simulation)")
    rounds: int = Field(3, ge=1, description="number of federated rounds")
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, description="fraction sampled per round")
    min_hospitals: int = Field(2, ge=1, description="minimum hospitals needed for a round")
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    server_optimizer: Literal["fedavg", "fedadam", "fedyogi", "fedadagrad"] = Field(
        "fedavg", description="server update rule (fedrg.federated.aggregate.AGGREGATORS)"
    )
    server_lr: float = Field(1.0, gt=0.0, description="server learning rate applied to the mean delta")
    seed: int = 0

    @model_validator(mode="after")
    def _check_min(self) -> FederationConfig:
        if self.min_hospitals > self.hospitals:
            raise ValueError(
                f"federation.min_hospitals={self.min_hospitals} exceeds federation.hospitals="
                f"{self.hospitals}; lower min_hospitals or add hospitals"
            )
        return self


class DataConfig(StrictModel):
    """What each hospital's cohort looks like and how it becomes tensors."""

    markers: list[str] = Field(default_factory=lambda: list(DEFAULT_MARKERS))
    gene_panel: list[str] = Field(default_factory=lambda: list(DEFAULT_GENE_PANEL))
    mutation_genes: list[str] = Field(default_factory=lambda: list(DEFAULT_MUTATION_GENES))
    impute_missing_genes: bool = Field(
        False, description="impute genes missing from expression.tsv (else: error)"
    )
    image_mode: Literal["2d", "3d"] = "2d"
    image_shape: list[int] = Field(
        default_factory=lambda: [64, 64], description="[H, W] for 2d or [D, H, W] for 3d"
    )
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    split_seed: int = 0
    synthetic_dir: str = Field(
        "", description="where `fedrg simulate` caches synthetic cohorts ('' = cache dir)"
    )
    synthetic_patients: int = Field(160, ge=8, description="mean patients per synthetic hospital")
    world: Literal["public", "shifted"] = Field(
        "shifted", description="world of the synthetic hospitals of `fedrg simulate`: "
        "'shifted' (default: other scanners, expression platform, case mix and associations "
        "than the public pre-training cohorts, so the federation has something to teach; "
        "docs/cohort-format.md) or 'public' (the public pre-training cohorts' world)")

    @model_validator(mode="after")
    def _check_shape(self) -> DataConfig:
        want = 2 if self.image_mode == "2d" else 3
        if len(self.image_shape) != want or any(s < 8 for s in self.image_shape):
            raise ValueError(
                f"data.image_shape={self.image_shape} does not fit data.image_mode="
                f"'{self.image_mode}': give {want} sizes, each >= 8"
            )
        if len(set(self.markers)) != len(self.markers) or not self.markers:
            raise ValueError(f"data.markers={self.markers} must be non-empty and unique")
        return self


class ModelConfig(StrictModel):
    """The multimodal adapter and its base LM."""

    base: str = Field("builtin:tiny", description="'builtin:tiny' or a local model directory")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    image_tokens: int = Field(4, ge=1, description="k prompt embeddings from the image")
    genomics_tokens: int = Field(2, ge=1, description="m prompt embeddings from the genomics")
    encoder_width: int = Field(64, ge=8)
    image_norm: Literal["group", "none"] = Field(
        "none", description="normalisation in the image CNN: 'none' keeps absolute intensity "
        "levels (measured better on synthetic cohorts), 'group' = GroupNorm; never BatchNorm"
    )
    radiomic_features: bool = Field(
        True, description="feed parameter-free first-order radiomic features (histogram, "
        "quantiles, lesion region) into the image encoder beside the CNN (fedrg.model.radiomics)")
    linear_marker_paths: bool = Field(
        True, description="add zero-initialised logistic-regression paths from the radiomic "
        "features and the genomic profile to the marker logits (few parameters, strong signal: "
        "what DP-SGD can learn; docs/model.md)")
    max_report_tokens: int = Field(64, ge=8)
    report_loss_weight: float = Field(1.0, ge=0.0)
    marker_loss_weight: float = Field(
        3.0, ge=0.0, description="weight of the marker loss (3: under per-sample clipping the "
        "marker heads otherwise get little of each patient's gradient budget)")
    public_init: str = Field(
        "synthetic", min_length=1, description="initial global adapter: 'synthetic' = pre-trained "
        "on public synthetic cohorts (public seed, no hospital data; built once, cached), 'none' "
        "= random, or a local adapter directory (fedrg.train.public_init; docs/model.md)")
    genomics_dropout: float = Field(
        0.5, ge=0.0, le=1.0,
        description="probability of withholding genomics from a training example "
        "(teaches the image-only path the radiogenomics question needs)",
    )


class PrivacyConfig(StrictModel):
    """Record-level (patient-level) DP-SGD, Opacus names."""

    enabled: bool = True
    target_epsilon: float = Field(
        8.0, gt=0.0, description="asked-for epsilon of the run per hospital; each hospital caps "
        "it at its policy.epsilon_per_run (delta and the accountant are the hospital's policy)")
    max_grad_norm: float = Field(1.0, gt=0.0)
    noise_multiplier: float | None = Field(
        None, ge=0.0, description="fix sigma instead of calibrating it to target_epsilon"
    )
    grad_sample_mode: Literal["hooks", "functorch", "ew", "ghost", "bk"] = Field(
        "ew", description="Opacus per-sample gradient mode; ew was fastest in "
        "benchmarks/dp_overhead.py (see docs/privacy.md)",
    )
    report_clip_share: float = Field(
        0.25, ge=0.0, lt=1.0, description="group-wise clipping: share of max_grad_norm^2 for "
        "the report side (LoRA + prompt projectors), the rest for encoders and marker head; "
        "same sensitivity and epsilon as flat clipping (0 = flat clipping; docs/privacy.md)")
    frozen_under_dp: list[str] = Field(
        default_factory=lambda: ["image_encoder.features", "marker_head.image_linear"],
        description="name prefixes of adapter parameters not trained under DP-SGD (no noise, "
        "kept at their initial/global values): the image CNN's convolutions (60 k noised "
        "parameters that carried no signal under DP) and the radiomic linear path (the "
        "largest per-patient gradient, which took most of each patient's clipping norm and "
        "put noise into the fused answer; docs/model.md)")
    hospital_level: bool = Field(False, description="also clip + noise each hospital's update")
    hospital_clip: float = Field(1.0, gt=0.0)
    hospital_noise_multiplier: float = Field(0.5, ge=0.0)
    hospital_target_delta: float = Field(
        1e-5, gt=0.0, lt=1.0, description="delta of the hospital-level guarantee (the unit is a "
        "hospital; patient-level delta is each hospital's policy)")

    @model_validator(mode="before")
    @classmethod
    def _moved_to_policy(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("target_delta", "accountant"):
                if key in data:
                    raise ValueError(
                        f"privacy.{key}={data[key]!r} is not a request setting: each hospital's "
                        f"own policy fixes it. Remove it from the experiment; set {key} in the "
                        "[site_policy] table of a simulation TOML (or --site-policy FILE), or in "
                        "the [policy] table of a hospital's TOML")
        return data

    @model_validator(mode="after")
    def _check_groups(self) -> PrivacyConfig:
        if self.grad_sample_mode == "ghost" and self.report_clip_share > 0:
            raise ValueError(
                f"privacy.report_clip_share={self.report_clip_share} (group-wise clipping) is not "
                "available with privacy.grad_sample_mode='ghost'; set privacy.report_clip_share=0 "
                "or use grad_sample_mode='ew'")
        return self


class SecAggConfig(StrictModel):
    """Secure aggregation (masked sum)."""

    enabled: bool = True
    threshold_fraction: float = Field(
        0.66, gt=0.0, le=1.0, description="Shamir threshold t as a fraction of neighbours"
    )
    neighbours: int = Field(
        -1, ge=-1, description="k neighbours per client (0 = everyone; -1 = everyone up to 32 "
        "clients, else SecAgg+ with 4*ceil(log2 n))")
    clip_range: float = Field(8.0, gt=0.0, description="update values are clipped to +-range")
    quantization_bits: int = Field(
        24, ge=8, le=30, description="bits per coordinate; the ring is 32 bits when "
        "bits + ceil(log2 n) <= 32, else 64")
    max_weight: float = Field(
        10000.0, gt=0.0, description="public upper bound on a client's weight (its example count)"
    )
    rounding: Literal["nearest", "stochastic"] = Field(
        "nearest", description="fixed-point rounding: deterministic or unbiased stochastic"
    )
    pipelined: bool = Field(
        True, description="set each round's secure sum up during the previous round's last two "
        "messages: 3 messages per round instead of 5 (fresh keys and shares every round)")


class TrainingConfig(StrictModel):
    """The local loop at each hospital (and the centralised baseline)."""

    local_epochs: float = Field(2.0, gt=0.0, description="epochs of local training per round")
    batch_size: int = Field(32, ge=1, description="expected (Poisson) batch size")
    max_physical_batch_size: int = Field(32, ge=1)
    lr: float = Field(
        1e-3, gt=0.0, description="AdamW lr of encoders and marker head in federated rounds: "
        "fine-tuning from the public initial adapter (3e-3 was measured to pull multimodal "
        "1p/19q down under DP-SGD; docs/model.md)")
    train_lr: float = Field(
        2e-3, gt=0.0, description="AdamW lr of encoders and heads in `fedrg train` (centralised, "
        "non-private, many epochs)")
    train_lora_lr: float = Field(
        5e-3, gt=0.0, description="AdamW lr of LoRA and the prompt projectors in `fedrg train` "
        "(higher rates measured to break the report language)")
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = 0
    threads: int = Field(0, ge=0, description="torch threads (0 = torch default)")
    augment: bool = Field(
        True, description="random left-right flips and small shifts of training images"
    )
    lora_lr_scale: float = Field(
        5.0, gt=0.0, description="learning-rate multiplier for LoRA and the prompt projectors"
    )
    dp_lr_scale: float = Field(
        10.0, gt=0.0, description="under DP-SGD, learning-rate multiplier of the marker side "
        "(encoders, marker head; not LoRA or the prompt projectors): DP noise fills Adam's "
        "second moment, so each useful step shrinks by its signal-to-noise ratio "
        "(docs/model.md)")
    train_epochs: float = Field(
        40.0, gt=0.0, description="epochs of `fedrg train` (centralised; rounds use local_epochs)"
    )


class TrackingConfig(StrictModel):
    """Opt-in experiment tracking of the per-round rows of metrics.json (server side only)."""

    tensorboard: bool = Field(False, description="write per-round scalars as TensorBoard event files")
    dir: str = Field("", description="where tracking files go ('' = RUN_DIR/tracking)")


class ExperimentConfig(StrictModel):
    """The whole experiment."""

    federation: FederationConfig = Field(default_factory=FederationConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def config_hash(self) -> str:
        """SHA-256 of the canonical JSON form (recorded in ledgers and checkpoints).

        ``tracking`` is left out: where metrics are mirrored does not change the experiment.
        """
        blob = json.dumps(self.model_dump(mode="json", exclude={"tracking"}), sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


class SiteConfig(StrictModel):
    """Settings that belong to one hospital and never leave it."""

    name: str = Field("hospital", min_length=1)
    cohort: str = Field(..., description="path to the local cohort directory")
    state_dir: str = Field(..., description="where the privacy ledger and keys live (outside runs)")
    signing_key: str = Field("", description="Ed25519 PEM key ('' = state_dir/ledger_ed25519.pem)")
    policy: SitePolicy = Field(
        default_factory=SitePolicy, description="the site's privacy policy (the [policy] "
        "table of the hospital TOML; lifetime budget in policy.epsilon_budget)")
    roster: str = Field("", description="the federation roster this hospital pins (TOML from the "
                        "operator); secure aggregation refuses to run without it")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"site name {v!r} may only hold letters, digits, '-', '_' and '.'")
        return v


# --------------------------------------------------------------------------- loading

def _parse_scalar(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists), else keep the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict (returns a copy)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. privacy.target_epsilon=4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            sections = ", ".join(ExperimentConfig.model_fields)
            raise ConfigError(f"override key {key!r} must be section.key with section one of: {sections}")
        out.setdefault(parts[0], {})
        if not isinstance(out[parts[0]], dict):
            raise ConfigError(f"override {key!r}: '{parts[0]}' is not a section")
        out[parts[0]][parts[1]] = _parse_scalar(raw.strip())
    return out


def build_config(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a nested dict into an :class:`ExperimentConfig` with a readable error."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"configuration ({source})", root=ExperimentConfig)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file (or a ``.json`` resolved config) with an error naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing TOML file (see configs/)")
    if p.suffix == ".json":
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {p} is not valid JSON: {err}") from None
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {p} is not valid TOML: {err}") from None


#: Table of a simulation TOML that holds the simulated hospitals' own policy (not part of
#: the experiment request; read by ``fedrg simulate``, ignored by everything else).
SITE_POLICY_TABLE = "site_policy"


def read_experiment_toml(path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """An experiment TOML split into (the experiment's tables, its ``[site_policy]`` or None)."""
    data: dict[str, Any] = read_toml(path) if path else {}
    policy = data.pop(SITE_POLICY_TABLE, None)
    return data, policy


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load defaults, then a TOML file (optional), then ``section.key=value`` overrides.

    A ``[site_policy]`` table in the file belongs to the simulated hospitals, not to the
    experiment, and is left out here (see :func:`read_experiment_toml`).
    """
    data, _ = read_experiment_toml(path)
    data = apply_overrides(data, overrides or [])
    return build_config(data, source=str(path) if path else "defaults + overrides")


def site_table(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``[site]`` table of a hospital TOML with its ``[policy]`` table as ``site.policy``."""
    site = dict(data.get("site", {}))
    if "epsilon_budget" in site:
        raise ConfigError(f"{source}: site.epsilon_budget={site['epsilon_budget']!r} has moved into "
                          "the site policy; write it as epsilon_budget in the [policy] table")
    if "policy" in data:
        if "policy" in site:
            raise ConfigError(f"{source}: give the site policy once, as a [policy] table "
                              "(not also as [site.policy])")
        site["policy"] = data["policy"]
    return site


def policy_table_key(loc: str) -> str:
    """``site.policy.x`` -> ``policy.x``: the policy is written as a ``[policy]`` table."""
    return loc.removeprefix("site.") if loc.startswith("site.policy.") else loc


def load_site_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SiteConfig:
    """Load a hospital's site config (``[site]`` and ``[policy]`` tables of a TOML file)."""
    site = site_table(read_toml(path), str(path))
    site.update(overrides or {})
    try:
        return SiteConfig.model_validate(site)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"site config {path}", root=SiteConfig,
                                                  prefix=("site",), locate=policy_table_key)) from None


# --------------------------------------------------------------------------- Flower glue

def to_run_config(cfg: ExperimentConfig) -> dict[str, int | float | bool | str]:
    """Flatten to Flower's run-config (scalars only; lists and None as JSON strings)."""
    flat: dict[str, int | float | bool | str] = {}
    for section, values in cfg.model_dump(mode="json").items():
        for key, value in values.items():
            if isinstance(value, (list, dict)) or value is None:
                value = "json:" + json.dumps(value)
            flat[f"{section}.{key}"] = value
    return flat


def from_run_config(flat: dict[str, Any]) -> ExperimentConfig:
    """Inverse of :func:`to_run_config`; ignores keys outside fedrg's sections."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if "." not in key:
            continue
        section, name = key.split(".", 1)
        if section not in ExperimentConfig.model_fields:
            continue
        if isinstance(value, str) and value.startswith("json:"):
            value = json.loads(value[5:])
        nested.setdefault(section, {})[name] = value
    return build_config(nested, source="Flower run config")
