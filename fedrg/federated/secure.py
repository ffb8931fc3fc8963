"""Secure aggregation over the federation's transport: five stages, the first with training.

Server: :class:`SecureAggregationDriver` runs :class:`fedrg.secagg.server.ServerAggregator`
(``setup`` -> ``share`` -> ``masked`` -> ``consistency`` -> ``unmask``). In a federation
round the setup travels with the ``train`` message (:meth:`SecureAggregationDriver.begin`:
the stage-1 request under :data:`SETUP_FIELD` in the train request, the signed keys under
:data:`KEYS_FIELD` in the train reply) and :meth:`SecureRound.finish` sends the other four
stages as messages ``secagg_share`` ... ``secagg_unmask``; calling the driver sends all five
as messages (``secagg_setup`` first). A hospital that misses a stage (or refuses it) counts
as dropped; below the threshold the round aborts with :class:`~fedrg.errors.SecAggError`
and the global model stays as it was.

Hospital: :func:`client_stage` keeps its :class:`fedrg.secagg.client.ClientSession` (secret
keys included) in the node's state between messages; the update itself only ever leaves
masked. It trusts only its pinned roster (``SiteConfig.roster``), its own long-term key and
its policy (:func:`client_trust`), and refuses a round id it has seen before
(:func:`check_setup_replay`; with the setup in the train request, before training).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrg.config import ExperimentConfig, SiteConfig
from fedrg.errors import ConfigError, FedrgError, PolicyViolationError, SecAggError
from fedrg.federated.payload import Payload, Transport
from fedrg.privacy.policy import SitePolicy
from fedrg.secagg.stages import SecAggStage

if TYPE_CHECKING:
    from fedrg.secagg.client import ClientTrust

log = logging.getLogger("fedrg.secagg")

SESSION_KEY = "secagg_session"
SETUP_FIELD = "secagg_setup"
"""Train-request meta key holding this hospital's stage-1 secure-aggregation request."""
KEYS_FIELD = "secagg_keys"
"""Train-reply meta key holding the hospital's signed round keys (its stage-1 reply)."""
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
    from fedrg.privacy.signing import default_key_paths
    from fedrg.secagg.client import ClientTrust
    from fedrg.secagg.roster import load_identity, load_roster

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
    from fedrg.privacy.signing import default_key_paths
    from fedrg.secagg.roster import Roster, load_identity, write_roster

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

    The stage-1 requests (round parameters and each hospital's index) travel inside the
    ``train`` message (under :data:`SETUP_FIELD`) and each hospital's signed round keys come
    back inside its ``train`` reply (:data:`KEYS_FIELD`), saving one message per round; the
    remaining four stages are messages of their own (:meth:`finish`). A sampled hospital that
    declines, fails or sends no keys counts as dropped at setup.
    """

    def __init__(self, driver: SecureAggregationDriver, participants: list[int], rnd: int,
                 n_params: int) -> None:
        from fedrg.secagg.server import ServerAggregator

        self.driver = driver
        self.rnd = rnd
        self.agg = ServerAggregator.from_config(driver.cfg.secagg, participants,
                                                vector_length=n_params)
        self.up = self.down = 0
        self.refusals: list[str] = []
        #: the server's own secure-aggregation work (waiting for hospitals excluded)
        self.server_seconds = 0.0
        self._setup = self._timed(self.agg.setup_requests)

    def setup_requests(self) -> dict[Any, dict[str, Any]]:
        """Stage-1 request per participant (to send with the train message)."""
        self.down += sum(to_payload(r).nbytes() for r in self._setup.values())
        return self._setup

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
               refusals: dict[Any, str] | None = None, *,
               keys_counted: bool = False) -> tuple[np.ndarray, float]:
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

        Raises
        ------
        SecAggError
            When the round aborts (too few survivors at some stage, or fewer than
            ``federation.min_hospitals`` in the sum).
        """
        for node, why in (refusals or {}).items():
            self._note_refusal(f"{SecAggStage.SETUP.action}: node {node}: {why}")
        if not keys_counted:
            self.up += sum(to_payload(r).nbytes() for r in setup_replies.values())
        agg = self.agg
        try:
            t = self._timed
            requests = t(agg.receive_setup, setup_replies)
            requests = t(agg.receive_shares, self._exchange(transport, SecAggStage.SHARE.action, requests))
            requests = t(agg.receive_masked, self._exchange(transport, SecAggStage.MASKED.action, requests))
            requests = t(agg.receive_consistency,
                         self._exchange(transport, SecAggStage.CONSISTENCY.action, requests))
            result = t(agg.receive_unmask, self._exchange(transport, SecAggStage.UNMASK.action, requests))
        except SecAggError as err:
            if not self.refusals:
                raise
            # say why hospitals refused (e.g. their policy wants more peers than the round has)
            raise SecAggError(f"{err} (hospitals answered: {'; '.join(self.refusals)})") from None
        transport.last_secagg_server_seconds = self.server_seconds  # type: ignore[attr-defined]
        return self.driver.conclude(transport, result, self.rnd, (self.up, self.down))


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
    try:
        keys = client_stage(SecAggStage.SETUP.action, to_payload(request), state, site=site)
    except FedrgError as err:
        log.warning("%s refuses the secure sum's setup: %s", site.name, err)
        state.arrays = {}  # the update is dropped, never sent
        state.meta.pop("pending_weight", None)
        reply.meta["secagg_error"] = err.public_message()
        return
    reply.meta[KEYS_FIELD] = from_payload(keys)


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
    if stage is SecAggStage.SETUP:
        round_id = check_setup_replay(request, state)
        seen = list(state.meta.get(SEEN_ROUNDS_KEY, []))
        session = ClientSession(trust)
        reply = session.setup(request)
        state.meta[SEEN_ROUNDS_KEY] = [*seen, round_id][-SEEN_ROUNDS_KEPT:]
    else:
        if SESSION_KEY not in state.meta:
            raise SecAggError(f"{action} without a secure-aggregation session (setup missing)")
        session = ClientSession.from_bytes(bytes(state.meta[SESSION_KEY]), trust)
        if stage is SecAggStage.SHARE:
            reply = session.share(request)
        elif stage is SecAggStage.MASKED:
            update = np.concatenate([a.ravel() for a in state.array_list("pending")])
            reply = session.masked_input(request, update, float(state.meta["pending_weight"]))
            # the plain update is no longer needed on the node
            state.arrays = {}
            state.meta.pop("pending_weight", None)
        elif stage is SecAggStage.CONSISTENCY:
            reply = session.consistency(request)
        else:
            reply = session.unmask(request)
    state.meta[SESSION_KEY] = session.to_bytes()
    return to_payload(reply)
