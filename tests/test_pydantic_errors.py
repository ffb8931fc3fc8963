"""One formatter for pydantic errors: experiment config, site config and deploy settings alike."""

from __future__ import annotations

import pytest

from fedrg.config import load_site_config
from fedrg.errors import ConfigError


def test_site_config_errors_name_key_value_and_allowed_keys(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text('[site]\ncohort = "c"\nstate_dir = "s"\nbudgett = 3\n[policy]\nepsilon_budget = -1\n')
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    msg = str(err.value)
    assert msg.startswith(f"invalid site config {path}:\n  ")
    # the policy is written as its own [policy] table, and named so
    assert "'policy.epsilon_budget' = -1: Input should be greater than 0" in msg
    assert "unknown key 'site.budgett'; allowed keys here: cohort, name, policy, roster, signing_key, state_dir" in msg
    path.write_text('[site]\ncohort = "c"\n')
    with pytest.raises(ConfigError, match="missing key 'site.state_dir'"):
        load_site_config(path)


def test_every_pydantic_formatter_is_the_shared_one():
    import inspect

    import fedrg.config
    import fedrg.deploy.settings

    for module in (fedrg.config, fedrg.deploy.settings):
        src = inspect.getsource(module)
        assert ".errors()" not in src, f"{module.__name__} formats pydantic errors itself"
