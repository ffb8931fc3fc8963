"""Requests a (hostile) server sends, and what a refusal must look like."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedrg.config import ExperimentConfig, load_config, to_run_config
from fedrg.model.fingerprint import model_content_hash
from fedrg.payload import Payload
from fedrg.policy import SitePolicy

HONEST_RUN = "run-honest"
_ARRAYS: dict[str, list[np.ndarray]] = {}


def site_policy(base_dir: Path, **changes: Any) -> SitePolicy:
    """The safe default policy, listing the tiny test base by its content hash."""
    return SitePolicy(allowed_base_models=[f"sha256:{model_content_hash(base_dir)}"], **changes)


def tiny_config(base_dir: Path, *overrides: str) -> ExperimentConfig:
    """The honest experiment on the tiny model and cohort, with ``overrides``."""
    return load_config(None, [
        f"model.base={base_dir}", "model.encoder_width=16", "model.lora_rank=4",
        "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]", "training.local_epochs=0.5",
        "training.batch_size=8", "federation.rounds=2", "federation.hospitals=3", *overrides])


def global_arrays(cfg: ExperimentConfig) -> list[np.ndarray]:
    """The initial global adapter the server would send for ``cfg``."""
    from fedrg.model.adapter import build_model
    from fedrg.model.payload import get_adapter_arrays

    key = cfg.model.model_dump_json() + cfg.data.model_dump_json()
    if key not in _ARRAYS:
        _ARRAYS[key] = get_adapter_arrays(build_model(cfg.model, cfg.data, seed=cfg.federation.seed))
    return [a.copy() for a in _ARRAYS[key]]


def request(cfg: ExperimentConfig, *, round_: int = 1, run_id: str = "run-x",
            hospitals_in_round: int | None = 3, arrays: list[np.ndarray] | None = None) -> Payload:
    """A train message exactly as :class:`fedrg.federated.server.FederationServer` builds it."""
    p = Payload(meta={"config": to_run_config(cfg), "round": round_, "run_id": run_id})
    if hospitals_in_round is not None:
        p.meta["hospitals_in_round"] = hospitals_in_round
    p.put_array_list("global", arrays if arrays is not None else global_arrays(cfg))
    return p


def honest_request(base_dir: Path, *overrides: str, **kw: Any) -> Payload:
    """The honest request with ``overrides``, carrying the honest global adapter."""
    kw.setdefault("arrays", global_arrays(tiny_config(base_dir)))
    return request(tiny_config(base_dir, *overrides), **kw)


def assert_refused(reply: Payload, setting: str, state: Payload | None = None) -> None:
    """A typed refusal naming ``setting``, carrying no arrays, weight, loss or metrics."""
    meta = reply.meta
    assert meta["status"] == "declined" and meta["reason"] == "policy_violation", meta
    assert meta["setting"] == setting, meta
    assert meta["allowed"] and setting in meta["message"]
    assert not reply.arrays
    # plus the hospital's signed ledger head (public: hashes, a count and a signature)
    assert set(meta) == {"site", "status", "reason", "setting", "requested", "allowed", "message",
                         "ledger_head"}
    if state is not None:  # nothing pending for a later secure sum either
        assert not state.arrays and "pending_weight" not in state.meta
