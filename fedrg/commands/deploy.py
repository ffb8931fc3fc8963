"""``fedrg certs init``, ``fedrg keys new``, ``fedrg server``, ``fedrg client``: deployment."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from fedrg.deploy.preflight import (  # the checks live in fedrg.deploy; names kept here
    approved_app,
    check_app_run_config,
    check_server_files,
    default_app_dir,
    prepare_client,
)
from fedrg.errors import FedrgError

if TYPE_CHECKING:
    from fedrg.deploy.watch import LineFollower, MetricsFollower

err_console = Console(stderr=True, highlight=False)
console = Console(highlight=False, markup=False, soft_wrap=True)  # log lines stay whole

certs_app = typer.Typer(help="TLS certificates of a federation.", no_args_is_help=True)
keys_app = typer.Typer(help="A hospital's keys.", no_args_is_help=True)

INSECURE_BANNER = (
    "[bold red]" + "!" * 78 + "\n"
    "  WARNING: --insecure: TLS IS OFF. Model updates, metrics and run configs travel\n"
    "  UNENCRYPTED, and the server cannot authenticate hospitals (Flower allows node\n"
    "  authentication only with TLS). Anyone on the network can read or join.\n"
    "  Use this only on a closed test machine; never with real patient data.\n"
    + "!" * 78 + "[/bold red]"
)


def _fail(err: FedrgError, code: int = 2) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
    return typer.Exit(code)


class ConnectionLostError(FedrgError):
    """The hospital's SuperNode was connected and then lost the server (exit status 3)."""


#: Seconds child processes get after SIGTERM before SIGKILL when the command is stopped
#: (Ctrl-C / SIGTERM must end the command within 10 s).
STOP_TIMEOUT_S = 5.0


class _StopRequestedError(Exception):
    """Raised by the SIGTERM handler so ``finally`` blocks stop child processes."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _StopRequestedError()


# --------------------------------------------------------------------------- certs / keys

@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(..., "--out", help="directory for ca.crt, ca.key, server.pem, server.key"),
    host: list[str] = typer.Option(
        [], "--host", help="DNS name or IP address hospitals use to reach the server (repeat)"
    ),
    days: int = typer.Option(825, "--days", min=1, help="server certificate lifetime"),
    force: bool = typer.Option(False, "--force", help="replace existing files"),
) -> None:
    """Create a federation CA and the server's TLS certificate (SANs: localhost, 127.0.0.1, ::1, --host)."""
    from fedrg.commands.output import check_output_dir
    from fedrg.deploy.certs import init_certs, load_certificate, subject_alt_names

    try:
        check_output_dir(out, option="--out")
        paths = init_certs(out, hosts=host, days=days, overwrite=force)
    except FedrgError as err:
        raise _fail(err) from None
    cert = load_certificate(paths.server_cert)
    console.print(f"wrote {paths.ca_cert}      (CA certificate: give a copy to every hospital)")
    console.print(f"wrote {paths.ca_key}       (CA private key, mode 0600: keep it offline)")
    console.print(f"wrote {paths.server_cert}  (server certificate for "
                  f"{', '.join(subject_alt_names(cert))}; valid until "
                  f"{cert.not_valid_after_utc:%Y-%m-%d})")
    console.print(f"wrote {paths.server_key}   (server private key, mode 0600: stays on the server)")


@keys_app.command("new")
def keys_new(
    out: Path = typer.Option(..., "--out", help="the hospital's key directory (e.g. its state_dir)"),
    name: str = typer.Option("hospital", "--name", help="hospital name (public key comment)"),
    force: bool = typer.Option(False, "--force", help="replace an existing node key"),
) -> None:
    """Create a hospital's node-authentication key pair and its ledger-signing key."""
    from fedrg.commands.output import check_output_dir
    from fedrg.deploy.keys import fingerprint, load_node_public_key, new_hospital_keys

    try:
        check_output_dir(out, option="--out")
        keys = new_hospital_keys(out, name=name, overwrite=force)
    except FedrgError as err:
        raise _fail(err) from None
    fp = fingerprint(load_node_public_key(keys.node_public))
    console.print(f"wrote {keys.node_private}  (node key, mode 0600: never leaves this machine)")
    console.print(f"wrote {keys.node_public}  (send to the federation operator; {fp})")
    console.print(f"ledger key {keys.ledger_private} (mode 0600) and {keys.ledger_public} "
                  "(for auditors)")


# --------------------------------------------------------------------------- server

def _print_rounds(follower: MetricsFollower, markers: list[str]) -> None:
    from fedrg.deploy.watch import round_line

    for row in follower.new_rounds():
        console.print(round_line(row, markers))


def _report_run(run_dir: Path, follower: MetricsFollower, markers: list[str]) -> None:
    """Print the rounds not printed yet and the outputs; fail when the federation stopped early."""
    import json

    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        raise FedrgError(f"the run finished but wrote no {metrics}; see the SuperLink log")
    follower.mtime = 0.0  # read once more: the last rewrite may share the previous mtime
    _print_rounds(follower, markers)
    data = json.loads(metrics.read_text())
    console.print(f"metrics: {metrics}; plots: {run_dir / 'plots'}")
    ledgers = run_dir / "ledgers"
    if ledgers.is_dir():
        names = sorted(d.name for d in ledgers.iterdir() if d.is_dir())
        console.print(f"hospital ledger copies ({', '.join(names)}): fedrg audit {run_dir}")
    if data.get("stopped_early"):
        raise FedrgError(f"the federation stopped early: {data['stopped_early']}; the hospitals' "
                         "logs (state_dir/logs/supernode.log) say why")
    adapter = run_dir / "adapter"
    console.print(f"trained adapter: {adapter}" if adapter.is_dir() else f"run output: {run_dir}")


def server(
    config: Path = typer.Option(..., "--config", help="server TOML (see configs/server.example.toml)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS, no node authentication (testing only)"),
    resume: bool = typer.Option(
        False, "--resume", help="continue the run in \\[run] run_dir from its last checkpoint"),
) -> None:
    """Start the SuperLink (TLS + hospital authentication), register hospitals, run fedrg."""
    from fedrg.commands.output import check_port_free
    from fedrg.config import load_config, to_run_config
    from fedrg.deploy import processes as P
    from fedrg.deploy.run_plan import check_run_dir, hospitals_needed
    from fedrg.deploy.settings import load_server_settings
    from fedrg.deploy.watch import MetricsFollower
    from fedrg.federated.checkpoint import completed_rounds
    from fedrg.paths import ensure_writable

    try:
        s = load_server_settings(config)
        cfg = load_config(s.run.experiment or None, s.run.overrides)
        run_dir = Path(s.run.run_dir)
        check_run_dir(run_dir, config=config, resume=resume)
        done = completed_rounds(run_dir)
        if resume and done is None:
            raise FedrgError(f"--resume: [run] run_dir {run_dir} in {config} holds no checkpoint; "
                             "start without --resume (no round of that run had finished)")
        if resume and done is not None and done >= cfg.federation.rounds:
            console.print(f"run in {run_dir} is already complete ({done} of "
                          f"{cfg.federation.rounds} rounds); nothing to resume. Audit the "
                          "hospitals' ledgers with: fedrg audit STATE_DIR", highlight=False)
            return
        check_server_files(s, insecure)
        quorum = hospitals_needed(s, cfg, config=config, insecure=insecure)
        if quorum.raised:  # wait for every hospital a secure sum needs, never start short
            cfg = load_config(s.run.experiment or None,
                              [*s.run.overrides, f"federation.min_hospitals={quorum.needed}"])
        ensure_writable(run_dir, setting=f"[run] run_dir in {config}")
        ensure_writable(s.state_dir, setting=f"state_dir in {config}")
        check_port_free(s.superlink.host, s.superlink.port,
                        setting=f"[superlink] port in {config}")
        check_port_free("127.0.0.1", s.superlink.operator_port,
                        setting=f"[superlink] operator_port in {config}")
        app_dir = Path(s.run.app_dir) if s.run.app_dir else default_app_dir()
        run_config = {**to_run_config(cfg), "fedrg.run_dir": s.run.run_dir,
                      "fedrg.resume": bool(resume),
                      "fedrg.wait_for_hospitals_s": float(s.run.wait_for_hospitals_s)}
        check_app_run_config(app_dir, run_config)
    except FedrgError as err:
        raise _fail(err) from None
    resume_hint = (f"Hospital ledgers and the run's last checkpoint in {run_dir} are intact; "
                   f"continue with: fedrg server --config {config} --resume"
                   + (" --insecure" if insecure else ""))
    if insecure:
        err_console.print(INSECURE_BANNER)
    if quorum.raised:
        console.print(f"federation.min_hospitals = {quorum.requested} raised to "
                      f"{quorum.needed}: {quorum.reason}; the run waits for {quorum.needed} "
                      "hospitals")
    state = Path(s.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    # hospitals reach the public listener (Fleet API only); the operator's own `flwr` CLI,
    # Flower's SuperExec and the ServerApp use the loopback operator listener
    operator_port = s.superlink.operator_port or P.free_port("127.0.0.1")
    if operator_port == s.superlink.port:
        raise _fail(FedrgError(
            f"superlink.operator_port = {operator_port} equals superlink.port; the operator's "
            "API needs its own port (set operator_port = 0 for any free one)"))
    address = P.format_address("127.0.0.1", operator_port)
    tls = None if insecure else P.TlsFiles(Path(s.tls.ca_cert), Path(s.tls.server_cert),
                                           Path(s.tls.server_key))
    env = P.flower_env(state / "flwr-home")
    P.write_flwr_config(state / "flwr-home", address=address,
                        root_certificates=None if tls is None else tls.ca_cert, insecure=insecure)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_hup = signal.signal(signal.SIGHUP, _on_sigterm)
    group = P.ProcessGroup(state / "logs")
    try:
        link = group.start("superlink", P.superlink_argv(
            host="127.0.0.1", port=operator_port, tls=tls, supernode_auth=not insecure,
            database=s.superlink.database or None,
            public=(s.superlink.host, s.superlink.port)), env=env)
        P.wait_http_ready(link, address, ca_cert=None if tls is None else tls.ca_cert,
                          timeout=s.superlink.ready_timeout_s, group=group)
        console.print(f"SuperLink listening for hospitals on {s.superlink.host}:"
                      f"{s.superlink.port} (Fleet API only; "
                      f"{'PLAIN HTTP' if insecure else 'TLS, hospital authentication on'}); "
                      f"operator API on {address} (this machine only); log {link.log_path}")
        if not insecure:
            for h in s.auth.hospitals:
                node_id = P.register_supernode(h.public_key, env=env, name=h.name)
                console.print(f"registered {h.name} (node {node_id})" if node_id is not None
                              else f"{h.name} was registered before (persistent database)")
        staged = P.stage_app(app_dir, state / "app")  # `flwr run` edits the app it is given
        run_id = P.submit_run(staged, env=env, run_config=run_config,
                              config_file=state / "run-config.toml")
        console.print(f"run {run_id} submitted: {cfg.federation.rounds} round(s), waiting for "
                      f"{cfg.federation.min_hospitals} hospital(s); output in {s.run.run_dir}")
        rounds = MetricsFollower(Path(s.run.run_dir) / "metrics.json")
        rounds.new_rounds()  # a resumed run's rows printed before: only this run's from here
        status = P.wait_run(run_id, env=env, timeout=s.run.timeout_s, watch=[link], group=group,
                            on_tick=lambda: _print_rounds(rounds, cfg.data.markers))
        console.print(f"run {run_id}: {status}")
        run_log = group.log_dir / f"run-{run_id}.log"
        console.print(f"run log: {run_log}")
        failed: FedrgError | None = None
        try:
            if status != "finished:completed":
                text = run_log.read_text(errors="replace") if run_log.is_file() else ""
                err_console.print(P.strip_ansi(text)[-3000:], markup=False)
                raise FedrgError(f"run {run_id} ended as {status}; see the log above "
                                 f"({run_log}) and {link.log_path}")
            _report_run(Path(s.run.run_dir), rounds, cfg.data.markers)
        except FedrgError as err:
            if not s.run.keep_running:
                raise
            failed = err
            err_console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        if s.run.keep_running:
            console.print("keep_running = true: SuperLink stays up; Ctrl-C stops it")
            while link.alive():
                time.sleep(1)
            if failed is not None:
                raise failed
    except FedrgError as err:
        raise _fail(err) from None
    except (KeyboardInterrupt, _StopRequestedError):
        err_console.print("stopping: interrupted (stopping the processes this command "
                          "started)")
        group.close(timeout=STOP_TIMEOUT_S)
        err_console.print(resume_hint if completed_rounds(run_dir) is not None else
                          "No round had finished; start the same command again.",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        group.close(timeout=STOP_TIMEOUT_S)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)


# --------------------------------------------------------------------------- client

def _print_hospital_progress(ledger: LineFollower, refusals: LineFollower) -> None:
    from fedrg.deploy.watch import ledger_lines

    for line in ledger_lines(ledger):
        console.print(line)
    for line in refusals.new_lines():
        err_console.print(f"[red]refused:[/red] {escape(line)}", soft_wrap=True)


def _server_finished(state: Path, since: float, supernode_log: str) -> bool:
    """The server ended a run normally (this hospital answered its last message, the ledger
    copy, since ``since``) and is gone (the SuperNode cannot reach it any more)."""
    from fedrg.deploy.supernode_log import server_gone_after_run
    from fedrg.hospital.run_end import run_ended_since

    return run_ended_since(state, since) and server_gone_after_run(supernode_log)


def client(
    config: Path = typer.Option(..., "--config", help="hospital TOML (see configs/hospital.example.toml)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS (testing only; server must be --insecure)"),
) -> None:
    """Validate the local cohort, then run this hospital's SuperNode until stopped."""
    from fedrg.commands.output import check_output_dir, check_port_free
    from fedrg.deploy import processes as P
    from fedrg.deploy.pinned_clientapp import REFUSALS_LOG, write_launcher
    from fedrg.deploy.pinning import pin_digest
    from fedrg.deploy.settings import load_hospital_settings, node_config
    from fedrg.deploy.watch import LineFollower

    try:
        s = load_hospital_settings(config)
        prepare_client(s, insecure=insecure)
        pin = approved_app(s)
        trust = None
        if s.site.policy.require_secagg:
            from fedrg.hospital.secure import client_trust

            # up front, not at the first secure sum: the pinned roster must list this
            # hospital under its own long-term key, and have enough other hospitals
            trust = client_trust(s.site)
            if len(trust.roster) - 1 < s.site.policy.min_secagg_peers:
                raise FedrgError(
                    f"roster {s.site.roster} lists {len(trust.roster) - 1} other hospital(s), "
                    f"fewer than this site's policy.min_secagg_peers="
                    f"{s.site.policy.min_secagg_peers}: no secure round could ever include "
                    "this hospital. Get the federation's full roster from the operator, or "
                    "lower min_secagg_peers in [policy]")
        check_output_dir(s.site.state_dir, option=f"state_dir in {config}")
        check_port_free(s.supernode.host, s.supernode.port,
                        setting=f"[supernode] port in {config}")
    except FedrgError as err:
        raise _fail(err) from None
    if insecure:
        err_console.print(INSECURE_BANNER)
    console.print(f"cohort {s.site.cohort}: valid")
    if trust is not None:
        console.print(f"roster {s.site.roster}: {len(trust.roster)} hospitals, digest "
                      f"{trust.roster.digest()} (compare it with the operator's)")
    console.print(f"approved app: fedrg {pin.version}, {len(pin.files)} file(s), digest "
                  f"{pin_digest(pin)}; any other app bundle is refused before it runs")
    state = Path(s.site.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    env = P.flower_env(state / "flwr-home")
    if s.worker.threads:  # torch reads these at import: several hospitals on one machine
        # must not oversubscribe its cores (3 x 2 threads on 2 cores ran 5x slower)
        env.update(OMP_NUM_THREADS=str(s.worker.threads), MKL_NUM_THREADS=str(s.worker.threads))
    # Flower's SuperExec starts `flwr-clientapp` by name: ours checks the bundle first
    env["PATH"] = os.pathsep.join([str(write_launcher(state, pin)), env["PATH"]])
    ledger = LineFollower(state / "ledger.jsonl")
    refusals = LineFollower(state / "logs" / REFUSALS_LOG)
    port = s.supernode.port or P.free_port(s.supernode.host)
    argv = P.supernode_argv(
        superlink=s.server.address,
        root_cert=None if insecure else s.server.root_certificates,
        auth_key=None if insecure else s.auth.private_key,
        node_config=node_config(s.site), port=port, host=s.supernode.host,
        max_wait_time=s.server.connect_timeout_s,
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    previous_hup = signal.signal(signal.SIGHUP, _on_sigterm)
    group = P.ProcessGroup(state / "logs")
    started = time.time()
    try:
        # the long-lived worker answers every message with warm torch, model and cohort;
        # the ClientApp Flower starts per message forwards to it (fedrg.hospital.worker)
        worker = group.start("worker", [sys.executable, "-m", "fedrg.hospital.worker",
                                        "--site", s.site.model_dump_json()], env=env)
        # Flower's per-message `flwr-clientapp` is forked from a process that has Flower
        # imported already (fedrg.deploy.clientapp_forkserver); same pinned code, same checks
        forkserver = group.start("clientapp-forkserver", [
            sys.executable, "-m", "fedrg.deploy.clientapp_forkserver",
            "--state-dir", str(state.resolve())], env=env)
        node = group.start("supernode", argv, env=env)
        P.wait_supernode_connected(node, superlink=s.server.address,
                                   timeout=s.server.connect_timeout_s + 30, group=group)
        console.print(f"{s.site.name}: connected to {s.server.address}; waiting for training "
                      f"rounds (log {node.log_path}); Ctrl-C stops")
        worker_warned = forkserver_warned = False
        while node.alive():
            log = node.log_text()
            if _server_finished(state, started, log):
                break
            group.refresh()
            if not worker.alive() and not worker_warned:
                worker_warned = True
                err_console.print(f"[yellow]the hospital worker stopped (log {worker.log_path}); "
                                  "messages are answered in Flower's per-message process "
                                  "instead (slower)[/yellow]")
            if not forkserver.alive() and not forkserver_warned:
                forkserver_warned = True
                err_console.print(f"[yellow]the ClientApp fork server stopped (log "
                                  f"{forkserver.log_path}); each message starts a fresh "
                                  "`flwr-clientapp` instead (slower, same checks)[/yellow]")
            _print_hospital_progress(ledger, refusals)
            if P.connection_lost(log):
                # Flower's SuperNode logs that it gave up but keeps running: end it here
                raise ConnectionLostError(
                    f"lost the connection to the server at {s.server.address}: no answer for "
                    f"{s.server.connect_timeout_s:g} s (server.connect_timeout_s). The run may "
                    "have ended and the server stopped; start `fedrg client` again when the "
                    f"server is back (log {node.log_path})")
            time.sleep(1)
        if _server_finished(state, started, node.log_text()):  # the normal end: exit 0
            group.close(timeout=STOP_TIMEOUT_S)
            _print_hospital_progress(ledger, refusals)
            console.print(f"{s.site.name}: the server finished its run and shut down; "
                          f"stopped (privacy ledger in {state}; start `fedrg client` "
                          "again for the next run)")
            return
        raise ConnectionLostError(
            "the SuperNode stopped after it had connected: " + P.explain_supernode_failure(
                node.log_text(), node.returncode(), superlink=s.server.address))
    except ConnectionLostError as err:
        raise _fail(err, code=3) from None
    except FedrgError as err:
        raise _fail(err) from None
    except (KeyboardInterrupt, _StopRequestedError):
        err_console.print("stopping: interrupted (stopping the SuperNode this command started)")
        group.close(timeout=STOP_TIMEOUT_S)
        err_console.print(f"{s.site.name}: the privacy ledger in {state} is intact; rejoin "
                          f"with: fedrg client --config {config}"
                          + (" --insecure" if insecure else ""), highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        group.close(timeout=STOP_TIMEOUT_S)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)


def register(app: typer.Typer) -> None:
    """Add ``certs``, ``keys``, ``server`` and ``client`` to ``app``."""
    app.add_typer(certs_app, name="certs")
    app.add_typer(keys_app, name="keys")
    app.command("server")(server)
    app.command("client")(client)

