"""`make lint` type-checks all of fedrg, strict on the privacy mechanism, secure aggregation
and the hospital: the mypy configuration as mypy itself reads it from pyproject.toml."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from mypy.config_parser import parse_config_file
from mypy.main import process_options
from mypy.options import PER_MODULE_OPTIONS, Options

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
STRICT_PACKAGES = ("fedrg.privacy", "fedrg.secagg", "fedrg.hospital")


def mypy_options() -> Options:
    options = Options()
    errors = io.StringIO()
    parse_config_file(options, lambda: None, str(PYPROJECT), io.StringIO(), errors)
    assert errors.getvalue() == ""  # e.g. "Per-module sections should only specify per-module flags"
    return options


def strict_per_module_flags() -> dict[str, object]:
    """Every per-module option that ``mypy --strict`` changes, with its strict value."""
    bare = ["--config-file", os.devnull, "-c", "pass"]  # mypy's defaults, not this project's
    _, strict = process_options(["--strict", *bare])
    _, plain = process_options(bare)
    return {k: getattr(strict, k) for k in sorted(PER_MODULE_OPTIONS)
            if getattr(strict, k) != getattr(plain, k)}


def test_every_module_of_the_package_is_checked_and_no_error_is_switched_off():
    options = mypy_options()
    assert options.files == ["fedrg"]
    assert not options.ignore_errors and not options.disable_error_code
    for pattern, override in options.per_module_options.items():
        assert not override.get("ignore_errors"), pattern
        assert not override.get("disable_error_code"), pattern
    assert options.warn_redundant_casts and options.warn_unused_configs  # global-only strict flags


@pytest.mark.parametrize("module", [f"{p}{s}" for p in STRICT_PACKAGES for s in ("", ".x", ".x.y")])
def test_the_named_packages_get_every_strict_flag(module):
    flags = strict_per_module_flags()
    assert "disallow_untyped_defs" in flags and flags["implicit_reexport"] is False
    got = mypy_options().clone_for_module(module)
    assert {k: getattr(got, k) for k in flags} == flags


def test_the_rest_of_the_package_is_not_strict():
    # (`strict = true` in an override is not per module in mypy: it would make all of it strict)
    got = mypy_options().clone_for_module("fedrg.model.adapter")
    assert got.disallow_untyped_defs is False and got.implicit_reexport is True
    assert mypy_options().clone_for_module("fedrg.hospitality").disallow_untyped_defs is False
