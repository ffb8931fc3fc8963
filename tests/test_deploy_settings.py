"""Deployment settings files and every check `fedrg client` / `fedrg server` make before starting."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.config import DataConfig, SiteConfig
from fedrg.deploy.certs import init_certs, make_ca, write_cert
from fedrg.deploy.keys import new_hospital_keys
from fedrg.deploy.settings import load_hospital_settings, load_server_settings, node_config
from fedrg.errors import ConfigError, FedrgError
from fedrg.policy import SitePolicy

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    from fedrg.data.synth import synthesize

    out = tmp_path_factory.mktemp("cohorts")
    return synthesize(out, hospitals=1, patients=10, seed=3, data_cfg=DataConfig())


def _hospital_toml(path: Path, *, cohort: Path, state: Path, ca: Path, key: Path,
                   address: str = "127.0.0.1:9", extra: str = "") -> Path:
    path.write_text(f"""
{extra}
[site]
name = "hospital-1"
cohort = "{cohort}"
state_dir = "{state}"
[server]
address = "{address}"
root_certificates = "{ca}"
connect_timeout_s = 5
[auth]
private_key = "{key}"
[policy]
epsilon_budget = 4.0
epsilon_per_run = 4.0
""")
    return path


def test_example_configs_load_and_resolve_paths_next_to_the_file():
    s = load_server_settings(ROOT / "configs/server.example.toml")
    assert s.tls.ca_cert == str(ROOT / "deploy/certs/ca.crt")
    assert [h.name for h in s.auth.hospitals] == ["hospital-1", "hospital-2", "hospital-3"]
    assert s.run.experiment == str(ROOT / "configs/simulation.toml")
    h = load_hospital_settings(ROOT / "configs/hospital.example.toml")
    assert h.site.cohort == str(ROOT / "deploy/cohorts/hospital-1")
    assert h.auth.private_key == str(ROOT / "deploy/hospital-1/node_auth")
    assert h.site.roster == str(ROOT / "deploy/roster.toml")
    assert h.server.address == "127.0.0.1:9092"


def test_unknown_keys_and_bad_addresses_are_refused(tmp_path):
    bad = tmp_path / "server.toml"
    bad.write_text("[superlink]\nprot = 9092\n")
    with pytest.raises(ConfigError, match=r"unknown key 'superlink.prot'"):
        load_server_settings(bad)
    hosp = tmp_path / "h.toml"
    hosp.write_text('[site]\ncohort="c"\nstate_dir="s"\n[server]\naddress="https://x:1"\n')
    with pytest.raises(ConfigError, match="without a URL prefix"):
        load_hospital_settings(hosp)
    hosp.write_text('[site]\ncohort="c"\nstate_dir="s"\n')
    with pytest.raises(ConfigError, match="missing key 'server'"):
        load_hospital_settings(hosp)
    hosp.write_text('[site]\ncohort="c"\nstate_dir="s"\n[server]\naddress="x:1"\n'
                    '[policy]\nrequire_dp = false\nmin_peers = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key 'policy.min_peers'"):
        load_hospital_settings(hosp)


def test_example_hospital_policy_is_the_safe_default():
    h = load_hospital_settings(ROOT / "configs/hospital.example.toml")
    assert h.site.policy == SitePolicy()


def test_node_config_is_what_the_client_app_reads(tmp_path):
    """The keys `fedrg client` passes reach the ClientApp's site resolver unchanged."""
    from flwr.app import Context, RecordDict

    from fedrg.deploy.processes import node_config_arg
    from fedrg.flower.apps import site_from_node_config

    site = SiteConfig(name="h-1", cohort=str(tmp_path / "my cohort"), state_dir=str(tmp_path),
                      signing_key="", roster=str(tmp_path / "roster.toml"),
                      policy=SitePolicy(epsilon_budget=3.5, epsilon_per_run=3.0, require_secagg=False))
    # parse the rendered flag with Flower's own parser, as the SuperNode does
    from flwr.common.config import parse_config_args

    parsed = parse_config_args([node_config_arg(node_config(site))])
    ctx = Context(run_id=1, node_id=7, node_config=parsed, state=RecordDict(), run_config={})
    assert site_from_node_config(ctx) == site


def test_client_refuses_an_invalid_cohort_before_starting_anything(tmp_path, cohorts):
    import shutil

    bad = tmp_path / "cohort"
    shutil.copytree(cohorts[0], bad)
    manifest = bad / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([*lines, lines[1]]) + "\n")  # a patient twice
    certs = init_certs(tmp_path / "certs")
    keys = new_hospital_keys(tmp_path / "state")
    cfg = _hospital_toml(tmp_path / "h.toml", cohort=bad, state=tmp_path / "state",
                         ca=certs.ca_cert, key=keys.node_private)
    res = runner.invoke(app, ["client", "--config", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "problem" in res.output and "manifest.csv" in res.output
    assert not (tmp_path / "state" / "logs").exists()  # no SuperNode was started


def test_client_refuses_an_expired_or_wrong_ca_certificate(tmp_path, cohorts):
    now = dt.datetime.now(dt.timezone.utc)
    expired, _ = make_ca(not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=5))
    write_cert(tmp_path / "expired.crt", expired)
    keys = new_hospital_keys(tmp_path / "state")
    cfg = _hospital_toml(tmp_path / "h.toml", cohort=cohorts[0], state=tmp_path / "state",
                         ca=tmp_path / "expired.crt", key=keys.node_private)
    res = runner.invoke(app, ["client", "--config", str(cfg)])
    assert res.exit_code == 2 and "expired on" in res.output, res.output
    certs = init_certs(tmp_path / "certs")
    cfg = _hospital_toml(tmp_path / "h.toml", cohort=cohorts[0], state=tmp_path / "state",
                         ca=certs.server_cert, key=keys.node_private)
    res = runner.invoke(app, ["client", "--config", str(cfg)])
    assert res.exit_code == 2 and "not a CA certificate" in res.output, res.output
    assert not (tmp_path / "state" / "logs").exists()


def test_client_refuses_a_missing_or_exposed_node_key(tmp_path, cohorts):
    certs = init_certs(tmp_path / "certs")
    keys = new_hospital_keys(tmp_path / "state")
    keys.node_private.chmod(0o644)
    cfg = _hospital_toml(tmp_path / "h.toml", cohort=cohorts[0], state=tmp_path / "state",
                         ca=certs.ca_cert, key=keys.node_private)
    res = runner.invoke(app, ["client", "--config", str(cfg)])
    assert res.exit_code == 2 and "chmod 600" in res.output, res.output
    cfg = _hospital_toml(tmp_path / "h.toml", cohort=cohorts[0], state=tmp_path / "state",
                         ca=certs.ca_cert, key=tmp_path / "absent")
    res = runner.invoke(app, ["client", "--config", str(cfg)])
    assert res.exit_code == 2 and "fedrg keys new" in res.output, res.output


def test_client_refuses_a_missing_or_foreign_roster_before_starting_anything(tmp_path, cohorts):
    """Secure aggregation needs the pinned roster: checked when the client starts, not at the
    first secure sum (nothing is started, the message says what to do)."""
    from fedrg.secagg.roster import Roster, entry_from_files, write_roster

    certs = init_certs(tmp_path / "certs")
    keys = new_hospital_keys(tmp_path / "state", name="hospital-1")
    cfg = _hospital_toml(tmp_path / "h.toml", cohort=cohorts[0], state=tmp_path / "state",
                         ca=certs.ca_cert, key=keys.node_private)
    res = runner.invoke(app, ["client", "--config", str(cfg)])
    assert res.exit_code == 2 and "no federation roster" in res.output, res.output
    # a roster that does not list this hospital
    others = {h: new_hospital_keys(tmp_path / h, name=h) for h in ("hospital-2", "hospital-3")}
    roster = write_roster(tmp_path / "roster.toml", Roster(
        [entry_from_files(h, k.ledger_public, k.node_public) for h, k in others.items()]))
    cfg.write_text(cfg.read_text().replace("[server]", f'roster = "{roster}"\n[server]'))
    res = runner.invoke(app, ["client", "--config", str(cfg)])
    assert res.exit_code == 2 and "roster" in res.output and "hospital-1" in res.output, res.output
    assert not (tmp_path / "state" / "logs" / "supernode.log").exists()  # nothing was started


def test_server_refuses_to_run_without_tls(tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "st"}"\n[tls]\nca_cert = "nope/ca.crt"\n')
    res = runner.invoke(app, ["server", "--config", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "refusing to start without TLS" in res.output and "--insecure" in res.output
    assert not (tmp_path / "st").exists()  # nothing was started


def test_server_refuses_tls_without_allowed_hospitals(tmp_path):
    certs = init_certs(tmp_path / "certs")
    cfg = tmp_path / "server.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "st"}"\n[tls]\nca_cert = "{certs.ca_cert}"\n'
                   f'server_cert = "{certs.server_cert}"\nserver_key = "{certs.server_key}"\n')
    res = runner.invoke(app, ["server", "--config", str(cfg)])
    assert res.exit_code == 2 and "[[auth.hospitals]]" in res.output, res.output


def test_certs_and_keys_commands(tmp_path):
    res = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "c"), "--host", "fl.test"])
    assert res.exit_code == 0, res.output
    assert "fl.test" in res.output and (tmp_path / "c" / "server.key").is_file()
    res = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "refusing to overwrite" in res.output
    res = runner.invoke(app, ["keys", "new", "--out", str(tmp_path / "k"), "--name", "h9"])
    assert res.exit_code == 0, res.output
    assert "SHA256:" in res.output and (tmp_path / "k" / "node_auth.pub").is_file()


def test_server_refuses_two_hospitals_with_one_key(tmp_path):
    certs = init_certs(tmp_path / "certs")
    keys = new_hospital_keys(tmp_path / "h1")
    cfg = tmp_path / "server.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path / "st"}"\n[tls]\nca_cert = "{certs.ca_cert}"\n'
        f'server_cert = "{certs.server_cert}"\nserver_key = "{certs.server_key}"\n'
        f'[[auth.hospitals]]\nname = "a"\npublic_key = "{keys.node_public}"\n'
        f'[[auth.hospitals]]\nname = "b"\npublic_key = "{keys.node_public}"\n')
    res = runner.invoke(app, ["server", "--config", str(cfg)])
    assert res.exit_code == 2 and "same public key" in res.output, res.output
    assert not (tmp_path / "st").exists()


def test_undeclared_run_config_keys_are_named_before_starting(tmp_path):
    from fedrg.commands.deploy import check_app_run_config
    from fedrg.config import ExperimentConfig, to_run_config

    run_config = {**to_run_config(ExperimentConfig()), "fedrg.run_dir": "x"}
    check_app_run_config(ROOT, run_config)  # the repository's app declares every key
    text = (ROOT / "pyproject.toml").read_text().replace("lora_rank = ", "lora_rnk = ")
    (tmp_path / "pyproject.toml").write_text(text)
    with pytest.raises(FedrgError, match=r"model\.lora_rank.*sync_run_config"):
        check_app_run_config(tmp_path, run_config)


def test_the_app_is_staged_with_only_its_bundle_files(tmp_path):
    """`flwr run` rewrites the pyproject it is given: fedrg hands it a copy holding only
    pyproject.toml and the fab-include files (server/ and clients/ entry points)."""
    from fedrg.deploy.processes import stage_app

    staged = stage_app(ROOT, tmp_path / "app")
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert files == ["clients/__init__.py", "clients/app.py", "pyproject.toml",
                     "server/__init__.py", "server/app.py"]
    assert (staged / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "pyproject.toml").write_text("[tool.flwr.app]\npublisher = 'x'\n")
    with pytest.raises(FedrgError, match="fab-include"):
        stage_app(tmp_path / "bare", tmp_path / "app2")
