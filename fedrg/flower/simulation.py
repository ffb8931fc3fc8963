"""Run fedrg's ServerApp and ClientApp on Flower's simulation engine (Ray), in-process."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrg.config import ExperimentConfig, SiteConfig
from fedrg.errors import FedrgError
from fedrg.flower.apps import build_client_app, build_server_app

log = logging.getLogger("fedrg.simulation")


class SimulatedSites:
    """Maps a simulated SuperNode (its ``partition-id``) to a hospital's site config."""

    def __init__(self, sites: list[SiteConfig]) -> None:
        self.sites = list(sites)

    def __call__(self, context: Any) -> SiteConfig:
        pid = int(context.node_config["partition-id"])
        return self.sites[pid]


def run_simulated_federation(cfg: ExperimentConfig, run_dir: str | Path, sites: list[SiteConfig], *,
                             resume: bool = False,
                             on_round: Callable[[dict[str, Any]], None] | None = None,
                             num_cpus: int | None = None,
                             ray_address: str | None = None) -> Any:
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

    Returns the :class:`~fedrg.federated.server.ServerResult`. Raises :class:`FedrgError` when
    the ServerApp failed (its exception is re-raised with context) or the cluster cannot be
    reached.
    """
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from flwr.simulation import run_simulation

    if len(sites) != cfg.federation.hospitals:
        raise FedrgError(f"federation.hospitals={cfg.federation.hospitals} but {len(sites)} site(s) given")
    results: list[Any] = []
    failures: list[BaseException] = []

    def provide(_context: Any) -> tuple[ExperimentConfig, Path, bool]:
        return cfg, Path(run_dir), resume

    # failures: the ServerApp's own exception, re-raised here instead of Flower's generic exit
    server_app = build_server_app(provide, on_round=on_round, results=results, failures=failures)
    client_app = build_client_app(SimulatedSites(sites))
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                 "log_to_driver": True}
    if ray_address:
        _connect_ray(ray_address, init_args)  # Flower reuses an initialised Ray
    else:
        init_args.update(num_cpus=num_cpus or max(1, min(len(sites), os.cpu_count() or 1)),
                         num_gpus=0)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": init_args,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=len(sites), backend_config=backend_config)
        except SystemExit as err:  # flwr_exit on a failed ServerApp
            if failures:
                raise failures[0] from None
            raise FedrgError(f"Flower simulation exited with code {err.code}") from None
    if failures:
        raise failures[0]
    if not results:
        raise FedrgError("the simulated federation ended without a result (see the log above)")
    return results[0]


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
    pythonpath = os.pathsep.join([*sys.path, os.environ.get("PYTHONPATH", "")])
    try:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 **init_args)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise FedrgError(
            f"--ray-address {address}: cannot connect to a Ray cluster there ({err}); start one "
            "with 'ray start --head --node-ip-address 127.0.0.1' and pass the address it prints, "
            "or omit --ray-address to run on a private local Ray") from None
    log.info("connected to the Ray cluster at %s: %s CPUs", address,
             ray.cluster_resources().get("CPU", 0))
