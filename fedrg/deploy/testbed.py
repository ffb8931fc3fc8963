"""A local deployment test bed: certificates, keys, roster, cohorts and the TOML files.

What `fedrg server` and each `fedrg client` need to run a real TLS federation on one
machine (localhost), written into one directory: a private CA and server certificate, each
hospital's node and ledger keys, the roster they pin, synthetic cohorts, the experiment, the
server's TOML (its authorised hospitals) and each hospital's TOML (its own ``[policy]``).
Used by the deployment tests, the attack tests and ``benchmarks/deployment_latency.py``;
docs/deployment.md shows the same steps by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Testbed:
    """Where :func:`write_testbed` put everything."""

    root: Path
    port: int
    certs: Any  # fedrg.deploy.certs.CertPaths
    keys: dict[str, Any]  # hospital name -> fedrg.deploy.keys.HospitalKeys
    cohorts: dict[str, Path]  # hospital name -> cohort directory (hospitals with a TOML)
    roster: Path | None
    server_toml: Path

    def hospital_toml(self, name: str) -> Path:
        """The ``fedrg client --config`` file of hospital ``name``."""
        return self.root / f"{name}.toml"


def write_testbed(root: str | Path, *, experiment: str, hospitals: Sequence[str],
                  patients: int, seed: int, extra_keys: Sequence[str] = (),
                  roster: bool = True, policy: str = "epsilon_budget = 20.0\n",
                  run: str = "timeout_s = 1500\n", connect_timeout_s: int = 120) -> Testbed:
    """Write a local deployment into ``root`` and return its paths.

    Parameters
    ----------
    root
        The directory (created); ``fedrg server``/``client`` run with it as working directory
        or with the absolute paths in the TOML files.
    experiment
        The experiment TOML text (``root/experiment.toml``).
    hospitals
        Hospital names: each gets keys, a synthetic cohort, a TOML and a place in the
        server's authorised list (and in the roster).
    patients, seed
        Synthetic cohort size (mean) and seed.
    extra_keys
        Names that get keys only (not authorised, no TOML): an outsider for attack tests.
    roster
        Write ``roster.toml`` of ``hospitals`` and pin it in each hospital's TOML.
    policy
        The body of each hospital's ``[policy]`` table.
    run
        Extra lines of the server's ``[run]`` table (after experiment and run_dir).
    connect_timeout_s
        How long a hospital waits for the server.
    """
    import tomllib

    from fedrg.config import load_config
    from fedrg.data.synth import synthesize
    from fedrg.deploy.certs import init_certs
    from fedrg.deploy.keys import new_hospital_keys
    from fedrg.deploy.processes import free_port
    from fedrg.secagg.roster import Roster, entry_from_files, write_roster

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "experiment.toml").write_text(experiment)
    cfg = load_config(root / "experiment.toml")
    dirs = synthesize(root / "cohorts", hospitals=len(hospitals), patients=patients, seed=seed,
                      data_cfg=cfg.data)
    cohorts = dict(zip(hospitals, dirs, strict=True))
    certs = init_certs(root / "certs")
    keys = {h: new_hospital_keys(root / h, name=h) for h in (*hospitals, *extra_keys)}
    roster_path = write_roster(root / "roster.toml", Roster(
        [entry_from_files(h, keys[h].ledger_public, keys[h].node_public) for h in hospitals])
    ) if roster else None
    port = free_port()
    # the operator lists what each hospital's policy publishes: its fewest secure-sum peers
    peers = tomllib.loads(policy).get("min_secagg_peers")
    published = "" if peers is None else f"min_secagg_peers = {int(peers)}\n"
    allowed = "".join(f'[[auth.hospitals]]\nname = "{h}"\npublic_key = "{keys[h].node_public}"\n'
                      f"{published}" for h in hospitals)
    server_toml = root / "server.toml"
    server_toml.write_text(f"""
state_dir = "server-state"
[superlink]
port = {port}
[tls]
ca_cert = "{certs.ca_cert}"
server_cert = "{certs.server_cert}"
server_key = "{certs.server_key}"
{allowed}
[run]
experiment = "experiment.toml"
run_dir = "run"
{run}""")
    pin = f'roster = "{roster_path}"\n' if roster_path else ""
    for h in hospitals:
        (root / f"{h}.toml").write_text(f"""
experiment = "experiment.toml"
[site]
name = "{h}"
cohort = "{cohorts[h]}"
state_dir = "{h}"
{pin}[server]
address = "127.0.0.1:{port}"
root_certificates = "{certs.ca_cert}"
connect_timeout_s = {connect_timeout_s}
[auth]
private_key = "{keys[h].node_private}"
[policy]
{policy}""")
    return Testbed(root, port, certs, keys, cohorts, roster_path, server_toml)


# --------------------------------------------------------------------------- processes


def start_fedrg(args: list[str], log: Path, *, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> Any:
    """``python -m fedrg.cli ARGS`` in its own process group (in ``cwd``), output into ``log``."""
    import subprocess
    import sys

    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedrg.cli", *args], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)


def stop_all(procs: Sequence[Any], *, timeout: float = 30.0) -> None:
    """SIGTERM each still-running process (fedrg stops its Flower processes and worker
    itself), wait ``timeout`` s, then SIGKILL the process group of any that did not stop."""
    import os
    import signal
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def wait_for_text(text: str, log: Path, proc: Any, timeout: float) -> str:
    """Wait until ``text`` appears in ``log``; return the log.

    Raises
    ------
    TimeoutError
        If ``proc`` exits or ``timeout`` s pass first (with the log's tail).
    """
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = log.read_text(errors="replace") if log.exists() else ""
        if text in out:
            return out
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise TimeoutError(f"{text!r} not seen in {log} (exit {proc.poll()}):\n{tail}")


#: environment variable that marks every process a test (or a script) started, children included
PROCESS_MARK = "FEDRG_TEST_PROCESS_MARK"


def marked_processes(mark: str) -> list[Any]:
    """Live processes (not this one, not zombies) whose environment carries
    ``PROCESS_MARK=mark``: what a run started, to stop and to check that nothing survived."""
    import os

    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(PROCESS_MARK) == mark and \
                    p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out
