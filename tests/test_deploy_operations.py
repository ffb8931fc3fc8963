"""Operations of a deployment, fast: the public ledger copy a hospital sends (and what the
server refuses to write), `fedrg audit RUN` over the copies, the progress lines of server
and hospital, and the hospital TOML's [app] pin.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrg.deploy.settings import load_hospital_settings
from fedrg.deploy.watch import (
    LineFollower,
    MetricsFollower,
    ledger_line,
    ledger_lines,
    round_line,
)
from fedrg.errors import ConfigError
from fedrg.federated.ledger_copy import write_ledger_copies
from fedrg.hospital.ledger_copy import public_ledger_payload
from fedrg.payload import Payload, meta_from_json, meta_to_json
from tests.privacy_ledger_helpers import STANDARD_ROUNDS, write_ledger


@pytest.fixture(scope="module")
def hospital_state(tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("hospital-1")
    write_ledger(state, STANDARD_ROUNDS[:3], hospital="hospital-1")
    return state


def _wire(p: Payload) -> Payload:
    """What the server receives: the payload's meta through its JSON wire encoding."""
    return Payload(meta=meta_from_json(meta_to_json(p.meta)))


def test_public_copy_holds_only_public_files(hospital_state):
    p = public_ledger_payload(hospital_state, "hospital-1")
    assert (hospital_state / "ledger_ed25519.pem").is_file()  # the signing key exists ...
    assert set(p.meta["files"]) == {"ledger.jsonl", "ledger_head.json", "ledger_ed25519.pub"}
    assert p.meta["site"] == "hospital-1" and not p.arrays  # ... and is not sent


def test_copies_written_for_audit_and_audit_passes(hospital_state, tmp_path):
    from fedrg.cli import app

    run_dir = tmp_path / "run"
    written = write_ledger_copies(run_dir, {7: _wire(public_ledger_payload(hospital_state,
                                                                           "hospital-1"))})
    assert written == {"hospital-1": run_dir / "ledgers" / "hospital-1"}
    assert (run_dir / "ledgers" / "hospital-1" / "ledger.jsonl").read_bytes() == \
        (hospital_state / "ledger.jsonl").read_bytes()
    res = CliRunner().invoke(app, ["audit", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "hospital-1" in res.output


def test_tampered_copy_fails_audit(hospital_state, tmp_path):
    from fedrg.cli import app

    p = _wire(public_ledger_payload(hospital_state, "hospital-1"))
    lines = p.meta["files"]["ledger.jsonl"].decode().splitlines()
    first = json.loads(lines[0])
    first["epsilon"] = first["epsilon"] / 2  # under-report the privacy spent
    lines[0] = json.dumps(first, sort_keys=True, separators=(",", ":"))
    p.meta["files"]["ledger.jsonl"] = ("\n".join(lines) + "\n").encode()
    write_ledger_copies(tmp_path / "run", {1: p})
    res = CliRunner().invoke(app, ["audit", str(tmp_path / "run")])
    assert res.exit_code != 0


@pytest.mark.parametrize("site", ["../escape", "a/b", "", ".hidden", "x" * 80])
def test_hostile_site_names_are_not_written(hospital_state, tmp_path, site):
    p = _wire(public_ledger_payload(hospital_state, "hospital-1"))
    p.meta["site"] = site
    assert write_ledger_copies(tmp_path / "run", {1: p}) == {}
    assert not (tmp_path / "escape").exists()
    assert not any((tmp_path / "run").rglob("ledger.jsonl"))


def test_files_other_than_the_public_ones_are_refused(hospital_state, tmp_path):
    p = _wire(public_ledger_payload(hospital_state, "hospital-1"))
    p.meta["files"]["ledger_ed25519.pem"] = b"secret"
    assert write_ledger_copies(tmp_path / "run", {1: p}) == {}
    q = _wire(public_ledger_payload(hospital_state, "hospital-1"))
    first = write_ledger_copies(tmp_path / "run2", {1: q, 2: q})
    assert list(first) == ["hospital-1"]  # a second claim to the same name is ignored


def test_hospital_progress_line_per_ledger_entry(tmp_path):
    state = tmp_path / "h"
    follower = LineFollower(state / "ledger.jsonl")  # before the ledger exists
    assert ledger_lines(follower) == []
    write_ledger(state, STANDARD_ROUNDS[:2], hospital="hospital-1", budget=10.0)
    lines = ledger_lines(follower)
    assert len(lines) == 2
    entries = [json.loads(x) for x in (state / "ledger.jsonl").read_text().splitlines()]
    for line, e in zip(lines, entries, strict=True):
        assert line == ledger_line(e)
        assert f"round {e['round']} trained" in line
        assert f"{e['mechanism']['steps']} DP-SGD steps" in line
        assert f"epsilon spent {e['epsilon']:.3f} of 10" in line
        assert f"({10 - e['epsilon']:.3f} left" in line
    assert ledger_lines(follower) == []  # nothing new


def test_line_follower_waits_for_complete_lines(tmp_path):
    path = tmp_path / "log"
    path.write_text("")
    f = LineFollower(path)
    with open(path, "a") as fh:
        fh.write("one\ntw")
    assert f.new_lines() == ["one"]
    with open(path, "a") as fh:
        fh.write("o\n")
    assert f.new_lines() == ["two"]


def test_server_progress_line_and_metrics_follower(tmp_path):
    from fedrg.federated.server import write_metrics

    row = {"round": 1, "participants": 2, "loss": 0.6931, "auroc": {"idh_mutant": 0.75},
           "epsilon": {"hospital-1": 1.25, "hospital-2": 1.5}}
    line = round_line(row, ["idh_mutant", "mgmt_methylated"])
    assert line.startswith("round 1  2 hospital(s) trained  loss 0.6931")
    assert "AUROC idh_mutant 0.750" in line and "mgmt_methylated" not in line
    assert "epsilon hospital-1 1.250, hospital-2 1.500" in line
    follower = MetricsFollower(tmp_path / "metrics.json")
    assert follower.new_rounds() == []
    write_metrics(tmp_path, {"rounds": [row]})
    assert follower.new_rounds() == [row]
    write_metrics(tmp_path, {"rounds": [row, {**row, "round": 2}]})
    os.utime(tmp_path / "metrics.json", (1, 1))  # a rewrite within the same mtime tick
    assert [r["round"] for r in follower.new_rounds()] == [2]


def _hospital_toml(tmp_path: Path, app: str) -> Path:
    p = tmp_path / "h.toml"
    p.write_text(f"""
[site]
name = "hospital-1"
cohort = "c"
state_dir = "s"
[server]
address = "127.0.0.1:9092"
{app}
""")
    return p


def test_app_digest_setting(tmp_path):
    from fedrg.commands.deploy import approved_app
    from fedrg.deploy.pinning import installed_pin, pin_digest

    assert load_hospital_settings(_hospital_toml(tmp_path, "")).app.digest == ""
    with pytest.raises(ConfigError, match="app.digest"):
        load_hospital_settings(_hospital_toml(tmp_path, '[app]\ndigest = "abc"'))
    own = pin_digest(installed_pin())
    s = load_hospital_settings(_hospital_toml(tmp_path, f'[app]\ndigest = "{own.upper()}"'))
    assert approved_app(s).digest == own
    s = load_hospital_settings(_hospital_toml(tmp_path, f'[app]\ndigest = "{"0" * 64}"'))
    with pytest.raises(Exception, match="not the digest of this hospital's installed fedrg"):
        approved_app(s)


def test_clientapp_answers_ledger_with_the_public_copy_that_audits(hospital_state, tmp_path):
    """fedrg's real ClientApp, called by Flower with a received `evaluate.ledger` message; the
    reply goes through Flower's record encoding to the server's writer and `fedrg audit`."""
    import time

    from flwr.app import Context, Message, RecordDict
    from flwr.app.metadata import Metadata

    from fedrg.cli import app as cli
    from fedrg.flower.apps import build_client_app
    from fedrg.flower.records import payload_to_record, record_to_payload

    ctx = Context(run_id=1, node_id=5, state=RecordDict(), run_config={}, node_config={
        "cohort": str(tmp_path / "unused"), "state-dir": str(hospital_state),
        "site-name": "hospital-1"})
    md = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=5,
                  reply_to_message_id="", group_id="4", created_at=time.time(), ttl=3600,
                  message_type="evaluate.ledger")
    reply = build_client_app()(Message(content=payload_to_record(Payload()), metadata=md), ctx)
    assert not reply.has_error(), reply.error
    payload = record_to_payload(reply.content)
    assert set(payload.meta["files"]) == {"ledger.jsonl", "ledger_head.json",
                                          "ledger_ed25519.pub"}
    written = write_ledger_copies(tmp_path / "run", {5: payload})
    assert list(written) == ["hospital-1"]
    res = CliRunner().invoke(cli, ["audit", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
