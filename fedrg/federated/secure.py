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
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrg.config import ExperimentConfig, SiteConfig
from fedrg.errors import ConfigError, FedrgError, PolicyViolationError, SecAggError
from fedrg.payload import Payload, Transport
from fedrg.policy import SitePolicy
from fedrg.secagg.stages import SecAggStage

if TYPE_CHECKING:
    from fedrg.secagg.client import ClientSession, ClientTrust

log = logging.getLogger("fedrg.secagg")

SESSION_KEY = "secagg_session"
SETUP_FIELD = "secagg_setup"
"""Train-request meta key holding this hospital's stage-1 secure-aggregation request."""
KEYS_FIELD = "secagg_keys"
"""Train-reply meta key holding the hospital's signed round keys (its stage-1 reply)."""
NEXT_SESSION_KEY = "secagg_next_session"
"""Node-state key of the next round's session, set up while this round finishes."""
NEXT_SETUP_FIELD = "secagg_next_setup"
"""Consistency-request key: the next round's stage-1 request (pipelined set-up)."""
NEXT_KEYS_FIELD = "secagg_next_keys"
"""Consistency-reply key: the hospital's signed keys for the next round."""
NEXT_SHARE_FIELD = "secagg_next_share"
"""Unmask-request key: the next round's signed key list (its stage-2 request)."""
NEXT_SHARES_FIELD = "secagg_next_shares"
"""Unmask-reply key: the hospital's encrypted shares for the next round."""
NEXT_ERROR_FIELD = "secagg_next_error"
"""Reply key: why the hospital refused the pipelined next-round part (public reason)."""
MASKED_FIELD = "secagg_masked"
"""Train-request key: the shares routed to this hospital in a pipelined round (plus its
round id); train-reply key: ``{"index"}`` of the masked update (array ``sa.masked``)."""
SEEN_ROUNDS_KEY = "secagg_seen_rounds"
SEEN_ROUNDS_KEPT = 1000
ROSTER_FILE = "roster.toml"


def client_trust(site: SiteConfig, *, min_peers: int | None = None,
                 min_threshold_fraction: float | None = None) -> ClientTrust:
    """What this hospital trusts in secure aggregation: roster, own key, policy minimums.

    Parameters
    ----------
    site : SiteConfig
        The hospital's settings: ``roster`` (the pinned roster file), ``name``, and its
        long-term key (``signing_key``, default ``state_dir/ledger_ed25519.pem``).
    min_peers, min_threshold_fraction : optional
        Override the policy; by default from ``site.policy``.

    Raises
    ------
    ConfigError
        If no roster is configured, it cannot be read, or it does not list this hospital
        with its own key (the message names the file; only the class name leaves the site).
    """
    from fedrg.secagg.client import ClientTrust
    from fedrg.secagg.roster import load_identity, load_roster
    from fedrg.signing import default_key_paths

    policy = site.policy
    roster_path = site.roster
    if not roster_path:
        raise ConfigError(
            f"hospital {site.name!r} has no federation roster: secure aggregation refuses peers it "
            "cannot verify. Set roster = \"/path/roster.toml\" in the [site] section of the "
            "hospital's TOML (the file the operator published; check its digest with "
            "`fedrg roster show`)")
    key_path = site.signing_key or str(default_key_paths(site.state_dir)[0])
    return ClientTrust(
        load_identity(site.name, key_path), load_roster(roster_path),
        min_peers=policy.min_secagg_peers if min_peers is None else min_peers,
        min_threshold_fraction=(policy.min_threshold_fraction if min_threshold_fraction is None
                                else min_threshold_fraction))


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


def check_setup_replay(request: dict[str, Any], state: Payload) -> str:
    """The setup's round id (hex), refused if this hospital has answered it before.

    Raises
    ------
    SecAggError
        When the round id is among those this node's state has seen (a replay).
    """
    try:
        round_id = bytes(request.get("round_id", b"")).hex()
    except (TypeError, ValueError):
        raise SecAggError("the secure-aggregation round id is not bytes") from None
    if round_id in list(state.meta.get(SEEN_ROUNDS_KEY, [])):
        raise SecAggError("the server reuses a secure-aggregation round id this hospital has "
                          "already answered (replay); refusing")
    return round_id


def answer_setup_in_train(request: dict[str, Any], reply: Payload, state: Payload, *,
                          site: SiteConfig) -> None:
    """After local training: answer the secure sum's stage 1 inside the train reply.

    The signed round keys go into ``reply.meta[KEYS_FIELD]``. A refusal (e.g. a replayed
    round id, a setup the policy refuses) drops the pending update at the hospital and puts
    the public reason under ``reply.meta["secagg_error"]`` instead, so the server counts this
    hospital as dropped at setup.

    Parameters
    ----------
    request
        The stage-1 request that came with the train message (:data:`SETUP_FIELD`).
    reply
        The train reply, completed in place.
    state
        The node's state, holding the pending update (``pending.*``, ``pending_weight``).
    site
        This hospital's settings.
    """
    keys = _stage_in_train(SecAggStage.SETUP, request, reply, state, site=site)
    if keys is not None:
        reply.meta[KEYS_FIELD] = from_payload(keys)


def _stage_in_train(stage: SecAggStage, request: dict[str, Any], reply: Payload, state: Payload,
                    *, site: SiteConfig) -> Payload | None:
    """Answer ``stage`` for the train reply; on a refusal drop the update (None)."""
    try:
        return client_stage(stage.action, to_payload(request), state, site=site)
    except FedrgError as err:
        log.warning("%s refuses the secure sum (%s): %s", site.name, stage, err)
        state.arrays = {}  # the update is dropped, never sent
        state.meta.pop("pending_weight", None)
        reply.meta["secagg_error"] = err.public_message()
        return None


def client_stage(action: str, payload: Payload, state: Payload, *, site: SiteConfig,
                 min_peers: int | None = None, min_threshold_fraction: float | None = None) -> Payload:
    """Answer one secure-aggregation message at a hospital.

    Parameters
    ----------
    action : str
        ``secagg_setup``, ``secagg_share``, ``secagg_masked``, ``secagg_consistency`` or
        ``secagg_unmask``.
    payload : Payload
        The server's request.
    state : Payload
        The node's persistent state (pending update, session, round ids seen).
    site : SiteConfig
        This hospital's settings (roster, name, key; see :func:`client_trust`).
    min_peers, min_threshold_fraction : optional
        Policy overrides (default: the site's policy). The site's policy is also checked at
        setup (:func:`check_setup_policy`): the update never enters a sum with fewer peers
        or a lower threshold than it allows, and is dropped if the setup is refused.

    Raises
    ------
    SecAggError
        When a check fails; nothing is revealed for the round.
    """
    from fedrg.secagg.client import ClientSession

    try:
        stage = SecAggStage.from_action(action)
    except ValueError as err:
        raise SecAggError(str(err)) from None
    request = from_payload(payload)
    if stage is SecAggStage.SETUP:
        if "pending_weight" not in state.meta:
            raise SecAggError("secure aggregation setup before local training: no pending update")
        try:  # the site's own policy first: it needs nothing but the request
            check_setup_policy(request, site.policy)
        except PolicyViolationError as err:
            log.warning("%s refuses the secure sum: %s", site.name, err)
            state.arrays = {}  # the update is dropped, never sent
            state.meta.pop("pending_weight", None)
            raise
    trust = client_trust(site, min_peers=min_peers, min_threshold_fraction=min_threshold_fraction)
    # a pipelined next-round part rides on the consistency and unmask messages
    next_setup = request.pop(NEXT_SETUP_FIELD, None) if stage is SecAggStage.CONSISTENCY else None
    next_share = request.pop(NEXT_SHARE_FIELD, None) if stage is SecAggStage.UNMASK else None
    extra: dict[str, Any] = {}
    if stage is SecAggStage.SETUP:
        state.meta.pop(NEXT_SESSION_KEY, None)  # a fresh set-up replaces any pipelined one
        session = _new_session(request, state, trust)
        reply = session.setup(request)
    else:
        if SESSION_KEY not in state.meta:
            raise SecAggError(f"{action} without a secure-aggregation session (setup missing)")
        session = ClientSession.from_bytes(bytes(state.meta[SESSION_KEY]), trust)
        if stage is SecAggStage.SHARE:
            reply = session.share(request)
        elif stage is SecAggStage.MASKED:
            if "pending_weight" not in state.meta:
                raise SecAggError("masked input requested but this hospital holds no trained "
                                  "update for the round; refusing")
            update = np.concatenate([a.ravel() for a in state.array_list("pending")])
            reply = session.masked_input(request, update, float(state.meta["pending_weight"]))
            # the plain update is no longer needed on the node
            state.arrays = {}
            state.meta.pop("pending_weight", None)
        elif stage is SecAggStage.CONSISTENCY:
            reply = session.consistency(request)
            if next_setup is not None:
                extra = _answer_next(next_setup, state, trust, site=site, setup=True)
        else:
            reply = session.unmask(request)
            if next_share is not None:
                extra = _answer_next(next_share, state, trust, site=site, setup=False)
    state.meta[SESSION_KEY] = session.to_bytes()
    out = to_payload(reply)
    out.meta.update(extra)
    return out


def _new_session(request: dict[str, Any], state: Payload, trust: ClientTrust) -> ClientSession:
    """A fresh session for a set-up request, after the replay check; records its round id."""
    from fedrg.secagg.client import ClientSession

    round_id = check_setup_replay(request, state)
    session = ClientSession(trust)
    state.meta[SEEN_ROUNDS_KEY] = [*list(state.meta.get(SEEN_ROUNDS_KEY, [])),
                                   round_id][-SEEN_ROUNDS_KEPT:]
    return session


def _answer_next(request: Any, state: Payload, trust: ClientTrust, *, site: SiteConfig,
                 setup: bool) -> dict[str, Any]:
    """Answer the pipelined next-round part of a consistency (set-up) or unmask (share) message.

    The next round's session is independent of this round's (fresh keys, a fresh round id,
    its own policy and replay checks). A refusal never affects this round's answer: the
    pending next session is dropped and the public reason returned under
    :data:`NEXT_ERROR_FIELD`, so that round falls back to a fresh set-up or goes without
    this hospital.
    """
    from fedrg.secagg.client import ClientSession

    try:
        if not isinstance(request, dict):
            raise SecAggError("the pipelined next-round request is not a mapping")
        request = dict(request)
        if setup:
            state.meta.pop(NEXT_SESSION_KEY, None)
            check_setup_policy(request, site.policy)
            session = _new_session(request, state, trust)
            answer = session.setup(request)
            field = NEXT_KEYS_FIELD
        else:
            if NEXT_SESSION_KEY not in state.meta:
                raise SecAggError("next-round key list without a pipelined next-round set-up")
            session = ClientSession.from_bytes(bytes(state.meta[NEXT_SESSION_KEY]), trust)
            answer = session.share(request)
            field = NEXT_SHARES_FIELD
    except FedrgError as err:
        log.warning("%s refuses the pipelined next-round secure sum: %s", site.name, err)
        state.meta.pop(NEXT_SESSION_KEY, None)
        return {NEXT_ERROR_FIELD: err.public_message()}
    state.meta[NEXT_SESSION_KEY] = session.to_bytes()
    return {field: answer}


def check_masked_in_train(request: Any, state: Payload, *, site: SiteConfig) -> dict[str, Any]:
    """Before training: the train request's pipelined masked-input request, checked.

    A pipelined round was set up and its shares exchanged during the previous round's
    consistency and unmask messages; the train request carries the shares routed to this
    hospital and that round's id. It is accepted only for the pending next session, and
    only once: the check consumes it (it becomes this round's session), so whatever
    happens next (training, a decline, a refusal) no later request can use it, a hostile
    server cannot have one session mask two updates, and a refusal here costs no budget.

    Raises
    ------
    SecAggError
        When no pipelined session is pending, the round id differs from it, it is not
        waiting for its masked input, or the routed shares do not open (tampered,
        misrouted, too few for the threshold).
    """
    from fedrg.secagg.client import ClientSession

    if not isinstance(request, dict):
        raise SecAggError("the pipelined secure-aggregation request in the train message is "
                          "not a mapping")
    raw = state.meta.get(NEXT_SESSION_KEY)
    if raw is None:
        raise SecAggError("the train request asks for a pipelined secure sum this hospital has "
                          "not set up (or has used already); refusing before training")
    session = ClientSession.from_bytes(bytes(raw), client_trust(site))
    try:
        round_id = bytes(request.get("round_id", b""))
    except (TypeError, ValueError):
        raise SecAggError("the pipelined secure-aggregation round id is not bytes") from None
    if session.params is None or round_id != session.params.round_id:
        raise SecAggError("the train request names another pipelined secure-aggregation round "
                          "than the one this hospital set up; refusing before training")
    if session.stage != SecAggStage.SHARE.value:
        raise SecAggError(f"the pipelined secure-aggregation session is in stage "
                          f"'{session.stage}', not waiting for its masked input; refusing")
    state.meta[SESSION_KEY] = state.meta.pop(NEXT_SESSION_KEY)  # used once, whatever follows
    session.open_shares(request)  # tampered or misrouted shares: refused before training
    return request


def answer_masked_in_train(request: dict[str, Any], reply: Payload, state: Payload, *,
                           site: SiteConfig) -> None:
    """After local training: mask the update in the pipelined session, into the train reply.

    The masked vector goes under ``reply.arrays["sa.masked"]`` and its index under
    ``reply.meta[MASKED_FIELD]``, in the session :func:`check_masked_in_train` made this
    round's (its consistency and unmask messages follow). A refusal drops the update at
    the hospital and puts the public reason under ``reply.meta["secagg_error"]``.
    """
    routed = {k: v for k, v in request.items() if k != "round_id"}
    masked = _stage_in_train(SecAggStage.MASKED, routed, reply, state, site=site)
    if masked is not None:
        reply.arrays["sa.masked"] = masked.arrays["sa.masked"]
        reply.meta[MASKED_FIELD] = dict(masked.meta)
