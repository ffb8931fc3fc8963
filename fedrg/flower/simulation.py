"""Run fedrg's ServerApp and ClientApp on Flower's simulation engine (Ray), in-process."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrg.config import ExperimentConfig, SiteConfig
from fedrg.errors import FedrgError
from fedrg.flower.apps import build_client_app, build_server_app
from fedrg.interrupt import stop_own_ray
from fedrg.runtime import apply_offline_env

if TYPE_CHECKING:
    from fedrg.federated.aggregate import Aggregator
    from fedrg.federated.server import ServerResult

log = logging.getLogger("fedrg.simulation")

#: Run by Ray in every worker process before its first task (``worker_process_setup_hook``).
WORKER_SETUP_HOOK = "fedrg.flower.simulation.import_fedrg_first"


def import_fedrg_first() -> None:
    """Ray worker start-up hook: import fedrg from the driver's ``sys.path``, first.

    Ray puts the driver's working directory at the front of every worker's ``sys.path``
    when the worker takes its first task (``ray/_private/worker.py``: ``connect`` adds it
    to the job's ``py_driver_sys_path``), so from a directory that holds a folder named
    ``fedrg`` (the folder above a clone, a work folder) the workers would import that
    folder instead of fedrg (``ModuleNotFoundError: fedrg.data.cohort``, seen only in the
    workers' logs). This hook runs before that, with the driver's own ``sys.path`` (passed
    as ``PYTHONPATH``), and leaves ``fedrg`` in ``sys.modules`` bound to the package the
    driver runs: every later ``fedrg.*`` import resolves inside it, whatever the working
    directory holds. Importing this module has already done the work.
    """
    import fedrg

    log.debug("simulation worker uses fedrg from %s", fedrg.__path__)


def _ray_runtime_env() -> dict[str, Any]:
    """The runtime environment of the simulation's Ray job: the driver's ``sys.path`` as
    ``PYTHONPATH`` (what Flower passes when it starts Ray itself), fedrg's offline settings
    (:data:`fedrg.runtime.OFFLINE_ENV`, as the driver has them) and its ``FEDRG_CACHE``
    where set, and :func:`import_fedrg_first`.

    The environment variables matter on a cluster started with ``ray start``: its workers
    inherit the environment of the shell that started each node, not the driver's, so
    without them a hospital on another node would look for the base model in that user's
    default cache and run Flower with telemetry on.
    """
    from fedrg.runtime import OFFLINE_ENV

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    env_vars = {key: os.environ.get(key, value) for key, value in OFFLINE_ENV.items()}
    if os.environ.get("FEDRG_CACHE"):
        env_vars["FEDRG_CACHE"] = os.environ["FEDRG_CACHE"]
    env_vars["PYTHONPATH"] = pythonpath
    return {"env_vars": env_vars, "worker_process_setup_hook": WORKER_SETUP_HOOK}


class SimulatedSites:
    """Maps a simulated SuperNode (its ``partition-id``) to a hospital's site config."""

    def __init__(self, sites: list[SiteConfig], log_dir: Path | None = None) -> None:
        self.sites = list(sites)
        self.log_dir = log_dir

    def __call__(self, context: Any) -> SiteConfig:
        if self.log_dir is not None:  # runs inside each Ray actor process
            route_worker_logs(self.log_dir)
        pid = int(context.node_config["partition-id"])
        site = self.sites[pid]
        _log_ray_node(site.name)
        return site


_ANSWERED: set[str] = set()  # the hospitals this worker process has answered for


def _log_ray_node(site_name: str) -> None:
    """Log, once per hospital and worker process, the Ray node that runs it (its id, as
    ``ray.nodes()`` and ``ray status`` name it): on a cluster, which machine holds each
    hospital's work (``RUN/logs/worker-<pid>.log`` on that node)."""
    if site_name in _ANSWERED:
        return
    _ANSWERED.add(site_name)
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "none"
    log.info("%s runs on Ray node %s (worker pid %d)", site_name, node, os.getpid())


_WORKER_LOG: list[logging.Handler] = []


def route_worker_logs(log_dir: Path) -> None:
    """In a simulation worker: Flower's records below ERROR (its deprecation notices,
    "Manually terminating ClientAppActor") and Python warnings go to
    ``log_dir/worker-<pid>.log`` instead of the console (once per process)."""
    if _WORKER_LOG:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = _file_handler(log_dir / f"worker-{os.getpid()}.log")
    # warnings get their own file: a warning raised while a record is being written (the
    # garbage collector's ResourceWarning) would otherwise re-enter the same stream
    warn_handler = _file_handler(log_dir / f"worker-{os.getpid()}-warnings.log")
    _WORKER_LOG.extend([handler, warn_handler])
    flwr_log = logging.getLogger("flwr")
    for h in flwr_log.handlers:
        h.setLevel(logging.ERROR)
    flwr_log.addHandler(handler)
    flwr_log.propagate = False
    fedrg_log = logging.getLogger("fedrg")  # the hospital side's own log (errors included)
    fedrg_log.addHandler(handler)
    fedrg_log.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("ignore", ResourceWarning)
    warn_log = logging.getLogger("py.warnings")
    warn_log.addHandler(warn_handler)
    warn_log.propagate = False


def _file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    return handler


#: Loggers whose records stay off the root logger's handlers during a simulation.
QUIET_LOGGERS = ("flwr", "ray")


class FlowerLogToFile:
    """Route Flower's log and Python warnings raised during a simulation to a file.

    Flower's console handler is raised to ERROR (errors still reach the console); its
    INFO/WARNING records and every ``warnings.warn`` go to ``path`` instead.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handler: logging.Handler | None = None
        self._levels: list[tuple[logging.Handler, int]] = []
        self._propagate: dict[str, bool] = {}

    def __enter__(self) -> FlowerLogToFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = _file_handler(self.path)
        handler.setLevel(logging.INFO)
        # warnings in a file of their own (see route_worker_logs)
        self._warn_handler = _file_handler(self.path.with_name("warnings.log"))
        self._handler = handler
        flwr_log = logging.getLogger("flwr")
        for h in flwr_log.handlers:
            self._levels.append((h, h.level))
            h.setLevel(logging.ERROR)
        flwr_log.addHandler(handler)
        # Flower's and Ray's records never reach the root logger's handlers: a library
        # imported earlier in this process may have given root a console handler (Opacus's
        # module_utils calls logging.basicConfig on import, e.g. after the public adapter
        # was pre-trained here), which would print every DEBUG record of theirs
        self._propagate = {name: logging.getLogger(name).propagate for name in QUIET_LOGGERS}
        for name in QUIET_LOGGERS:
            logging.getLogger(name).propagate = False
        ray_log = logging.getLogger("ray")
        ray_log.addHandler(handler)
        logging.captureWarnings(True)
        warn_log = logging.getLogger("py.warnings")
        warn_log.addHandler(self._warn_handler)
        warn_log.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        for h, level in self._levels:
            h.setLevel(level)
        for name, propagate in self._propagate.items():
            logging.getLogger(name).propagate = propagate
        if self._handler is not None:
            logging.getLogger("flwr").removeHandler(self._handler)
            logging.getLogger("ray").removeHandler(self._handler)
            logging.getLogger("py.warnings").removeHandler(self._warn_handler)
            self._handler.close()
            self._warn_handler.close()
        logging.captureWarnings(False)
        logging.getLogger("py.warnings").propagate = True


def run_simulated_federation(cfg: ExperimentConfig, run_dir: str | Path, sites: list[SiteConfig], *,
                             resume: bool = False,
                             on_round: Callable[[dict[str, Any]], None] | None = None,
                             num_cpus: int | None = None,
                             on_phase: Callable[[str, int, int], None] | None = None,
                             ray_address: str | None = None,
                             aggregator: Aggregator | None = None) -> ServerResult:
    """Run a whole federation of ``sites`` through Flower's simulation engine.

    Parameters
    ----------
    cfg, run_dir, sites, resume, on_round
        The experiment, its run directory, one site config per simulated hospital, whether
        to resume ``run_dir``, and a per-round callback.
    num_cpus
        CPUs of the local Ray instance this starts (default: one per hospital, at most the
        machine's); ignored with ``ray_address``.
    ray_address
        Address of an existing Ray cluster (``ray start --head`` prints it, e.g.
        ``127.0.0.1:6379``): the hospitals run as actors there, one CPU each. The cohorts,
        state directories and fedrg itself must be reachable at the same paths on every
        node. ``None`` starts a private local Ray instance.
    aggregator
        A custom :class:`~fedrg.federated.aggregate.Aggregator` object for the server
        (default: the one ``federation.server_optimizer`` names); DP and secure aggregation
        stay as the hospitals' site policies decide.

    Returns the :class:`~fedrg.federated.server.ServerResult`. Raises :class:`FedrgError` when
    the ServerApp failed (its exception is re-raised with context) or the cluster cannot be
    reached.
    """
    apply_offline_env()  # the simulation's Ray workers inherit it (fedrg.runtime)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from flwr.simulation import run_simulation

    if len(sites) != cfg.federation.hospitals:
        raise FedrgError(f"federation.hospitals={cfg.federation.hospitals} but {len(sites)} site(s) given")
    results: list[ServerResult] = []
    failures: list[BaseException] = []

    def provide(_context: Any) -> tuple[ExperimentConfig, Path, bool]:
        return cfg, Path(run_dir), resume

    # failures: the ServerApp's own exception, re-raised here instead of Flower's generic exit
    server_app = build_server_app(provide, on_round=on_round, results=results, failures=failures,
                                  on_phase=on_phase, aggregator=aggregator)
    client_app = build_client_app(SimulatedSites(sites, Path(run_dir) / "logs"))
    # workers' output stays in their logs (RUN/logs, Ray's session logs): Ray's own crash
    # reports of idle workers are not fedrg's console
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                 "log_to_driver": False}
    # Ray is started here, not by Flower (which reuses an initialised Ray), so that the
    # workers get import_fedrg_first: fedrg runs from any working directory
    if ray_address:
        _connect_ray(ray_address, init_args)
    else:
        init_args.update(num_cpus=num_cpus or max(1, min(len(sites), os.cpu_count() or 1)),
                         num_gpus=0)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": init_args,
    }
    with FlowerLogToFile(Path(run_dir) / "logs" / "flower.log"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the rest as filtered by default
        try:
            if not ray_address:  # its start-up warnings go to the log, as when Flower started it
                _start_local_ray(init_args)  # a Ray the caller started is reused, as Flower does
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=len(sites), backend_config=backend_config)
        except SystemExit as err:  # flwr_exit on a failed ServerApp
            if failures:
                raise failures[0] from None
            raise FedrgError(f"Flower simulation exited with code {err.code}") from None
        finally:  # Flower stops Ray at a normal end; not when it failed or was interrupted
            stop_own_ray()
    if failures:
        raise failures[0]
    if not results:
        raise FedrgError("the simulated federation ended without a result (see the log above)")
    return results[0]


def _start_local_ray(init_args: dict[str, Any]) -> None:
    """Start this process's private local Ray with :func:`_ray_runtime_env`, unless the
    caller has initialised Ray already (then that one is used, as Flower would)."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env=_ray_runtime_env(), **init_args)


def _connect_ray(address: str, init_args: dict[str, Any]) -> None:
    """Connect this process to the Ray cluster at ``address`` (clear error if unreachable)."""
    import socket

    import ray

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FedrgError(f"--ray-address {address!r} must be HOST:PORT, e.g. 127.0.0.1:6379 "
                         "(the address 'ray start --head' prints)")
    try:  # Ray itself retries an unreachable address for minutes: check it first
        socket.create_connection((host, int(port)), timeout=5.0).close()
    except OSError as err:
        raise FedrgError(
            f"--ray-address {address}: nothing answers there ({err}); start a cluster with "
            "'ray start --head --node-ip-address 127.0.0.1' and pass the address it prints, "
            "or omit --ray-address to run on a private local Ray") from None
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address=address, runtime_env=_ray_runtime_env(), **init_args)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise FedrgError(
            f"--ray-address {address}: cannot connect to a Ray cluster there ({err}); start one "
            "with 'ray start --head --node-ip-address 127.0.0.1' and pass the address it prints, "
            "or omit --ray-address to run on a private local Ray") from None
    log.info("connected to the Ray cluster at %s: %s CPUs", address,
             ray.cluster_resources().get("CPU", 0))
