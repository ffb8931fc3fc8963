"""Issue 24 item 2: a deployed run of its own, and issue 24 item 3's quorum.

* ``fedrg server`` refuses a non-empty ``[run] run_dir`` without ``--resume`` with one line
  naming the directory, the config and the fix, before anything is started or changed.
* The run waits for as many hospitals as the allowed hospitals' published
  ``min_secagg_peers`` need in a secure sum (``federation.min_hospitals`` is raised), or says
  at once that it never could.
* A hospital's progress line for an evaluation release says so (not "round N trained").
* A hospital knows a normal end: it answered the run's last message (the ledger copy) and
  then its SuperNode cannot reach the server (read from a real SuperNode log's lines).
* A run that aggregated nothing writes no adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.config import load_config
from fedrg.deploy.run_plan import check_run_dir, hospitals_needed
from fedrg.deploy.settings import load_server_settings
from fedrg.deploy.supernode_log import server_gone_after_run
from fedrg.deploy.watch import ledger_line
from fedrg.errors import FedrgError
from fedrg.hospital.run_end import clear_run_end, note_run_end, run_ended_since


def _server_toml(tmp_path: Path, *, peers: tuple[int | None, ...] = (None, None, None),
                 overrides: str = '"federation.min_hospitals=2"') -> Path:
    tables = "".join(
        f'[[auth.hospitals]]\nname = "hospital-{i}"\npublic_key = "h{i}.pub"\n'
        + ("" if p is None else f"min_secagg_peers = {p}\n")
        for i, p in enumerate(peers, 1))
    path = tmp_path / "server.toml"
    path.write_text(f'state_dir = "state"\n[tls]\nca_cert = "certs/ca.crt"\n'
                    'server_cert = "certs/server.pem"\nserver_key = "certs/server.key"\n'
                    f'{tables}[run]\nrun_dir = "run"\noverrides = [{overrides}]\n')
    return path


def test_server_refuses_a_run_dir_that_holds_another_run(tmp_path: Path) -> None:
    config = _server_toml(tmp_path)
    old = tmp_path / "run" / "metrics.json"
    old.parent.mkdir()
    old.write_text('{"rounds": [{"round": 1}]}')
    res = CliRunner().invoke(app, ["server", "--config", str(config)])
    assert res.exit_code == 2, res.output
    msg = " ".join(res.output.split())
    assert f"run_dir = {tmp_path / 'run'}" in msg and str(config) in msg
    assert "--resume" in msg and "new directory" in msg
    assert "Traceback" not in res.output
    assert old.read_text() == '{"rounds": [{"round": 1}]}'  # nothing lost
    assert not (tmp_path / "state").exists()  # nothing started


def test_run_dir_check_cases(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    check_run_dir(tmp_path / "new", config=cfg, resume=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty", config=cfg, resume=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    check_run_dir(tmp_path / "full", config=cfg, resume=True)  # --resume continues it
    with pytest.raises(FedrgError, match="already holds a run"):
        check_run_dir(tmp_path / "full", config=cfg, resume=False)
    with pytest.raises(FedrgError, match="is a file"):
        check_run_dir(tmp_path / "full" / "x", config=cfg, resume=False)


def test_quorum_is_raised_to_what_the_hospitals_policies_need(tmp_path: Path) -> None:
    config = _server_toml(tmp_path)
    s = load_server_settings(config)
    cfg = load_config(None, s.run.overrides)
    q = hospitals_needed(s, cfg, config=config, insecure=False)
    assert (q.requested, q.needed, q.raised) == (2, 3, True)
    assert "min_secagg_peers = 2" in q.reason and "3 hospitals" in q.reason
    # hospitals that publish min_secagg_peers = 1: two are enough
    s1 = load_server_settings(_server_toml(tmp_path, peers=(1, 1, 1)))
    assert not hospitals_needed(s1, cfg, config=config, insecure=False).raised
    # without secure aggregation no secure sum constrains the quorum
    plain = load_config(None, [*s.run.overrides, "secagg.enabled=false"])
    assert not hospitals_needed(s, plain, config=config, insecure=False).raised


def test_quorum_larger_than_the_allowed_hospitals_is_refused_at_once(tmp_path: Path) -> None:
    config = _server_toml(tmp_path, peers=(2, 2))
    s = load_server_settings(config)
    cfg = load_config(None, s.run.overrides)
    with pytest.raises(FedrgError, match=r"needs 3 hospitals .* allows only 2"):
        hospitals_needed(s, cfg, config=config, insecure=False)
    # through the command: real TLS files and node keys, refused before anything starts
    from fedrg.deploy.certs import init_certs
    from fedrg.deploy.keys import new_hospital_keys

    init_certs(tmp_path / "certs")
    for i in (1, 2):
        keys = new_hospital_keys(tmp_path / f"k{i}", name=f"hospital-{i}")
        (tmp_path / f"h{i}.pub").write_bytes(keys.node_public.read_bytes())
    res = CliRunner().invoke(app, ["server", "--config", str(config)])
    assert res.exit_code == 2 and "allows only 2" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "state").exists()


def _entry(kind: str, accountant: str = "rdp", steps: int = 1) -> dict:
    return {"hospital": "hospital-1", "round": 2, "kind": kind, "epsilon": 3.5, "budget": 10.0,
            "delta": 1e-5, "mechanism": {"accountant": accountant, "steps": steps,
                                         "noise_multiplier": 1.0, "sample_rate": 1.0}}


def test_evaluation_release_is_not_printed_as_a_trained_round() -> None:
    line = ledger_line(_entry("evaluation"))
    assert "trained" not in line and "DP-SGD" not in line
    assert "round 2 evaluation metrics released with DP" in line
    assert "exactly (no DP)" in ledger_line(_entry("evaluation", accountant="none"))
    train = ledger_line(_entry("train", steps=24))
    assert "round 2 trained, 24 DP-SGD steps, epsilon spent 3.500 of 10" in train
    assert "WITHOUT DP" in ledger_line(_entry("train", accountant="none"))


# the end of a real hospital's supernode.log after the server finished and shut down
NORMAL_END = """\
INFO :      [RUN 745220007724647205, ROUND 3]
INFO :      Receiving: evaluate.ledger message (ID: 0a35)
INFO :      Received successfully
INFO :      Start `flwr-clientapp` process
INFO :      [RUN 745220007724647205, ROUND 3]
INFO :      Sending: evaluate.ledger message (ID: fd8c)
INFO :      Sent successfully
WARNING :   Connection attempt failed, retrying in 0.47 seconds
"""


def test_normal_end_is_the_ledger_reply_then_no_server(tmp_path: Path) -> None:
    assert server_gone_after_run(NORMAL_END)
    mid_run = NORMAL_END.replace("evaluate.ledger", "train.secagg_unmask")
    assert not server_gone_after_run(mid_run)  # lost mid-run: exit 3 as before
    assert not server_gone_after_run(NORMAL_END.rsplit("WARNING", 1)[0])  # server still up
    assert not run_ended_since(tmp_path, 0.0)
    note_run_end(tmp_path)
    assert run_ended_since(tmp_path, 0.0)
    assert not run_ended_since(tmp_path, 4e9)  # a note older than this client's start
    clear_run_end(tmp_path)  # a message of a new run
    assert not run_ended_since(tmp_path, 0.0)


def test_answering_the_ledger_request_notes_the_end(tmp_path: Path) -> None:
    from privacy_ledger_helpers import STANDARD_ROUNDS, write_ledger

    from fedrg.config import SiteConfig
    from fedrg.hospital.answer import answer
    from fedrg.payload import Payload

    write_ledger(tmp_path, STANDARD_ROUNDS[:1], hospital="hospital-1")
    site = SiteConfig(name="hospital-1", cohort=str(tmp_path / "cohort"),
                      state_dir=str(tmp_path))
    reply = answer("ledger", site, Payload(), Payload())
    assert "ledger.jsonl" in reply.meta["files"]
    assert json.loads((tmp_path / "run-ended.json").read_text())["time"] > 0
    assert run_ended_since(tmp_path, 0.0)


@pytest.mark.slow
def test_a_run_that_aggregated_nothing_writes_no_adapter(tmp_path: Path, base_dir, fx_root) -> None:
    """Every hospital declines (its policy requires DP, the request has none): the run stops
    early, its metrics say why, and no adapter claims to be a trained model."""
    from model_fixtures import tiny_cohort

    from fedrg.config import SiteConfig
    from fedrg.federated.local import LocalTransport
    from fedrg.federated.runner import run_federation
    from fedrg.model.fingerprint import model_content_hash
    from fedrg.policy import SitePolicy

    policy = SitePolicy(allowed_base_models=[model_content_hash(base_dir)], require_secagg=False)
    sites = [SiteConfig(name=f"h{i}", cohort=str(tiny_cohort(fx_root, patients=24, seed=20 + i)),
                        state_dir=str(tmp_path / f"s{i}"), policy=policy) for i in (1, 2)]
    cfg = load_config(None, [
        f"model.base={base_dir}", "model.encoder_width=16", "model.lora_rank=4",
        "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]",
        "training.batch_size=6", "federation.rounds=1", "federation.min_hospitals=2",
        "federation.fraction_evaluate=0.0", "privacy.enabled=false", "secagg.enabled=false"])
    result = run_federation(LocalTransport(sites), cfg, tmp_path / "run")
    assert result.stopped_early
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not (tmp_path / "run" / "adapter").exists()
