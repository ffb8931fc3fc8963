"""Config loading, overrides, clear errors, and the Flower run-config round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fedrg.config import (
    ExperimentConfig,
    from_run_config,
    load_config,
    load_site_config,
    to_run_config,
)
from fedrg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_hash_is_stable():
    a, b = ExperimentConfig(), ExperimentConfig()
    assert a.config_hash() == b.config_hash()
    b.privacy.target_epsilon = 4.0
    assert a.config_hash() != b.config_hash()


def test_shipped_simulation_config_loads():
    cfg = load_config(ROOT / "configs" / "simulation.toml")
    assert cfg.federation.hospitals == 3
    assert cfg.privacy.enabled and cfg.secagg.enabled


def test_shipped_non_private_config_turns_only_dp_off():
    """The non-private baseline is the DP model minus DP-SGD: same model, same public
    initial adapter, same training settings (a fair privacy-utility comparison)."""
    cfg = load_config(ROOT / "configs" / "non-private.toml")
    assert not cfg.privacy.enabled
    default = ExperimentConfig()
    expected = default.model_copy(update={
        "privacy": default.privacy.model_copy(update={"enabled": False}),
    })
    assert cfg.model_dump() == expected.model_dump()


def test_overrides_parse_types():
    cfg = load_config(None, ["privacy.target_epsilon=4", "data.image_shape=[32, 32]",
                             "secagg.enabled=false", "model.base=/models/x"])
    assert cfg.privacy.target_epsilon == 4.0
    assert cfg.data.image_shape == [32, 32]
    assert cfg.secagg.enabled is False
    assert cfg.model.base == "/models/x"


def test_unknown_key_names_key_and_allowed_values(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[privacy]\ntarget_epsilonn = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert "privacy.target_epsilonn" in msg and "target_epsilon" in msg and str(f) in msg


def test_unknown_section_and_bad_value():
    with pytest.raises(ConfigError, match="unknown key 'privcy'"):
        load_config(None, ["privcy.x=1"])
    with pytest.raises(ConfigError, match="privacy.grad_sample_mode"):
        load_config(None, ["privacy.grad_sample_mode=magic"])


def test_delta_and_accountant_are_refused_in_a_request_with_where_they_belong():
    for key in ("privacy.target_delta=1e-6", "privacy.accountant='prv'"):
        with pytest.raises(ConfigError, match=r"site_policy\].*\[policy\]"):
            load_config(None, [key])


def test_min_hospitals_above_hospitals_is_refused():
    with pytest.raises(ConfigError, match="min_hospitals"):
        load_config(None, ["federation.hospitals=2", "federation.min_hospitals=3"])


def test_image_shape_must_match_mode():
    with pytest.raises(ConfigError, match="image_shape"):
        load_config(None, ["data.image_mode=3d"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "broken.toml"
    bad.write_text("[federation\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_run_config_round_trip_is_flat_scalars():
    cfg = load_config(None, ["privacy.noise_multiplier=1.1", "data.markers=['idh_mutant']"])
    flat = to_run_config(cfg)
    assert all(isinstance(v, (int, float, bool, str)) for v in flat.values())
    assert from_run_config(flat) == cfg


def test_pyproject_flower_run_config_matches_defaults():
    """Deployment's run config (pyproject) must carry exactly the defaults of fedrg/config.py."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = data["tool"]["flwr"]["app"]["config"]
    flat: dict = {}
    for section, values in declared.items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v
        else:
            flat[section] = v if (v := values) is not None else None
    expected = to_run_config(ExperimentConfig())
    assert {k: flat[k] for k in expected} == expected


def test_site_config(tmp_path):
    f = tmp_path / "site.toml"
    f.write_text('[site]\nname = "h1"\ncohort = "/data/c"\nstate_dir = "/var/fedrg"\n'
                 '[policy]\nepsilon_budget = 5\nepsilon_per_run = 4\n')
    site = load_site_config(f)
    assert site.name == "h1" and site.policy.epsilon_budget == 5 and site.policy.require_dp
    # the lifetime budget moved into the policy: the old key gets the fix
    f.write_text('[site]\ncohort = "c"\nstate_dir = "s"\nepsilon_budget = 5\n')
    with pytest.raises(ConfigError, match=r"epsilon_budget=5 has moved .* \[policy\] table"):
        load_site_config(f)
    # unknown policy keys are refused, naming the key and what is allowed
    f.write_text('[site]\ncohort = "c"\nstate_dir = "s"\n[policy]\nrequire_pd = false\n')
    with pytest.raises(ConfigError, match=r"unknown key 'policy.require_pd'; allowed keys here: .*require_dp"):
        load_site_config(f)
    f.write_text('[site]\ncohort = "c"\nstate_dir = "s"\n[policy]\nmax_sample_rate = 2\n')
    with pytest.raises(ConfigError, match=r"'policy.max_sample_rate' = 2"):
        load_site_config(f)
    f.write_text('[site]\nname = "h 1/x"\ncohort = "c"\nstate_dir = "s"\n')
    with pytest.raises(ConfigError, match="site"):
        load_site_config(f)
