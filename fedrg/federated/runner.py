"""One federated run on the server side: initial adapter, rounds, final adapter, metrics, plots."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedrg.config import ExperimentConfig
from fedrg.federated.aggregate import Aggregator
from fedrg.federated.server import FederationServer, ServerResult, write_metrics
from fedrg.model.factory import ModelFactory
from fedrg.payload import Transport

log = logging.getLogger("fedrg.server")


def run_federation(transport: Transport, cfg: ExperimentConfig, run_dir: str | Path, *,
                   resume: bool = False,
                   on_round: Callable[[dict[str, Any]], None] | None = None,
                   model_factory: ModelFactory | None = None,
                   aggregator: Aggregator | None = None) -> ServerResult:
    """Run (or resume) a federation and write its outputs into ``run_dir``.

    ``model_factory`` builds the initial model (default the built-in multimodal adapter; the
    hospitals must build the same one) and ``aggregator`` is a custom server update rule
    (default ``federation.server_optimizer``). Neither can switch DP or secure aggregation
    off: the hospitals' site policies decide those.

    Writes ``metrics.json`` after every round's row is complete (and hands the row to the
    trackers of ``[tracking]`` and to ``on_round``; with federated evaluation that is one
    train message after the round, when its evaluation arrives), the final adapter to
    ``run_dir/adapter`` when at least one round was aggregated (``adapter_arrays.npz`` for a
    custom factory's model) and
    PNG plots to ``run_dir/plots``.
    """
    from fedrg.federated.report import privacy_label, write_plots
    from fedrg.federated.secure import SecureAggregationDriver
    from fedrg.federated.tracking import open_trackers
    from fedrg.model.adapter import RadiogenomicsModel
    from fedrg.model.factory import DEFAULT_MODEL_FACTORY
    from fedrg.model.io import save_adapter
    from fedrg.model.payload import adapter_parameters, get_adapter_arrays, set_adapter_arrays

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    factory = DEFAULT_MODEL_FACTORY if model_factory is None else model_factory
    model = factory.build(cfg.model, cfg.data, cfg.federation.seed)
    applied = None
    if isinstance(model, RadiogenomicsModel) and not resume:
        from fedrg.train.public_init import apply_public_init

        applied = apply_public_init(model, cfg.model, cfg.data, cfg.training)
        log.info("initial global adapter: %s", applied)
    driver = SecureAggregationDriver(cfg) if cfg.secagg.enabled else None
    trackers = open_trackers(cfg.tracking, run_dir)  # opt-in, local files only

    def record(row: dict[str, Any]) -> None:
        write_metrics(run_dir, server.metrics)
        for tracker in trackers:
            tracker.log_round(row)
        if on_round is not None:
            on_round(row)

    server = FederationServer(cfg, run_dir, get_adapter_arrays(model),
                              secure_aggregate=driver, on_round=record,
                              aggregator=aggregator)
    if resume:
        server.resume()
    elif applied is not None:  # provenance of round 1's start (model.public_init)
        server.metrics["initial_adapter"] = applied
    try:
        result = server.run(transport)
    finally:
        for tracker in trackers:
            tracker.close()
    set_adapter_arrays(model, result.global_arrays)
    if not any(r.get("aggregated") and int(r.get("round", 0)) >= 1
               for r in result.metrics.get("rounds", [])):
        # nothing was aggregated: the start is no trained model (metrics say why)
        log.warning("no round was aggregated: no adapter written to %s", run_dir / "adapter")
    elif isinstance(model, RadiogenomicsModel):
        save_adapter(model, run_dir / "adapter")
    else:  # a custom factory's model: its exchanged arrays, by parameter name
        (run_dir / "adapter").mkdir(exist_ok=True)
        arrays: dict[str, np.ndarray] = {name: p.detach().cpu().numpy()
                                         for name, p in adapter_parameters(model)}
        np.savez(run_dir / "adapter" / "adapter_arrays.npz", **arrays)
    write_metrics(run_dir, result.metrics)
    write_plots(result.metrics, run_dir / "plots", dp_label=privacy_label(
        result.metrics, dp_enabled=cfg.privacy.enabled,
        target_epsilon=cfg.privacy.target_epsilon))
    return result
