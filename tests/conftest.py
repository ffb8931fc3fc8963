"""Shared test setup: offline, no telemetry, a private cache directory per session."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------- shared model fixtures
# One tiny base model and one tiny cohort per test session, shared by every module.
import pytest


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
