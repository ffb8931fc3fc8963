"""fedrg's Flower ServerApp for the deployment engine (``flwr run``).

The experiment config arrives as Flower's flat run config (declared in pyproject.toml);
``fedrg.run_dir`` names where checkpoints, metrics and the final adapter go.
"""

from __future__ import annotations

from fedrg.runtime import apply_offline_env

apply_offline_env()  # a Flower app module is fedrg's own process

from pathlib import Path  # noqa: E402

from flwr.app import Context  # noqa: E402

from fedrg.config import ExperimentConfig, from_run_config  # noqa: E402
from fedrg.flower.apps import build_server_app  # noqa: E402


def _provide(context: Context) -> tuple[ExperimentConfig, Path, bool]:
    cfg = from_run_config(dict(context.run_config))
    run_dir = str(context.run_config.get("fedrg.run_dir", "")) or f"runs/flwr-{context.run_id}"
    return cfg, Path(run_dir), bool(context.run_config.get("fedrg.resume", False))


app = build_server_app(_provide, ledgers=True)
