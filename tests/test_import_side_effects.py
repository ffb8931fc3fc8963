"""Importing fedrg must not change the host process (issue 17, item 1).

Each check runs in a fresh interpreter started without fedrg's offline variables, so the
parent test process (whose conftest sets them) cannot hide a module that sets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedrg.runtime import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, json, os, pkgutil, sys
import torch
# flwr's own import sets GRPC_VERBOSITY (flwr/supercore/grpc.py): a side effect of the
# dependency, not of fedrg, so it is taken before the snapshot.
import flwr.supercore.grpc
torch.set_num_threads(%(threads)d)
before_env = dict(os.environ)
before_threads = torch.get_num_threads()
import fedrg
names = []
for info in pkgutil.walk_packages(fedrg.__path__, "fedrg."):
    importlib.import_module(info.name)
    names.append(info.name)
for extra in ("fedrg.cli",):
    importlib.import_module(extra)
changed = {k: [before_env.get(k), os.environ.get(k)]
           for k in set(before_env) | set(os.environ) if before_env.get(k) != os.environ.get(k)}
print(json.dumps({"modules": names, "changed": changed,
                  "threads": [before_threads, torch.get_num_threads()]}))
"""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_importing_every_fedrg_module_leaves_environ_and_threads_alone():
    out = subprocess.run(
        [sys.executable, "-c", PROBE % {"threads": 1}], env=_clean_env(), cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["modules"]) > 40  # the walk really imported the package tree
    assert "fedrg.train.loop" in report["modules"] and "fedrg.model.base" in report["modules"]
    assert report["changed"] == {}, report["changed"]
    assert report["threads"] == [1, 1]


def test_train_local_restores_the_thread_count():
    import torch

    from fedrg.runtime import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1 if before != 1 else 2):
        assert torch.get_num_threads() != before
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("preset", [False, True])
def test_offline_env_restores_previous_values(monkeypatch, preset):
    from fedrg.runtime import offline_env

    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    if preset:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    before = dict(os.environ)
    with offline_env():
        assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
        assert os.environ["HF_HUB_OFFLINE"] == ("0" if preset else "1")  # a user's choice wins
    assert dict(os.environ) == before


def test_every_public_name_resolves_lazily():
    import importlib

    for package in ("fedrg", "fedrg.data", "fedrg.model", "fedrg.train", "fedrg.data.importers",
                    "fedrg.secagg"):
        mod = importlib.import_module(package)
        assert mod.__all__, package
        for name in mod.__all__:
            value = getattr(mod, name)
            assert value is not None, f"{package}.{name}"
            assert name in dir(mod)
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            _ = mod.nope
    import fedrg
    from fedrg.train.loop import train_local

    assert fedrg.train_local is train_local


def test_importing_fedrg_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, fedrg; print('torch' in sys.modules)"],
                         env=_clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_fedrg_command_switches_its_own_process_offline(tmp_path):
    probe = ("import os; from typer.testing import CliRunner; from fedrg.cli import app; "
             "before = os.environ.get('HF_HUB_OFFLINE'); "
             f"CliRunner().invoke(app, ['validate', {str(tmp_path / 'none')!r}]); "
             "print(before, os.environ.get('HF_HUB_OFFLINE'), os.environ.get('FLWR_TELEMETRY_ENABLED'))")
    out = subprocess.run([sys.executable, "-c", probe], env=_clean_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None", "1", "0"]
