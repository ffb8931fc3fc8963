"""Builders for fedrg's Flower ServerApp and ClientApp (Message API).

``server/app.py`` and ``clients/app.py`` call these with deployment settings; ``fedrg
simulate`` calls them with simulated hospitals. The apps are identical in both engines.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedrg.config import ExperimentConfig, SiteConfig
from fedrg.errors import FedrgError
from fedrg.flower.records import (
    PACKED_KEY,
    RecordLayoutError,
    pack_arrays,
    payload_to_record,
    record_to_payload,
    unpack_arrays,
)
from fedrg.flower.transport import ACTIONS, GridTransport
from fedrg.payload import Payload

if TYPE_CHECKING:
    from fedrg.federated.aggregate import Aggregator
    from fedrg.federated.server import ServerResult

log = logging.getLogger("fedrg.flower")

SiteResolver = Callable[[Context], SiteConfig]
"""Maps a node's context to its site config (node config in deployment)."""

ERROR_CODE = 4100  # fedrg: the hospital could not answer (reason carries no site data)
STATE_BYTES = "fedrg_state"
STATE_ARRAYS = "fedrg_state_arrays"
STATE_LAYOUT = "fedrg_state_layout"


# --------------------------------------------------------------------------- client side

def _load_state(context: Context) -> Payload:
    meta: dict[str, Any] = {}
    arrays = {}
    if STATE_BYTES in context.state:
        meta = dict(context.state[STATE_BYTES].items())
    if STATE_ARRAYS in context.state:
        stored = context.state[STATE_ARRAYS]
        if not isinstance(stored, ArrayRecord):
            raise RecordLayoutError(f"the ClientApp state's {STATE_ARRAYS!r} record is a "
                                    f"{type(stored).__name__}, not an ArrayRecord")
        layout = meta.pop(STATE_LAYOUT, None)
        if layout is not None and PACKED_KEY in stored:  # one packed array (see records.py)
            arrays = unpack_arrays(stored[PACKED_KEY].numpy(), str(layout))
        else:
            arrays = {k: v.numpy() for k, v in stored.items()}
    return Payload(meta=meta, arrays=arrays)


def _save_state(context: Context, state: Payload) -> None:
    meta = dict(state.meta)
    arrays: dict[str, Array] = {}
    if state.arrays:  # one object for Flower to store and move, not one per tensor
        buf, meta[STATE_LAYOUT] = pack_arrays(state.arrays)
        arrays[PACKED_KEY] = Array(buf)
    context.state[STATE_BYTES] = ConfigRecord(meta)
    context.state[STATE_ARRAYS] = ArrayRecord(array_dict=arrays)


def site_from_node_config(context: Context) -> SiteConfig:
    """Deployment: a SuperNode's ``--node-config`` names its cohort, state dir and site policy."""
    nc = context.node_config
    missing = [k for k in ("cohort", "state-dir") if k not in nc]
    if missing:
        raise FedrgError(
            f"SuperNode node config lacks {missing}; start it with "
            "--node-config 'cohort=\"/path\" state-dir=\"/path\" site-name=\"h1\"' "
            "(fedrg client does this from configs/hospital.example.toml, policy included)")
    from fedrg.policy import SitePolicy, decode_policy

    # no policy key: the safe defaults (DP and secure aggregation required)
    policy = decode_policy(str(nc["policy"])) if "policy" in nc else SitePolicy()
    return SiteConfig(
        name=str(nc.get("site-name", f"node-{context.node_id}")),
        cohort=str(nc["cohort"]),
        state_dir=str(nc["state-dir"]),
        signing_key=str(nc.get("signing-key", "")),
        policy=policy,
        roster=str(nc.get("roster", "")),
    )


def build_client_app(resolve_site: SiteResolver = site_from_node_config) -> ClientApp:
    """The hospital agent: one handler per message type, all delegating to ``HospitalSite``."""
    app = ClientApp()

    def handle(action: str, msg: Message, context: Context) -> Message:
        profile_dir = os.environ.get("FEDRG_PROFILE_DIR")
        if not profile_dir:
            return _handle(action, msg, context)
        import cProfile

        # hospital-side CPU profile of this message (benchmarks/hospital_profile.py)
        prof = cProfile.Profile(time.process_time)
        try:
            return prof.runcall(_handle, action, msg, context)
        finally:
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            prof.dump_stats(Path(profile_dir) / f"{action}-{os.getpid()}-{time.time_ns()}.prof")

    def _handle(action: str, msg: Message, context: Context) -> Message:
        try:
            site_cfg = resolve_site(context)
            state = _load_state(context)
            payload = record_to_payload(msg.content)
            # the hospital's long-lived worker (started by `fedrg client`) answers when it
            # runs: torch, model, cohort and accountant stay warm there; else this process
            from fedrg.hospital.worker import forward

            reply = forward(site_cfg, action, payload, state)
            if reply is None:
                from fedrg.hospital.answer import answer

                reply = answer(action, site_cfg, payload, state)
            _save_state(context, state)
        except FedrgError as err:
            # full detail stays in the hospital's log; the server gets no paths or values
            log.error("%s failed at this hospital: %s", action, err)
            return Message(error=Error(code=ERROR_CODE, reason=err.public_message()), reply_to=msg)
        except Exception as err:
            log.exception("%s failed at this hospital", action)
            return Message(error=Error(code=ERROR_CODE, reason=f"{type(err).__name__} at the hospital "
                                       "(details in the hospital's log)"), reply_to=msg)
        return Message(content=payload_to_record(reply), reply_to=msg)

    def register(action: str) -> None:
        # one handler per fedrg action, under the message type the server sends for it
        category, _, name = ACTIONS[action].partition(".")
        decorate = app.train if category == "train" else app.evaluate

        def handler(msg: Message, context: Context) -> Message:
            return handle(action, msg, context)

        decorate(name or "default")(handler)

    for action in ACTIONS:
        register(action)

    return app


# --------------------------------------------------------------------------- server side

ConfigProvider = Callable[[Context], tuple[ExperimentConfig, Path, bool]]
"""Maps the ServerApp context to (config, run directory, resume?)."""


def collect_ledgers(transport: GridTransport, run_dir: Path, *, round_: int,
                    timeout: float = 600.0) -> list[str]:
    """Ask every connected hospital for its public ledger copy; write them to ``run_dir``.

    Returns the names of the hospitals whose copy was written (see
    :func:`fedrg.federated.ledger_copy.write_ledger_copies`).
    """
    from fedrg.federated.ledger_copy import write_ledger_copies

    nodes = transport.nodes()
    replies = transport.send("ledger", {n: Payload() for n in nodes}, round_=round_,
                             timeout=timeout)
    written = write_ledger_copies(run_dir, {n: r.payload for n, r in replies.items()
                                            if r.ok and r.payload is not None})
    log.info("public ledger copies from %d of %d hospital(s) in %s", len(written), len(nodes),
             Path(run_dir) / "ledgers")
    return sorted(written)


def build_server_app(provide: ConfigProvider,
                     on_round: Callable[[dict[str, Any]], None] | None = None,
                     results: list[ServerResult] | None = None,
                     failures: list[BaseException] | None = None,
                     on_phase: Callable[[str, int, int], None] | None = None,
                     *, ledgers: bool = False, aggregator: Aggregator | None = None) -> ServerApp:
    """The coordinator: runs :func:`fedrg.federated.runner.run_federation` over the Grid.

    ``on_phase(action, round, n_hospitals)`` is called before each message exchange
    (progress display of ``fedrg simulate``). ``aggregator`` is a custom
    :class:`~fedrg.federated.aggregate.Aggregator` object (default: the one
    ``federation.server_optimizer`` names). With ``ledgers=True`` (deployment) the
    hospitals' public ledger copies are collected into ``run_dir/ledgers`` after the last
    round, through the same Flower messages.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedrg.federated.runner import run_federation

        try:
            cfg, run_dir, resume = provide(context)
            # a deployed run waits as long as its server was told for the hospitals it needs
            wait = float(context.run_config.get("fedrg.wait_for_hospitals_s", 60.0))
            transport = GridTransport(grid, min_nodes=cfg.federation.min_hospitals,
                                      wait_for_nodes=wait, on_send=on_phase)
            result = run_federation(transport, cfg, run_dir, resume=resume, on_round=on_round,
                                    aggregator=aggregator)
            if ledgers:
                try:  # the trained model is saved already: a missing copy fails no run
                    collect_ledgers(transport, Path(run_dir), round_=cfg.federation.rounds + 1)
                except Exception:
                    log.exception("collecting the hospitals' public ledger copies failed; "
                                  "auditors can get them from the hospitals directly")
        except BaseException as err:
            if failures is not None:  # the simulation runner re-raises it in the caller
                failures.append(err)
            raise
        if results is not None:
            results.append(result)

    return app
