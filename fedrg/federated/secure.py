"""Secure aggregation over the federation's transport: five stages in three to five messages.

Server: :class:`SecureAggregationDriver` runs :class:`fedrg.secagg.server.ServerAggregator`
(``setup`` -> ``share`` -> ``masked`` -> ``consistency`` -> ``unmask``). In a federation
round the setup travels with the ``train`` message (:meth:`SecureAggregationDriver.begin`:
the stage-1 request under :data:`SETUP_FIELD` in the train request, the signed keys under
:data:`KEYS_FIELD` in the train reply) and :meth:`SecureRound.finish` sends the other four
stages as messages ``secagg_share`` ... ``secagg_unmask``. With ``secagg.pipelined`` the
next round is set up on this round's consistency and unmask messages, and its train
message carries the routed shares and its reply the masked update (:class:`SecureRound`):
three messages per round after the first, each round with fresh keys. Calling the driver
sends all five stages as messages (``secagg_setup`` first). A hospital that misses a stage
(or refuses it) counts as dropped; below the threshold the round aborts with
:class:`~fedrg.errors.SecAggError` and the global model stays as it was.

Hospital: :func:`client_stage` keeps its :class:`fedrg.secagg.client.ClientSession` (secret
keys included) in the node's state between messages; the update itself only ever leaves
masked. It trusts only its pinned roster (``SiteConfig.roster``), its own long-term key and
its policy (:func:`client_trust`), refuses a round id it has seen before
(:func:`check_setup_replay`; with the setup in the train request, before training), and
accepts a pipelined train request only for its pending next session, once
(:func:`check_masked_in_train`, before training).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedrg.config import ExperimentConfig, SiteConfig
from fedrg.errors import SecAggError
from fedrg.payload import Transport
from fedrg.secagg.stages import SecAggStage
from fedrg.secagg.wire import (
    NEXT_ERROR_FIELD,
    NEXT_KEYS_FIELD,
    NEXT_SETUP_FIELD,
    NEXT_SHARE_FIELD,
    NEXT_SHARES_FIELD,
    from_payload,
    to_payload,
)

log = logging.getLogger("fedrg.secagg")

ROSTER_FILE = "roster.toml"


def provision_roster(sites: list[SiteConfig], roster_path: str | Path) -> list[SiteConfig]:
    """Simulation: give every site a long-term key and one shared roster listing them all.

    Each site's key is its ledger key (created in its state directory when missing); the
    roster is written to ``roster_path``. Returns the sites with ``roster`` set, so a
    simulated hospital runs exactly the checks a deployed one does.
    """
    from fedrg.secagg.roster import Roster, load_identity, write_roster
    from fedrg.signing import default_key_paths

    identities = [load_identity(site.name, site.signing_key or default_key_paths(site.state_dir)[0],
                                create=True) for site in sites]
    write_roster(roster_path, Roster([i.entry() for i in identities], source=str(roster_path)))
    return [site.model_copy(update={"roster": str(roster_path)}) for site in sites]


class SecureRound:
    """One secure-aggregation round on the server, begun before local training.

    Fresh (:meth:`SecureAggregationDriver.begin`): the stage-1 requests (round parameters
    and each hospital's index) travel inside the ``train`` message (under
    :data:`SETUP_FIELD`) and each hospital's signed round keys come back inside its
    ``train`` reply (:data:`KEYS_FIELD`); :meth:`finish` sends the other four stages as
    messages of their own. A sampled hospital that declines, fails or sends no keys counts
    as dropped at setup.

    Pipelined: while this round finishes, the *next* round is set up on the same messages
    (:meth:`finish` with ``next_participants``): its stage-1 request rides on this round's
    consistency request and the signed keys on the reply, its key list on the unmask
    request and the encrypted shares on the reply. When every next participant completed
    both, :attr:`next_round` is ready: the next train message carries the shares routed to
    each hospital (:meth:`masked_requests`, under :data:`MASKED_FIELD`), the train reply
    the masked update, and :meth:`finish_masked` needs only the consistency and unmask
    messages. Three messages per round instead of five; each round keeps its own fresh
    keys, round id and Shamir shares, so the protocol's guarantees are those of one round.
    """

    def __init__(self, driver: SecureAggregationDriver, participants: list[int], rnd: int,
                 n_params: int) -> None:
        from fedrg.secagg.server import ServerAggregator

        self.driver = driver
        self.rnd = rnd
        self.participants = sorted(participants)
        self.n_params = n_params
        self.agg = ServerAggregator.from_config(driver.cfg.secagg, participants,
                                                vector_length=n_params)
        self.up = self.down = 0
        self.refusals: list[str] = []
        #: the server's own secure-aggregation work (waiting for hospitals excluded)
        self.server_seconds = 0.0
        self._setup = self._timed(self.agg.setup_requests)
        self._routed: dict[Any, dict[str, Any]] = {}
        #: the next round, set up during this one's last two messages (None: set up afresh)
        self.next_round: SecureRound | None = None

    def setup_requests(self) -> dict[Any, dict[str, Any]]:
        """Stage-1 request per participant (to send with the train message)."""
        self.down += sum(to_payload(r).nbytes() for r in self._setup.values())
        return self._setup

    @property
    def ready(self) -> bool:
        """Pipelined and complete: every participant's keys and shares are in."""
        return bool(self._routed) and sorted(self._routed) == self.participants

    def masked_requests(self) -> dict[Any, dict[str, Any]]:
        """Per participant, the shares routed to it and the round id (for the train message)."""
        if not self.ready:
            raise SecAggError(f"round {self.rnd}'s secure sum was not set up ahead")
        rid = self.agg.params.round_id
        out = {node: {**req, "round_id": rid} for node, req in self._routed.items()}
        self.down += sum(to_payload(r).nbytes() for r in out.values())
        return out

    def _exchange(self, transport: Transport, action: str,
                  requests: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
        payloads = {node: to_payload(req) for node, req in requests.items()}
        self.down += sum(p.nbytes() for p in payloads.values())
        replies = transport.send(action, payloads, round_=self.rnd, timeout=self.driver.timeout)
        self.up += sum(r.payload.nbytes() for r in replies.values() if r.payload is not None)
        ok = {}
        for node, reply in replies.items():
            if reply.ok and reply.payload is not None:
                ok[node] = from_payload(reply.payload)
            else:
                log.warning("round %d %s: node %s dropped: %s", self.rnd, action, node, reply.error)
                self._note_refusal(f"{action}: {reply.error}" if reply.error else "")
        return ok

    def _timed(self, work: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.server_seconds += time.perf_counter() - t0

    def _note_refusal(self, text: str) -> None:
        if text and len(self.refusals) < 3:
            self.refusals.append(text)

    def finish(self, transport: Transport, setup_replies: dict[Any, dict[str, Any]],
               refusals: dict[Any, str] | None = None, *, keys_counted: bool = False,
               next_participants: list[int] | None = None) -> tuple[np.ndarray, float]:
        """Run stages 2-5 from the keys the hospitals returned; (weighted mean, total weight).

        Parameters
        ----------
        transport
            The federation's transport.
        setup_replies
            ``{node: keys}``: each hospital's stage-1 reply (from its train reply).
        refusals
            ``{node: why}`` of sampled hospitals that sent no keys (named if the round aborts).
        keys_counted
            The keys came in a message of their own whose bytes are counted already.
        next_participants
            The next round's hospitals: set that round up during this one's consistency
            and unmask messages (:attr:`next_round`); None: no next round.

        Raises
        ------
        SecAggError
            When the round aborts (too few survivors at some stage, or fewer than
            ``federation.min_hospitals`` in the sum).
        """
        self._note_refusals(refusals)
        if not keys_counted:
            self.up += sum(to_payload(r).nbytes() for r in setup_replies.values())

        def stages() -> Any:
            t, agg = self._timed, self.agg
            requests = t(agg.receive_setup, setup_replies)
            requests = t(agg.receive_shares, self._exchange(transport, SecAggStage.SHARE.action, requests))
            masked = self._exchange(transport, SecAggStage.MASKED.action, requests)
            return self._after_masked(transport, masked, next_participants)

        return self._run(transport, stages)

    def finish_masked(self, transport: Transport, masked_replies: dict[Any, dict[str, Any]],
                      refusals: dict[Any, str] | None = None, *,
                      next_participants: list[int] | None = None) -> tuple[np.ndarray, float]:
        """A pipelined round: the masked updates came with the train replies; run stages 4-5.

        Parameters are those of :meth:`finish`; ``masked_replies`` is ``{node: {"index",
        "masked"}}`` from the train replies (their bytes are counted with the train reply).
        """
        self._note_refusals(refusals)
        return self._run(transport, lambda: self._after_masked(transport, masked_replies,
                                                               next_participants))

    def _note_refusals(self, refusals: dict[Any, str] | None) -> None:
        for node, why in (refusals or {}).items():
            self._note_refusal(f"{SecAggStage.SETUP.action}: node {node}: {why}")

    def _run(self, transport: Transport, stages: Any) -> tuple[np.ndarray, float]:
        try:
            result = stages()
        except SecAggError as err:
            self.next_round = None
            if not self.refusals:
                raise
            # say why hospitals refused (e.g. their policy wants more peers than the round has)
            raise SecAggError(f"{err} (hospitals answered: {'; '.join(self.refusals)})") from None
        transport.last_secagg_server_seconds = self.server_seconds  # type: ignore[attr-defined]
        return self.driver.conclude(transport, result, self.rnd, (self.up, self.down))

    def _after_masked(self, transport: Transport, masked: dict[Any, dict[str, Any]],
                      next_participants: list[int] | None) -> Any:
        """Stages 3-5 from the masked inputs; sets up the next round on the way if asked."""
        t, agg = self._timed, self.agg
        requests = t(agg.receive_masked, masked)
        nxt = None
        if next_participants and set(next_participants) <= set(requests):
            nxt = self.driver.begin(next_participants, self.rnd + 1, self.n_params)
            setup = nxt.setup_requests()
            requests = {node: ({**req, NEXT_SETUP_FIELD: setup[node]} if node in setup else req)
                        for node, req in requests.items()}
        replies = self._exchange(transport, SecAggStage.CONSISTENCY.action, requests)
        next_keys = _pop_next(replies, NEXT_KEYS_FIELD)
        requests = t(agg.receive_consistency, replies)
        if nxt is not None:
            share = nxt._next_stage(nxt.agg.receive_setup, next_keys)
            if share is not None and set(share) <= set(requests):
                nxt.down += sum(to_payload(r).nbytes() for r in share.values())
                requests = {node: ({**req, NEXT_SHARE_FIELD: share[node]} if node in share else req)
                            for node, req in requests.items()}
            else:
                nxt = None
        replies = self._exchange(transport, SecAggStage.UNMASK.action, requests)
        next_shares = _pop_next(replies, NEXT_SHARES_FIELD)
        result = t(agg.receive_unmask, replies)
        if nxt is not None:
            nxt._routed = nxt._next_stage(nxt.agg.receive_shares, next_shares) or {}
            if nxt.ready:
                self.next_round = nxt
            else:
                log.info("round %d: the pipelined set-up of round %d is incomplete; it will be "
                         "set up afresh", self.rnd, self.rnd + 1)
        return result

    def _next_stage(self, receive: Any, replies: dict[Any, dict[str, Any]]) -> Any:
        """One pipelined stage of this (next) round; None when it cannot go on."""
        self.up += sum(to_payload(r).nbytes() for r in replies.values())
        try:
            return self._timed(receive, replies)
        except SecAggError as err:
            log.info("round %d: pipelined set-up stopped (%s); it will be set up afresh",
                     self.rnd, err)
            return None


def _pop_next(replies: dict[Any, dict[str, Any]], field: str) -> dict[Any, dict[str, Any]]:
    """Take the pipelined next-round answers out of this round's replies."""
    out = {}
    for node, reply in replies.items():
        value = reply.pop(field, None)
        reason = reply.pop(NEXT_ERROR_FIELD, None)
        if isinstance(value, dict):
            out[node] = value
        elif reason:
            log.info("node %s refused the pipelined next round: %s", node, reason)
    return out


class SecureAggregationDriver:
    """Runs one secure-aggregation round per call (server side).

    :meth:`begin` starts a round whose setup travels with the train message (what
    :class:`~fedrg.federated.server.FederationServer` uses); calling the driver runs all
    five stages as messages of their own, after training.
    """

    def __init__(self, cfg: ExperimentConfig, *, timeout: float | None = None) -> None:
        self.cfg = cfg
        self.timeout = timeout

    def begin(self, participants: list[int], rnd: int, n_params: int) -> SecureRound:
        """A round over ``participants`` whose stage-1 requests go out with the train message."""
        return SecureRound(self, participants, rnd, n_params)

    def __call__(self, transport: Transport, participants: list[int], rnd: int,
                 n_params: int) -> tuple[np.ndarray, float]:
        """Return (weighted mean of the participants' flat updates, total weight)."""
        sa = self.begin(participants, rnd, n_params)
        setup = sa._exchange(transport, SecAggStage.SETUP.action, sa.setup_requests())
        return sa.finish(transport, setup, keys_counted=True)

    def conclude(self, transport: Transport, result: Any, rnd: int,
                 traffic: tuple[int, int]) -> tuple[np.ndarray, float]:
        """Check a finished round's survivors; return (mean, total weight)."""
        up, down = traffic
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
