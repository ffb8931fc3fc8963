"""Shared test setup: offline, no telemetry, a private cache directory per session."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings as _hyp_settings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# ---------------------------------------------------------------- hypothesis
# One registered profile for every property test: derandomized (the examples are a fixed
# function of the test, so a run cannot pass or fail by luck), no per-example deadline (the
# machine is shared and accountants are slow), no example database between runs.
_hyp_settings.register_profile(
    "fedrg", derandomize=True, deadline=None, database=None, print_blob=True
)
_hyp_settings.load_profile(os.environ.get("FEDRG_HYPOTHESIS_PROFILE", "fedrg"))


# ---------------------------------------------------------------- shared model fixtures
# One tiny base model and one tiny cohort per test session, shared by every module.


@pytest.fixture(scope="session")
def fx_root(tmp_path_factory):
    """Where the shared model fixtures are built (once per session)."""
    return tmp_path_factory.getbasetemp() / "model-fixtures"


@pytest.fixture(scope="session")
def base_dir(fx_root):
    """A tiny pre-trained Llama base with its tokenizer (see tests/model_fixtures.py)."""
    from model_fixtures import tiny_base

    return tiny_base(fx_root)


@pytest.fixture(scope="session")
def dataset(fx_root):
    """A small synthetic hospital as a CohortDataset."""
    from model_fixtures import tiny_cohort, tiny_data_cfg

    from fedrg.data.cohort import load_cohort
    from fedrg.data.dataset import CohortDataset

    cfg = tiny_data_cfg()
    return CohortDataset(load_cohort(tiny_cohort(fx_root), cfg), cfg)
