"""Attacks on a deployment, with real Flower processes over TLS on 127.0.0.1.

One deployment is shared by the module (Flower processes are slow): `fedrg server` (the
SuperLink behind fedrg's gate, TLS, node authentication, hospital-1 registered) whose
operator submits a **modified app bundle** (its `clients/app.py` would write a file at
import time), and `fedrg client` for hospital-1 with its real cohort.

- test_attack_modified_bundle: the hospital refuses the bundle before any of it runs.
- test_attack_outsider_registers_node / test_attack_outsider_submits_run: someone holding
  only the public ca.crt and the server's public address cannot register a node, list
  nodes or runs, or submit a run.
- test_attack_hospital_uses_operator_api: registered hospital-1, with its own settings,
  cannot either (through the flwr CLI, or raw HTTPS to the Control and Runtime APIs).

Each refusal is checked against a positive control on the operator's own loopback listener
(the same requests succeed there), so the tests cannot pass because the API is just down.
On one machine the operator's loopback port is reachable by every local user; in a real
deployment it is not reachable from the network (docs/deployment.md, Network).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from fedrg.deploy import processes as P
from fedrg.deploy.superlink_gate import REFUSAL
from fedrg.deploy.testbed import start_fedrg, stop_all, wait_for_text, write_testbed
from tests.test_deploy_processes import MARK, assert_none_left

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GATE_WORDS = "serves only the Fleet API"

EXPERIMENT = """
[federation]
hospitals = 1
rounds = 1
min_hospitals = 1
fraction_evaluate = 0.0
[data]
image_shape = [32, 32]
[privacy]
enabled = true
target_epsilon = 8.0
[secagg]
enabled = false
[training]
local_epochs = 0.5
batch_size = 8
threads = 1
"""


def _flwr_home(path: Path, *, address: str, ca: Path, base: dict[str, str]) -> dict[str, str]:
    P.write_flwr_config(path, address=address, root_certificates=ca)
    return P.flower_env(path, base=base)


def _json(res: subprocess.CompletedProcess) -> dict:
    try:
        return P._json_tail(res.stdout)
    except ValueError:
        return {}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):

    root = tmp_path_factory.mktemp("attacks")
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark}
    # the hostile operator's bundle: fedrg's app with a clients/app.py that acts on import
    evil = P.stage_app(ROOT, root / "evil-app")
    pwned = root / "pwned"
    client_app = evil / "clients" / "app.py"
    client_app.write_text(f"from pathlib import Path\nPath({str(pwned)!r}).write_text('ran')\n"
                          + client_app.read_text())
    bed = write_testbed(
        root, experiment=EXPERIMENT, hospitals=["hospital-1"], patients=12, seed=3,
        extra_keys=["outsider"], roster=False,
        run=f'app_dir = "{evil}"\ntimeout_s = 900\nkeep_running = true\n',
        # one hospital: these attacks are on the app bundle and the operator API, before any round
        policy="epsilon_budget = 20.0\nrequire_secagg = false\n")
    certs, port = bed.certs, bed.port
    h1, outsider = bed.keys["hospital-1"], bed.keys["outsider"]
    started: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        p = start_fedrg(args, log, env=env)
        started.append(p)
        return p

    try:
        server_log, client_log = root / "server.out", root / "hospital-1.out"
        server = start(["server", "--config", str(root / "server.toml")], server_log)
        out = wait_for_text("registered hospital-1", server_log, server, timeout=180)
        operator = next(line for line in out.splitlines() if "operator API on" in line)
        operator_address = operator.split("operator API on ")[1].split(" ")[0]
        # connect before the run starts, so the ServerApp finds the hospital at once
        client = start(["client", "--config", str(root / "hospital-1.toml")], client_log)
        wait_for_text("connected to", client_log, client, timeout=180)
        wait_for_text("submitted", server_log, server, timeout=180)
        yield {
            "root": root, "certs": certs, "h1": h1, "outsider": outsider, "pwned": pwned,
            "public": f"127.0.0.1:{port}", "operator": operator_address, "env": env,
            "operator_env": P.flower_env(root / "server-state" / "flwr-home", base=env),
            "server": server, "server_log": server_log, "client": client,
            "client_log": client_log, "evil": evil,
        }
    finally:
        stop_all(started)
        assert_none_left(mark, grace=20)


def _operator_nodes(d) -> list[str]:
    """Node ids, as the operator lists them on the loopback listener (positive control)."""
    res = P.run_flwr(["supernode", "list", P.CONNECTION_NAME, "--format", "json"],
                     env=d["operator_env"])
    data = _json(res)
    assert data.get("success"), P.strip_ansi(res.stdout + res.stderr)[-800:]
    return sorted(str(n["node-id"]) for n in data["nodes"])


def _operator_runs(d) -> list[str]:
    """Run ids, as the operator lists them on the loopback listener (positive control)."""
    res = P.run_flwr(["list", P.CONNECTION_NAME, "--format", "json"], env=d["operator_env"])
    data = _json(res)
    assert data.get("success"), P.strip_ansi(res.stdout + res.stderr)[-800:]
    return sorted(str(r["run-id"]) for r in data["runs"])


def _refused(res: subprocess.CompletedProcess) -> str:
    data = _json(res)
    text = P.strip_ansi(res.stdout + res.stderr)
    assert not data.get("success"), f"the request was accepted: {text[-800:]}"
    assert GATE_WORDS in text, text[-800:]
    return text


def test_attack_modified_bundle(deployment):
    d = deployment
    out = wait_for_text("refused:", d["client_log"], d["client"], timeout=420)
    assert "clients/app.py differs" in out, out[-3000:]
    assert "Nothing from it ran" in out
    # nothing of the bundle ran at the hospital: no marker file, no training, no ledger entry
    assert not d["pwned"].exists()
    assert not (d["root"] / "hospital-1" / "ledger.jsonl").exists()
    # the server got an error instead of an update: the round trained no hospital
    srv = wait_for_text("0 hospital(s) trained", d["server_log"], d["server"], timeout=300)
    assert "1 failed" in srv
    # the hospital stays connected, ready for an approved run
    assert d["client"].poll() is None


def test_attack_outsider_registers_node(deployment, tmp_path):
    d = deployment
    env = _flwr_home(tmp_path / "outsider-home", address=d["public"], ca=d["certs"].ca_cert,
                     base=d["env"])
    before = _operator_nodes(d)
    assert len(before) == 1  # hospital-1 (positive control: the operator's API answers)
    _refused(P.run_flwr(["supernode", "register", str(d["outsider"].node_public),
                         P.CONNECTION_NAME, "--format", "json"], env=env))
    _refused(P.run_flwr(["supernode", "list", P.CONNECTION_NAME, "--format", "json"], env=env))
    assert _operator_nodes(d) == before  # no node was added


def test_attack_outsider_submits_run(deployment, tmp_path):
    d = deployment
    env = _flwr_home(tmp_path / "outsider-home", address=d["public"], ca=d["certs"].ca_cert,
                     base=d["env"])
    runs_before = _operator_runs(d)
    app = P.stage_app(ROOT, tmp_path / "app")
    _refused(P.run_flwr(["run", str(app), P.CONNECTION_NAME, "--format", "json"], env=env,
                        timeout=180))
    _refused(P.run_flwr(["list", P.CONNECTION_NAME, "--format", "json"], env=env))
    assert _operator_runs(d) == runs_before


def _post(address: str, path: str, ca: Path) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(f"https://{address}{path}", data=b"", method="POST",
                                 headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=20) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def test_attack_hospital_uses_operator_api(deployment, tmp_path):
    from fedrg.deploy.settings import load_hospital_settings

    d = deployment
    s = load_hospital_settings(d["root"] / "hospital-1.toml")  # what the hospital knows
    env = _flwr_home(tmp_path / "hospital-home", address=s.server.address,
                     ca=Path(s.server.root_certificates), base=d["env"])
    nodes_before, runs_before = _operator_nodes(d), _operator_runs(d)
    _refused(P.run_flwr(["supernode", "register", str(d["outsider"].node_public),
                         P.CONNECTION_NAME, "--format", "json"], env=env))
    _refused(P.run_flwr(["supernode", "list", P.CONNECTION_NAME, "--format", "json"], env=env))
    _refused(P.run_flwr(["list", P.CONNECTION_NAME, "--format", "json"], env=env))
    _refused(P.run_flwr(["run", str(d["evil"]), P.CONNECTION_NAME, "--format", "json"],
                        env=env, timeout=180))
    # raw HTTPS, as a hostile SuperNode would send it: the Control and Runtime APIs are
    # answered by the gate on the public listener, by Flower on the operator's
    for path in ("/v1/control/list-runs", "/v1/control/register-node",
                 "/v1/runtime/get-nodes", "/v1/runtime/pull-messages"):
        status, body = _post(s.server.address, path, Path(s.server.root_certificates))
        assert status == 403 and json.loads(body)["detail"] == REFUSAL, (path, status, body)
        status, _ = _post(d["operator"], path, d["certs"].ca_cert)
        assert status != 403, path
    assert _operator_nodes(d) == nodes_before
    assert _operator_runs(d) == runs_before
    shutil.rmtree(tmp_path / "hospital-home", ignore_errors=True)
