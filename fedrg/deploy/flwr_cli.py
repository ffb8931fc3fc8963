"""Driving Flower's command-line programs: environment, SuperLink/SuperNode command lines,
the ``flwr`` CLI (register, stage, submit, wait) and readiness of the SuperLink's API.

It launches Flower's programs through :mod:`fedrg.deploy.supervise`; it does not import ``flwr``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedrg.deploy.supervise import ManagedProcess, ProcessGroup
from fedrg.errors import DeployError
from fedrg.runtime import OFFLINE_ENV

# fedrg's offline environment (fedrg.runtime, the one place it is defined) plus: never let
# Flower install an app's dependencies.
TELEMETRY_OFF = {**OFFLINE_ENV, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CONNECTION_NAME = "fedrg"


# --------------------------------------------------------------------------- environment

def flower_bin(name: str) -> str:
    """Path of a Flower program installed next to this Python (falls back to ``PATH``)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return name


def flower_env(flwr_home: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private ``FLWR_HOME``, telemetry and update checks off.

    The directory of the running Python is put first on ``PATH``: the SuperLink and
    SuperNode start ``flower-superexec`` by name and fail without it.
    """
    env = dict(os.environ if base is None else base)
    env.update(TELEMETRY_OFF)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Flower's configurable poll: the SuperExec looks for new tasks (ServerApp/ClientApp
    # runs) every second by default; a tenth of that removes most of its share of a message
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    return env


def write_flwr_config(
    flwr_home: str | Path,
    *,
    address: str,
    root_certificates: str | Path | None,
    insecure: bool = False,
    name: str = CONNECTION_NAME,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection, made the default.

    Parameters
    ----------
    flwr_home : str or Path
        A private directory (created with mode 0700).
    address : str
        ``host:port`` of the SuperLink.
    root_certificates : str or Path or None
        CA certificate that signed the SuperLink's certificate (TLS).
    insecure : bool
        Plain HTTP (only with ``fedrg server --insecure``).
    name : str
        Connection name used by ``flwr run`` / ``flwr supernode register``.
    """
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f"address = {json.dumps(address)}"]
    if insecure:
        lines.append("insecure = true")
    else:
        if root_certificates is None:
            raise DeployError("a TLS connection needs the CA certificate (root_certificates)")
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (chosen by the OS)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- SuperLink

@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def superlink_argv(
    *,
    host: str,
    port: int,
    tls: TlsFiles | None,
    supernode_auth: bool = True,
    database: str | Path | None = None,
    public: tuple[str, int] | None = None,
) -> list[str]:
    """Command line of ``flower-superlink``.

    ``tls=None`` means plain HTTP (``--insecure``); node authentication is refused with it.
    With ``public=(host, port)`` the SuperLink runs behind :mod:`fedrg.deploy.superlink_gate`:
    ``host:port`` is then the operator's listener (every API; bind it to a loopback
    address) and ``public`` the hospitals' listener, which serves only the Fleet API.
    """
    if public is None:
        argv = [flower_bin("flower-superlink")]
    else:
        argv = [sys.executable, "-m", "fedrg.deploy.superlink_gate",
                "--public-host", public[0], "--public-port", str(public[1])]
    argv += ["--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if tls is None:
        if supernode_auth:
            raise DeployError(
                "SuperNode authentication needs TLS; Flower refuses --enable-supernode-auth "
                "together with --insecure"
            )
        argv.append("--insecure")
    else:
        argv += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                 "--ssl-keyfile", str(tls.server_key)]
    if supernode_auth:
        argv.append("--enable-supernode-auth")
    if database:
        argv += ["--database", str(database)]
    return argv


def wait_http_ready(
    proc: ManagedProcess,
    address: str,
    *,
    ca_cert: str | Path | None,
    timeout: float = 60.0,
    group: ProcessGroup | None = None,
) -> float:
    """Wait until ``GET /health`` on ``address`` answers 200; fail early when ``proc`` dies.

    Returns
    -------
    float
        Seconds waited.

    Raises
    ------
    DeployError
        The process exited, or ``timeout`` passed.
    """
    scheme = "http" if ca_cert is None else "https"
    url = f"{scheme}://{address}/health"
    ctx = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if not proc.alive():
            raise DeployError(
                f"{proc.name} exited with status {proc.returncode()} before it was ready; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                if resp.status == 200:
                    if group is not None:
                        group.refresh()
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(0.25)
    raise DeployError(
        f"{proc.name} did not answer {url} within {timeout:.0f} s (last error: {last}); "
        f"log {proc.log_path}:\n{proc.log_tail()}"
    )


# --------------------------------------------------------------------------- flwr CLI

def run_flwr(
    args: Sequence[str], *, env: Mapping[str, str], timeout: float = 120.0,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Run one ``flwr`` CLI command to completion (bounded by ``timeout``)."""
    argv = [flower_bin("flwr"), *args]
    try:
        return subprocess.run(
            argv, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise DeployError(f"`flwr {' '.join(args)}` did not finish within {timeout:.0f} s") from None


def _json_tail(text: str) -> dict:
    """The last JSON object printed by a ``flwr ... --format json`` command."""
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    raise ValueError("no JSON object in output")


def register_supernode(
    public_key: str | Path, *, env: Mapping[str, str], name: str | None = None,
    connection: str = CONNECTION_NAME, timeout: float = 60.0,
) -> int | None:
    """Register a hospital's node public key with the SuperLink (``flwr supernode register``).

    Returns
    -------
    int or None
        The node id the SuperLink assigned; None when the key was registered before (a
        SuperLink with a persistent ``--database``).
    """
    args = ["supernode", "register", str(public_key), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    res = run_flwr(args, env=env, timeout=timeout)
    out = res.stdout + res.stderr
    try:
        data = _json_tail(res.stdout)
    except ValueError:
        data = {}
    if "Public key already in use" in out:
        return None
    if res.returncode != 0 or not data.get("success"):
        raise DeployError(
            f"registering node key {public_key} failed (exit {res.returncode}): "
            f"{strip_ansi(out)[-800:]}"
        )
    return int(data["node-id"])


def strip_ansi(text: str) -> str:
    """Remove terminal colour codes and surrounding whitespace."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def write_run_config(path: str | Path, run_config: Mapping[str, object]) -> Path:
    """Write a flat run config as a TOML file that ``flwr run --run-config FILE`` accepts."""
    lines = [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in run_config.items()]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    return p


def stage_app(app_dir: str | Path, dest: str | Path) -> Path:
    """Copy the files of a Flower app that go into its bundle to ``dest`` and return ``dest``.

    ``flwr run`` rewrites the app's ``pyproject.toml`` in place (it migrates a legacy
    ``[tool.flwr.federations]`` table), so fedrg submits a staged copy and never lets it
    touch the source tree. The copy holds ``pyproject.toml`` and the files matched by its
    ``[tool.flwr.app] fab-include`` patterns.

    Raises
    ------
    DeployError
        No ``pyproject.toml``, or no ``fab-include`` list in it.
    """
    import shutil

    import tomllib

    src, out = Path(app_dir), Path(dest)
    pyproject = src / "pyproject.toml"
    if not pyproject.is_file():
        raise DeployError(f"{src} holds no pyproject.toml; point run.app_dir at a Flower app")
    app_cfg = tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
    patterns = app_cfg.get("fab-include")
    if not patterns:
        raise DeployError(
            f"{pyproject} has no [tool.flwr.app] fab-include list; fedrg ships only the files "
            "it names (e.g. fab-include = [\"server/*.py\", \"clients/*.py\"])"
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(pyproject, out / "pyproject.toml")
    for pattern in patterns:
        for f in src.glob(pattern.lstrip("/")):
            if f.is_file() and "__pycache__" not in f.parts:
                target = out / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
    return out


def submit_run(
    app_dir: str | Path, *, env: Mapping[str, str], run_config: Mapping[str, object] | None = None,
    config_file: str | Path | None = None, connection: str = CONNECTION_NAME,
    timeout: float = 180.0,
) -> int:
    """Submit the Flower app in ``app_dir`` as a run (``flwr run APP CONNECTION``).

    Parameters
    ----------
    app_dir : str or Path
        Directory with the app's ``pyproject.toml`` (``[tool.flwr.app]``).
    env : mapping
        From :func:`flower_env` (its ``FLWR_HOME`` holds the connection).
    run_config : mapping, optional
        Flat run-config overrides (keys must exist in the app's ``[tool.flwr.app.config]``).
    config_file : str or Path, optional
        Where to write ``run_config`` as TOML (else it is passed inline).

    Returns
    -------
    int
        The run id.
    """
    args = ["run", str(app_dir), connection, "--format", "json"]
    if run_config and config_file is not None:
        args += ["--run-config", str(write_run_config(config_file, run_config))]
    elif run_config:
        args += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
    res = run_flwr(args, env=env, timeout=timeout)
    try:
        data = _json_tail(res.stdout)
    except ValueError:
        data = {}
    if res.returncode != 0 or not data.get("success"):
        raise DeployError(
            f"submitting the run failed (exit {res.returncode}): "
            f"{strip_ansi(res.stdout + res.stderr)[-1500:]}"
        )
    return int(data["run-id"])


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_status(run_id: int, *, env: Mapping[str, str], connection: str = CONNECTION_NAME) -> str:
    """Status of a run as ``flwr list`` shows it (e.g. ``running``, ``finished:completed``)."""
    res = run_flwr(["list", connection, "--run-id", str(run_id), "--format", "json"],
                   env=env, timeout=60)
    try:
        data = _json_tail(res.stdout)
        return str(data["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        raise DeployError(
            f"cannot read the status of run {run_id}: {strip_ansi(res.stdout + res.stderr)[-800:]}"
        ) from None


def wait_run(
    run_id: int, *, env: Mapping[str, str], timeout: float, poll: float = 10.0,
    watch: Sequence[ManagedProcess] = (), connection: str = CONNECTION_NAME,
    group: ProcessGroup | None = None, on_tick: Callable[[], None] | None = None,
) -> str:
    """Wait until run ``run_id`` is finished; return its final status.

    With a ``group``, the run's log is streamed (``flwr log RUN --stream``) into
    ``<log_dir>/run-<id>.log``; the stream ends when the run does, so the status is asked
    only then (each ``flwr`` CLI call costs seconds of CPU). Without one, or if the stream
    stops early, the status is polled every ``poll`` seconds. Fails early when a watched
    process (the SuperLink) exits. ``on_tick`` is called about twice a second (progress
    output).
    """
    start = time.monotonic()
    status = "unknown"
    stream = None
    if group is not None:
        stream = group.start(f"run-{run_id}", [flower_bin("flwr"), "log", str(run_id), connection,
                                               "--stream"], env=env)
    last_poll = -float("inf")
    while time.monotonic() - start < timeout:
        for proc in watch:
            if not proc.alive():
                raise DeployError(
                    f"{proc.name} exited with status {proc.returncode()} during run {run_id}; "
                    f"log {proc.log_path}:\n{proc.log_tail()}"
                )
        if group is not None:
            group.refresh()
        if on_tick is not None:
            on_tick()
        streaming = stream is not None and stream.alive()
        if not streaming and time.monotonic() - last_poll >= poll:
            last_poll = time.monotonic()
            status = run_status(run_id, env=env, connection=connection)
            if status.startswith("finished"):
                return status
        time.sleep(0.5)
    raise DeployError(f"run {run_id} did not finish within {timeout:.0f} s (status {status!r})")


# --------------------------------------------------------------------------- SuperNode

def node_config_arg(values: Mapping[str, object]) -> str:
    """Render ``--node-config`` (space-separated ``key=value``, values as TOML literals)."""
    for key in values:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise DeployError(f"node-config key {key!r} may only hold letters, digits, '_.-'")
    rendered = []
    for key, value in values.items():
        lit = _toml_value(value)
        if "'" in lit or ("\\" in lit and isinstance(value, str)):
            raise DeployError(
                f"node-config value for {key} ({value!r}) holds a quote or backslash, which "
                "Flower's --node-config parser cannot pass; use a path without them"
            )
        rendered.append(f"{key}={lit}")
    return " ".join(rendered)


def supernode_argv(
    *,
    superlink: str,
    root_cert: str | Path | None,
    auth_key: str | Path | None,
    node_config: Mapping[str, object],
    port: int,
    host: str = "127.0.0.1",
    max_wait_time: float | None = None,
) -> list[str]:
    """Command line of ``flower-supernode`` (``root_cert=None``: plain HTTP, test only).

    Flower's SuperNode runs through :mod:`fedrg.deploy.fast_supernode` (its idle poll is
    0.5 s instead of a hard-coded 3 s; ``FEDRG_SUPERNODE_POLL_S`` sets it).
    """
    argv = [sys.executable, "-m", "fedrg.deploy.fast_supernode", "--superlink", superlink,
            "--host", host, "--port", str(port)]
    if root_cert is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key)]
    if node_config:
        argv += ["--node-config", node_config_arg(node_config)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", f"{max_wait_time:g}"]
    return argv
