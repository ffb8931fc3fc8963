"""Secure aggregation over the federation's transport: four message stages.

Server: :class:`SecureAggregationDriver` runs :class:`fedrg.secagg.server.ServerAggregator`
over the trained hospitals (``secagg_setup`` -> ``secagg_share`` -> ``secagg_masked`` ->
``secagg_unmask``). A hospital that misses a stage counts as dropped; below the threshold
the round aborts with :class:`~fedrg.errors.SecAggError` and the global model stays as it was.

Hospital: :func:`client_stage` keeps its :class:`fedrg.secagg.client.ClientSession` (secret
keys included) in the node's state between messages; the update itself only ever leaves
masked.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedrg.config import ExperimentConfig
from fedrg.errors import PolicyViolationError, SecAggError
from fedrg.federated.payload import Payload, Transport
from fedrg.privacy.policy import SitePolicy

log = logging.getLogger("fedrg.secagg")

SESSION_KEY = "secagg_session"


def to_payload(message: dict[str, Any]) -> Payload:
    """Protocol dict -> payload (numpy arrays travel as arrays, the rest as metadata)."""
    p = Payload()
    for key, value in message.items():
        if isinstance(value, np.ndarray):
            p.arrays[f"sa.{key}"] = value
        else:
            p.meta[key] = value
    return p


def from_payload(payload: Payload) -> dict[str, Any]:
    """Inverse of :func:`to_payload`."""
    out = dict(payload.meta)
    for key, value in payload.arrays.items():
        if key.startswith("sa."):
            out[key[3:]] = value
    return out


class SecureAggregationDriver:
    """Runs one secure-aggregation round per call (server side)."""

    def __init__(self, cfg: ExperimentConfig, *, timeout: float | None = None) -> None:
        self.cfg = cfg
        self.timeout = timeout

    def __call__(self, transport: Transport, participants: list[int], rnd: int,
                 n_params: int) -> tuple[np.ndarray, float]:
        """Return (weighted mean of the participants' flat updates, total weight)."""
        from fedrg.secagg.server import ServerAggregator

        agg = ServerAggregator.from_config(self.cfg.secagg, participants, vector_length=n_params)
        up = down = 0

        def exchange(action: str, requests: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
            nonlocal up, down
            payloads = {node: to_payload(req) for node, req in requests.items()}
            down += sum(p.nbytes() for p in payloads.values())
            replies = transport.send(action, payloads, round_=rnd, timeout=self.timeout)
            up += sum(r.payload.nbytes() for r in replies.values() if r.payload is not None)
            ok = {}
            for node, reply in replies.items():
                if reply.ok:
                    ok[node] = from_payload(reply.payload)
                else:
                    log.warning("round %d %s: node %s dropped: %s", rnd, action, node, reply.error)
            return ok

        requests = agg.setup_requests()
        requests = agg.receive_setup(exchange("secagg_setup", requests))
        requests = agg.receive_shares(exchange("secagg_share", requests))
        requests = agg.receive_masked(exchange("secagg_masked", requests))
        result = agg.receive_unmask(exchange("secagg_unmask", requests))
        transport.last_secagg_bytes = (up, down)  # type: ignore[attr-defined]
        if len(result.included) < self.cfg.federation.min_hospitals:
            # also keeps hospital-level noise shares sound: at least min_hospitals shares summed
            raise SecAggError(f"only {len(result.included)} hospital(s) survived secure aggregation, "
                              f"fewer than federation.min_hospitals={self.cfg.federation.min_hospitals}")
        for note in result.notes:
            log.info("round %d secagg: %s", rnd, note)
        if result.dropped:
            log.warning("round %d: secure aggregation dropped %d hospital(s); aggregate of %d",
                        rnd, len(result.dropped), len(result.included))
        return np.asarray(result.mean, dtype=np.float32), float(result.total_weight)


def check_setup_policy(request: dict[str, Any], policy: SitePolicy) -> None:
    """Refuse a secure sum with too few peers or too low a Shamir threshold for the policy.

    Raises
    ------
    PolicyViolationError
        Naming the number of clients or the threshold and what the policy allows.
    """
    import math

    from fedrg.secagg.params import RoundParams, holders_count

    params = RoundParams.from_message(request)
    if params.num_clients - 1 < policy.min_secagg_peers:
        raise PolicyViolationError(
            setting="secure-sum clients", requested=params.num_clients,
            allowed=f">= {policy.min_secagg_peers + 1} (policy.min_secagg_peers)")
    holders = holders_count(params.num_clients, params.neighbours)
    need = math.ceil(policy.min_threshold_fraction * holders - 1e-9)
    if params.threshold < need:
        raise PolicyViolationError(
            setting="secure-sum threshold", requested=params.threshold,
            allowed=f">= {need} of {holders} share holders (policy.min_threshold_fraction="
            f"{policy.min_threshold_fraction})")


def client_stage(action: str, payload: Payload, state: Payload, *, site_name: str,
                 policy: SitePolicy | None = None) -> Payload:
    """Answer one secure-aggregation message at a hospital.

    ``policy`` (the site's; default: the safe defaults) is checked at setup: the update
    never enters a sum with fewer peers or a lower threshold than it allows.
    """
    from fedrg.secagg.client import ClientSession

    request = from_payload(payload)
    if action == "secagg_setup":
        if "pending_weight" not in state.meta:
            raise SecAggError("secure aggregation setup before local training: no pending update")
        try:
            check_setup_policy(request, policy or SitePolicy())
        except PolicyViolationError as err:
            log.warning("%s refuses the secure sum: %s", site_name, err)
            state.arrays = {}  # the update is dropped, never sent
            state.meta.pop("pending_weight", None)
            raise
        session = ClientSession()
        reply = session.setup(request)
    else:
        if SESSION_KEY not in state.meta:
            raise SecAggError(f"{action} without a secure-aggregation session (setup missing)")
        session = ClientSession.from_bytes(bytes(state.meta[SESSION_KEY]))
        if action == "secagg_share":
            reply = session.share(request)
        elif action == "secagg_masked":
            update = np.concatenate([a.ravel() for a in state.array_list("pending")]).astype(np.float64)
            reply = session.masked_input(request, update, float(state.meta["pending_weight"]))
            # the plain update is no longer needed on the node
            state.arrays = {}
            state.meta.pop("pending_weight", None)
        elif action == "secagg_unmask":
            reply = session.unmask(request)
        else:
            raise SecAggError(f"unknown secure-aggregation stage {action!r}")
    state.meta[SESSION_KEY] = session.to_bytes()
    return to_payload(reply)
