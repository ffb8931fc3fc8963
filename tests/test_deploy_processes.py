"""Real Flower processes on 127.0.0.1 (free ports chosen at run time), TLS + node authentication.

Negative paths: an unregistered hospital key is refused, a SuperNode without (or with the
wrong) CA certificate cannot connect, an unreachable server gives a clear message, and
`fedrg server --insecure` warns loudly. Every process started here is stopped by PID,
also when a test fails: each one carries a marker in its environment, and a finalizer
asserts that no process with the marker is left (and kills any it finds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fedrg.deploy import processes as P
from fedrg.deploy.certs import init_certs
from fedrg.deploy.keys import new_hospital_keys
from fedrg.errors import DeployError

pytestmark = pytest.mark.slow

MARK = "FEDRG_TEST_PROCESS_MARK"


def marked_processes(mark: str) -> list[psutil.Process]:
    """Processes whose environment carries ``mark`` (our processes and all they spawned)."""
    out = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(MARK) == mark and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def assert_none_left(mark: str, grace: float = 15.0) -> None:
    """Fail (after killing them) if processes with ``mark`` survive ``grace`` seconds."""
    deadline = time.monotonic() + grace
    left = marked_processes(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = marked_processes(mark)
    if left:
        desc = [(p.pid, " ".join(p.cmdline()[:3])) for p in left]
        for p in left:
            p.kill()
        psutil.wait_procs(left, timeout=5)
        pytest.fail(f"processes left running: {desc}")


@pytest.fixture(scope="module")
def mark():
    m = uuid.uuid4().hex
    yield m
    assert_none_left(m)


@pytest.fixture(scope="module")
def base_env(mark):
    return {**os.environ, MARK: mark}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, base_env):
    """A SuperLink with TLS and SuperNode authentication; hospital-1 registered, hospital-2 not."""
    root = tmp_path_factory.mktemp("federation")
    certs = init_certs(root / "certs")
    h1 = new_hospital_keys(root / "hospital-1", name="hospital-1")
    h2 = new_hospital_keys(root / "hospital-2", name="hospital-2")
    port = P.free_port()
    address = f"127.0.0.1:{port}"
    env = P.flower_env(root / "flwr-home", base=base_env)
    P.write_flwr_config(root / "flwr-home", address=address, root_certificates=certs.ca_cert)
    group = P.ProcessGroup(root / "logs")
    try:
        link = group.start("superlink", P.superlink_argv(
            host="127.0.0.1", port=port,
            tls=P.TlsFiles(certs.ca_cert, certs.server_cert, certs.server_key)), env=env)
        P.wait_http_ready(link, address, ca_cert=certs.ca_cert, timeout=60, group=group)
        P.register_supernode(h1.node_public, env=env, name="hospital-1")
        yield {"root": root, "certs": certs, "h1": h1, "h2": h2, "address": address,
               "env": env, "group": group, "link": link}
    finally:
        group.close()
        for pid in group.tracked_pids():
            assert not psutil.pid_exists(pid) or \
                psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"pid {pid} still runs"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from fedrg.config import DataConfig
    from fedrg.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("cohorts"), hospitals=1, patients=10, seed=5,
                      data_cfg=DataConfig())[0]


def _hospital_config(path: Path, *, cohort: Path, state: Path, address: str, ca: Path,
                     key: Path, timeout: float = 20) -> Path:
    path.write_text(f"""
[site]
name = "hospital-1"
cohort = "{cohort}"
state_dir = "{state}"
[server]
address = "{address}"
root_certificates = "{ca}"
connect_timeout_s = {timeout}
[auth]
private_key = "{key}"
[policy]
require_secagg = false   # these tests are about processes and connections, not secure sums
""")
    return path


@pytest.fixture
def cli_mark():
    return uuid.uuid4().hex


@pytest.fixture
def cli(cli_mark):
    """Start `python -m fedrg.cli ...` subprocesses; at teardown none of them (nor anything
    they started) may be left, and any that is gets killed."""
    started: list[subprocess.Popen] = []
    env = {**os.environ, MARK: cli_mark}

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedrg.cli", *args], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert_none_left(cli_mark)


def _read_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """Read the CLI's output until ``needle`` appears or the process exits."""
    import selectors

    out = ""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and needle not in out:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            out += line
    return out


def test_registered_hospital_connects_and_sigterm_stops_its_processes(
        federation, cohort, cli, tmp_path):
    """Positive control for the negative tests below (same server, same CA)."""
    f = federation
    cfg = _hospital_config(tmp_path / "h1.toml", cohort=cohort, state=tmp_path / "state",
                           address=f["address"], ca=f["certs"].ca_cert, key=f["h1"].node_private)
    proc = cli("client", "--config", str(cfg))
    out = _read_until(proc, "connected to", timeout=60)
    assert "connected to" in out, out + (tmp_path / "state/logs/supernode.log").read_text()
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("fedrg.deploy.fast_supernode" in " ".join(c.cmdline()) for c in children)
    node_log = (tmp_path / "state/logs/supernode.log").read_text()
    assert "SuperNode ID:" in node_log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"left running after SIGTERM: {[p.pid for p in alive]}"


def test_unregistered_key_is_refused(federation, cohort, cli, tmp_path):
    f = federation
    cfg = _hospital_config(tmp_path / "h2.toml", cohort=cohort, state=tmp_path / "state",
                           address=f["address"], ca=f["certs"].ca_cert, key=f["h2"].node_private)
    proc = cli("client", "--config", str(cfg))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "refused this hospital's node key" in out and "node_auth.pub" in out
    log = (tmp_path / "state/logs/supernode.log").read_text()
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log


@pytest.mark.parametrize("ca", ["none", "other"])
def test_supernode_without_the_federation_ca_cannot_connect(federation, tmp_path, ca):
    f = federation
    # "none": no --root-certificates, so the system trust store is used (it does not
    # know the federation's private CA); "other": a CA from another `fedrg certs init`.
    root_cert = init_certs(tmp_path / "other").ca_cert if ca == "other" else None
    argv = P.supernode_argv(superlink=f["address"], root_cert=root_cert,
                            auth_key=f["h1"].node_private, node_config={},
                            port=P.free_port(), max_wait_time=10)
    if root_cert is None:
        assert "--insecure" in argv
        argv.remove("--insecure")  # TLS with the default trust store
    with P.ProcessGroup(tmp_path / "logs") as group:
        node = group.start("supernode", argv, env=f["env"])
        with pytest.raises(DeployError, match="does not vouch for") as err:
            P.wait_supernode_connected(node, superlink=f["address"], timeout=60, group=group)
        assert "ca.crt" in str(err.value)
        assert "CERTIFICATE_VERIFY_FAILED" in node.log_text()
        assert "SuperNode ID:" not in node.log_text()


def test_unreachable_server_gives_a_clear_message(cohort, cli, tmp_path):
    from fedrg.deploy.certs import init_certs as make

    certs = make(tmp_path / "certs")
    keys = new_hospital_keys(tmp_path / "state")
    cfg = _hospital_config(tmp_path / "h.toml", cohort=cohort, state=tmp_path / "state",
                           address=f"127.0.0.1:{P.free_port()}", ca=certs.ca_cert,
                           key=keys.node_private, timeout=3)
    proc = cli("client", "--config", str(cfg))
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 2, out
    assert "cannot reach the server" in out and "Connection refused" in out


def test_insecure_server_warns_loudly_and_stops_everything_on_failure(tmp_path, cli, cli_mark):
    cfg = tmp_path / "server.toml"
    cfg.write_text(f"""
state_dir = "{tmp_path / 'state'}"
[superlink]
port = {P.free_port()}
[run]
app_dir = "{tmp_path / 'not-an-app'}"
""")
    # a valid pyproject (all run-config keys declared) but no app modules: the SuperLink
    # starts, then `flwr run` fails while building the app bundle
    (tmp_path / "not-an-app").mkdir()
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    (tmp_path / "not-an-app" / "pyproject.toml").write_text(pyproject.read_text())
    proc = cli("server", "--config", str(cfg), "--insecure")
    out, _ = proc.communicate(timeout=120)
    assert "TLS IS OFF" in out and "never with real patient data" in out
    assert proc.returncode == 2, out
    assert "submitting the run failed" in out
    log = (tmp_path / "state/logs/superlink.log").read_text()
    assert "Starting Flower SuperLink" in log  # it did start, and was then stopped
    assert_none_left(cli_mark, grace=15)


def test_client_reports_a_lost_server_and_stops_its_supernode(cohort, cli, tmp_path, base_env):
    """Flower's SuperNode keeps running after it gives up reconnecting; `fedrg client` must
    notice, stop it, and say what happened (exit status 3)."""
    certs = init_certs(tmp_path / "certs")
    keys = new_hospital_keys(tmp_path / "state", name="hospital-1")
    port = P.free_port()
    address = f"127.0.0.1:{port}"
    env = P.flower_env(tmp_path / "flwr-home", base=base_env)
    P.write_flwr_config(tmp_path / "flwr-home", address=address, root_certificates=certs.ca_cert)
    cfg = _hospital_config(tmp_path / "h.toml", cohort=cohort, state=tmp_path / "state",
                           address=address, ca=certs.ca_cert, key=keys.node_private, timeout=3)
    with P.ProcessGroup(tmp_path / "logs") as group:
        link = group.start("superlink", P.superlink_argv(
            host="127.0.0.1", port=port,
            tls=P.TlsFiles(certs.ca_cert, certs.server_cert, certs.server_key)), env=env)
        P.wait_http_ready(link, address, ca_cert=certs.ca_cert, timeout=60, group=group)
        P.register_supernode(keys.node_public, env=env)
        proc = cli("client", "--config", str(cfg))
        out = _read_until(proc, "connected to", timeout=60)
        assert "connected to" in out, out
        group.stop(link)  # the server goes away
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out + rest
    assert "lost the connection to the server" in rest
