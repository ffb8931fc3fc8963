"""Fixtures of the adversary tests: a real hospital (tiny model, tiny cohort, real ledger).

``veteran_state`` is a hospital state directory after one honest, accepted DP round (built
once per module by the real ``HospitalSite.handle``); each test works on its own copy, so
the hospital knows its training-set size and refuses up front without reading patient files.
``no_patient_reads`` makes any read of the cohort fail the test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from model_fixtures import tiny_cohort

from fedrg.config import SiteConfig
from fedrg.hospital.site import HospitalSite
from fedrg.payload import Payload

from .hostile import HONEST_RUN, honest_request, site_policy


@pytest.fixture(scope="module")
def cohort(fx_root):
    return tiny_cohort(fx_root, patients=24, seed=21)


@pytest.fixture(scope="module")
def veteran_state(tmp_path_factory, base_dir, cohort):
    """State directory of a hospital that trained round 1 of HONEST_RUN (2 planned rounds)."""
    state = tmp_path_factory.mktemp("veteran") / "state"
    site = HospitalSite(SiteConfig(name="h1", cohort=str(cohort), state_dir=str(state),
                                   policy=site_policy(base_dir)))
    reply = site.handle("train", honest_request(base_dir, round_=1, run_id=HONEST_RUN), Payload())
    assert reply.meta["status"] == "ok", reply.meta
    return state


@pytest.fixture
def hospital(tmp_path, veteran_state, base_dir, cohort):
    """A fresh process's view of the veteran hospital, on its own copy of the state."""
    state = tmp_path / "state"
    shutil.copytree(veteran_state, state)
    return HospitalSite(SiteConfig(name="h1", cohort=str(cohort), state_dir=str(state),
                                   policy=site_policy(base_dir)))


@pytest.fixture
def no_patient_reads(monkeypatch):
    """Fail the test if the hospital loads its cohort (any patient file)."""
    import fedrg.data.cohort as cohort_mod

    def refuse(*_a, **_k):
        raise AssertionError("the hospital read patient files for a request it must refuse up front")

    monkeypatch.setattr(cohort_mod, "load_cohort", refuse)


def ledger_bytes(site: HospitalSite) -> bytes:
    """The hospital's ledger file as it is on disk."""
    return (Path(site.site.state_dir) / "ledger.jsonl").read_bytes()
