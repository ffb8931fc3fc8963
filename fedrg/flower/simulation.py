"""Run fedrg's ServerApp and ClientApp on Flower's simulation engine (Ray), in-process."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrg.config import ExperimentConfig, SiteConfig
from fedrg.errors import FedrgError
from fedrg.flower.apps import build_client_app, build_server_app
from fedrg.runtime import apply_offline_env

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
                             num_cpus: int | None = None, aggregator: Any = None) -> Any:
    """Run a whole federation of ``sites`` through Flower's simulation engine.

    ``aggregator`` is a custom :class:`~fedrg.federated.aggregate.Aggregator` object for the
    server (default: the one ``federation.server_optimizer`` names); DP and secure aggregation
    stay as the hospitals' site policies decide.

    Returns the :class:`~fedrg.federated.server.ServerResult`. Raises :class:`FedrgError` when
    the ServerApp failed (its exception is re-raised with context).
    """
    apply_offline_env()  # the simulation's Ray workers inherit it (fedrg.runtime)
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
    server_app = build_server_app(provide, on_round=on_round, results=results, failures=failures,
                                  aggregator=aggregator)
    client_app = build_client_app(SimulatedSites(sites))
    cpus = num_cpus or max(1, min(len(sites), os.cpu_count() or 1))
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": logging.ERROR, "log_to_driver": True},
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
