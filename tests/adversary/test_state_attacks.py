"""Attack: the hospital's state directory is wiped (budget reset), against the real site."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from model_fixtures import tiny_cohort
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.config import SiteConfig, load_config
from fedrg.federated.local import LocalTransport
from fedrg.federated.runner import run_federation
from fedrg.privacy.ledger import Ledger

pytestmark = pytest.mark.slow
runner = CliRunner()


def _cfg(base_dir, *extra):
    return load_config(None, [
        f"model.base={base_dir}", "model.encoder_width=16", "model.lora_rank=4",
        "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]", "training.local_epochs=0.25",
        "training.batch_size=8", "federation.hospitals=3", "federation.min_hospitals=2",
        "federation.fraction_evaluate=0", *extra])


def test_attack_state_wiped(tmp_path, base_dir, fx_root, caplog):
    """Round 1 trains; then h1's state directory is wiped. Round 2: the server sends h1 the
    head it kept, h1 refuses to train on its fresh ledger (no spend, no update), the server
    reports the non-extending ledger (metrics.json and log) and so does `fedrg audit`.
    After an explicit `fedrg site reinit` h1 trains again in round 3, and the reinit is
    visible in its ledger and in the audit."""
    cohorts = [tiny_cohort(fx_root, patients=24, seed=s) for s in (21, 22, 23)]
    from fedrg.federated.secure import provision_roster
    from fedrg.model.fingerprint import model_content_hash
    from fedrg.policy import SitePolicy

    # the tiny test base; round 2 sums the two others, so each accepts one other in a sum
    policy = SitePolicy(allowed_base_models=[model_content_hash(base_dir)], min_secagg_peers=1)
    sites = provision_roster([SiteConfig(name=f"h{i}", cohort=str(c), state_dir=str(tmp_path / f"s{i}"),
                                         policy=policy)
                              for i, c in enumerate(cohorts, 1)], tmp_path / "roster.toml")
    cfg = _cfg(base_dir, "federation.rounds=3")
    run_dir = tmp_path / "run"
    heads_file = run_dir / "ledger_heads.json"
    seen = {}

    def attack(row):
        if row["round"] == 1:  # the wipe
            seen["before"] = Ledger.open(sites[0].state_dir, hospital="h1").signed_head()
            shutil.rmtree(sites[0].state_dir)
        if row["round"] == 2:  # what the operator sees, then the explicit reinit
            seen["row2"] = row
            seen["audit_wiped"] = runner.invoke(
                app, ["audit", str(tmp_path / "s1"), "--heads", str(heads_file)],
                terminal_width=220)
            res = runner.invoke(app, [
                "site", "reinit", "--state-dir", sites[0].state_dir, "--name", "h1",
                "--reason", "state disk replaced", "--previous-head", str(heads_file)])
            assert res.exit_code == 0, res.output
            # the new long-term key reaches the roster the operator publishes (and h1 pins)
            provision_roster(sites, tmp_path / "roster.toml")

    with caplog.at_level(logging.WARNING):
        result = run_federation(LocalTransport(sites), cfg, run_dir, on_round=attack)
    rows = result.metrics["rounds"]
    assert [r["participants"] for r in rows] == [3, 2, 3]
    # round 2: refused before any spend, reported by the hospital and the server
    row2 = seen["row2"]
    assert row2["declined"] == {"h1": "ledger_not_extending"} and "h1" not in row2["epsilon"]
    assert any("h1 refuses round 2" in m for m in caplog.messages)
    alerts = result.metrics["ledger_alerts"]
    assert alerts[0]["round"] == 2 and alerts[0]["site"] == "h1" and not alerts[0]["reinitialised"]
    assert "state wiped" in alerts[0]["message"]
    assert row2["ledger_alerts"] == [alerts[0]]
    assert json.loads((run_dir / "metrics.json").read_text())["ledger_alerts"][0]["site"] == "h1"
    # the audit of the wiped state names the ledger the server saw
    audit = seen["audit_wiped"]
    assert audit.exit_code == 1 and "NOT EXTENDING" in audit.output
    assert f"{seen['before']['entries']} entries" in audit.output
    # round 3: after the explicit reinit h1 trains; the server notes the reinit
    assert any(a["round"] == 3 and a["reinitialised"] for a in alerts)
    entries = Ledger.open(sites[0].state_dir, hospital="h1").read()
    assert [e.kind for e in entries] == ["reinit", "train"]
    assert entries[0].details["previous_head"]["last_hash"] == seen["before"]["last_hash"]
    res = runner.invoke(app, ["audit", str(tmp_path / "s1"), "--heads", str(heads_file), "--json"])
    h1 = json.loads(res.output)["hospitals"][0]
    assert h1["reinits"] and "state disk replaced" in h1["reinits"][0]
    assert any("re-initialised" in w and "budget restarted" in w for w in h1["warnings"])
    assert h1["status"] == "OK"  # an explicit, recorded reinit is visible, not an error
