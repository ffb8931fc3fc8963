"""The hospital half of secure aggregation: what a hospital answers, and what it checks first.

:func:`client_stage` keeps its :class:`fedrg.secagg.client.ClientSession` (secret keys
included) in the node's state between messages; the update itself only ever leaves masked.
It trusts only its pinned roster (``SiteConfig.roster``), its own long-term key and its
policy (:func:`client_trust`), refuses a round id it has seen before
(:func:`check_setup_replay`; with the setup in the train request, before training), and
accepts a pipelined train request only for its pending next session, once
(:func:`check_masked_in_train`, before training). The server half is
:mod:`fedrg.federated.secure`; the wire names are in :mod:`fedrg.secagg.wire`.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrg.config import SiteConfig
from fedrg.errors import ConfigError, FedrgError, PolicyViolationError, SecAggError
from fedrg.payload import Payload
from fedrg.policy import SitePolicy
from fedrg.secagg.stages import SecAggStage
from fedrg.secagg.wire import (
    KEYS_FIELD,
    MASKED_FIELD,
    NEXT_ERROR_FIELD,
    NEXT_KEYS_FIELD,
    NEXT_SESSION_KEY,
    NEXT_SETUP_FIELD,
    NEXT_SHARE_FIELD,
    NEXT_SHARES_FIELD,
    SEEN_ROUNDS_KEPT,
    SEEN_ROUNDS_KEY,
    SESSION_KEY,
    from_payload,
    to_payload,
)

if TYPE_CHECKING:
    from fedrg.secagg.client import ClientSession, ClientTrust, PrecomputedMasks

#: Key (never a wire field) under which :func:`check_masked_in_train` hands the masks being
#: expanded during training to :func:`answer_masked_in_train`.
PRECOMPUTED_MASKS_KEY = "_precomputed_masks"
_MASK_POOL: ThreadPoolExecutor | None = None

log = logging.getLogger("fedrg.secagg")


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


def check_setup_policy(request: dict[str, Any], policy: SitePolicy) -> None:
    """Refuse a secure sum with too few peers or too low a Shamir threshold for the policy.

    Raises
    ------
    PolicyViolationError
        Naming the number of clients or the threshold and what the policy allows.
    """
    from fedrg.secagg.params import RoundParams, holders_count

    params = RoundParams.from_message(request)
    if params.num_clients < policy.min_secure_sum_size:
        raise PolicyViolationError(
            setting="secure-sum clients", requested=params.num_clients,
            allowed=f">= {policy.min_secure_sum_size} (policy.min_secagg_peers)")
    holders = holders_count(params.num_clients, params.neighbours)
    need = policy.min_threshold(holders)
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
                    *, site: SiteConfig, masks: PrecomputedMasks | None = None) -> Payload | None:
    """Answer ``stage`` for the train reply; on a refusal drop the update (None)."""
    try:
        return client_stage(stage.action, to_payload(request), state, site=site, masks=masks)
    except FedrgError as err:
        log.warning("%s refuses the secure sum (%s): %s", site.name, stage, err)
        state.arrays = {}  # the update is dropped, never sent
        state.meta.pop("pending_weight", None)
        reply.meta["secagg_error"] = err.public_message()
        return None


def client_stage(action: str, payload: Payload, state: Payload, *, site: SiteConfig,
                 min_peers: int | None = None, min_threshold_fraction: float | None = None,
                 masks: PrecomputedMasks | None = None) -> Payload:
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
    masks : PrecomputedMasks, optional
        For ``secagg_masked``: the session's masks expanded beforehand
        (:meth:`fedrg.secagg.client.ClientSession.precompute_masks`); used only when made
        for this session and the same routed shares.

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
            reply = session.masked_input(request, update, float(state.meta["pending_weight"]),
                                         masks=masks)
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

    Accepted, the session's masks are expanded in a background thread while the hospital
    trains (they depend only on the agreed keys and the opened shares): the returned
    request carries that computation under :data:`PRECOMPUTED_MASKS_KEY` (in this process
    only, never sent) for :func:`answer_masked_in_train`.

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
    # the masks depend only on the agreed keys and the opened shares: expand them while the
    # hospital trains (they stay in this process; the masked upload adds them after training)
    global _MASK_POOL
    if _MASK_POOL is None:
        _MASK_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrg-secagg-masks")
    return {**request, PRECOMPUTED_MASKS_KEY: _MASK_POOL.submit(session.precompute_masks, request)}


def answer_masked_in_train(request: dict[str, Any], reply: Payload, state: Payload, *,
                           site: SiteConfig) -> None:
    """After local training: mask the update in the pipelined session, into the train reply.

    The masked vector goes under ``reply.arrays["sa.masked"]`` and its index under
    ``reply.meta[MASKED_FIELD]``, in the session :func:`check_masked_in_train` made this
    round's (its consistency and unmask messages follow), with the masks expanded during
    training (or here, if that failed). A refusal drops the update at the hospital and puts
    the public reason under ``reply.meta["secagg_error"]``.
    """
    routed = {k: v for k, v in request.items() if k not in ("round_id", PRECOMPUTED_MASKS_KEY)}
    masks = None
    pending = request.get(PRECOMPUTED_MASKS_KEY)
    if isinstance(pending, Future):
        try:
            masks = pending.result()
        except FedrgError:  # the masked input expands them itself, and refuses the same way
            masks = None
    masked = _stage_in_train(SecAggStage.MASKED, routed, reply, state, site=site, masks=masks)
    if masked is not None:
        reply.arrays["sa.masked"] = masked.arrays["sa.masked"]
        reply.meta[MASKED_FIELD] = dict(masked.meta)
