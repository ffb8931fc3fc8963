"""A hospital's side of the federation, independent of Flower.

``HospitalSite.handle(action, payload, state)`` answers one server message:

* ``train``: check the server's request against the site's own policy
  (:mod:`fedrg.hospital.request`; refuse before touching data if it is outside it), plan the
  round once (:func:`fedrg.hospital.plan.plan_training`: decline before touching data if it
  would pass the run's cap or the lifetime budget), train with DP-SGD as the plan says, append
  the signed ledger entry the plan fixes, compute the update (delta from the global adapter).
  With secure aggregation the update stays in ``state`` until the masked upload; without, it
  is returned with its weight. A train request may also ask for the evaluation of the global
  adapter it carries (the previous round's result, ``meta["evaluate_round"]``): answered
  first, exactly as an ``evaluate`` message, in ``reply.meta["evaluation"]``.
* ``secagg_*``: the five secure-aggregation stages (:mod:`fedrg.hospital.secure`; the update
  only leaves masked).
* ``evaluate``: a release of validation aggregates of the global adapter, planned by
  :func:`fedrg.hospital.plan.plan_release` (noisy and charged to the ledger, or exact where
  the site's policy opts out).

Before any of it the hospital checks that its state directory still holds the ledger it
anchored (the anchor beside its signing key, the key its pinned roster lists) and that the
ledger extends the head the server last saw; otherwise it refuses until re-initialised
explicitly (``fedrg site reinit``). Every reply carries the hospital's signed ledger head.

Nothing in a reply names a patient, a path, a sample value or a number computed from the
cohort beyond what the ledger releases.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedrg.config import ExperimentConfig, SiteConfig, from_run_config
from fedrg.errors import BudgetExceededError, FedrgError, PolicyViolationError, PrivacyError, SecAggError
from fedrg.files import atomic_write
from fedrg.hospital.plan import RoundPlan, Spent, plan_release, plan_training
from fedrg.hospital.protocol import EVALUATE_FIELD, EVALUATION_FIELD, LEDGER_NOT_EXTENDING
from fedrg.hospital.replies import DeclinedError, declined_reply
from fedrg.hospital.request import check_base_model, check_request, check_sizes, with_site_split
from fedrg.paths import tree_stamp
from fedrg.payload import Payload
from fedrg.privacy.ledger import Ledger, anchor_problem
from fedrg.runtime import torch_threads
from fedrg.secagg.stages import ACTION_PREFIX

if TYPE_CHECKING:  # the model and data modules load torch/transformers only when used
    from fedrg.data.loader import CohortLoader, SiteData
    from fedrg.model.adapter import RadiogenomicsModel
    from fedrg.model.factory import ModelFactory
    from fedrg.policy import SitePolicy
    from fedrg.privacy.dpsgd import DPSession
    from fedrg.privacy.ledger import LedgerEntry

log = logging.getLogger("fedrg.site")


_SITES: OrderedDict[str, HospitalSite] = OrderedDict()
_MAX_SITES = 16  # a Ray actor may serve 100s of simulated hospitals: bound the cohorts held


def get_site(site: SiteConfig) -> HospitalSite:
    """The process-wide :class:`HospitalSite` for ``site`` (caches cohort and model).

    At most ``_MAX_SITES`` hospitals stay in memory per process (least recently used go;
    their cohort then comes back from the state dir's cohort cache).
    """
    key = site.model_dump_json()
    if key not in _SITES:
        _SITES[key] = HospitalSite(site)
        while len(_SITES) > _MAX_SITES:
            _SITES.popitem(last=False)
    _SITES.move_to_end(key)
    return _SITES[key]


@dataclass
class _CohortCache:
    key: str
    data: SiteData
    fingerprint: str

    @property
    def n_train(self) -> int:
        return len(self.data.train)


_MODELS: dict[str, RadiogenomicsModel] = {}


def _model_for(cfg: ExperimentConfig, factory: ModelFactory | None = None) -> RadiogenomicsModel:
    """One model per (factory, model, data) config and base files per process (a worker
    keeps the last one only); the caller sets the adapter arrays it received on every message,
    so nothing one message trained reaches the next (another hospital's included)."""
    from fedrg.model.base import BUILTIN_PREFIX
    from fedrg.model.factory import DEFAULT_MODEL_FACTORY

    factory = DEFAULT_MODEL_FACTORY if factory is None else factory
    # a local base directory that changes on disk (replaced, rebuilt) is read again
    base_stamp = "" if cfg.model.base.startswith(BUILTIN_PREFIX) else tree_stamp(cfg.model.base)
    key = json.dumps([f"{type(factory).__qualname__}@{id(factory)}", cfg.model.model_dump(mode="json"),
                      cfg.data.model_dump(mode="json"), cfg.federation.seed, base_stamp],
                     sort_keys=True)
    if key not in _MODELS:
        _MODELS.clear()  # keep one model per worker process
        _MODELS[key] = factory.build(cfg.model, cfg.data, cfg.federation.seed)
    return _MODELS[key]


def _round_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") % 2**63


class HospitalSite:
    """One hospital: its cohort, ledger and state directory (all stay on site)."""

    def __init__(self, site: SiteConfig, *, model_factory: ModelFactory | None = None,
                 cohort_loader: CohortLoader | None = None) -> None:
        """``model_factory`` (:class:`~fedrg.model.factory.ModelFactory`) and ``cohort_loader``
        (:class:`~fedrg.data.loader.CohortLoader`) default to the built-in ones; neither can
        change what the site policy decides about DP or secure aggregation."""
        from fedrg.data.loader import DEFAULT_COHORT_LOADER
        from fedrg.model.factory import DEFAULT_MODEL_FACTORY

        self.site = site
        self.model_factory = DEFAULT_MODEL_FACTORY if model_factory is None else model_factory
        self.cohort_loader = DEFAULT_COHORT_LOADER if cohort_loader is None else cohort_loader
        self._cohort: _CohortCache | None = None

    # ------------------------------------------------------------------ helpers
    def cohort(self, cfg: ExperimentConfig) -> _CohortCache:
        """Load the site's data once per data config and cohort files (the loader validates
        and splits): a cohort whose files change on disk (added, removed, rewritten, touched;
        :func:`fedrg.paths.tree_stamp`) is loaded again."""
        key = json.dumps([cfg.data.model_dump(mode="json"), tree_stamp(self.site.cohort)])
        if self._cohort is None or self._cohort.key != key:
            data = self.cohort_loader.load(self.site, cfg.data)
            self._cohort = _CohortCache(key, data, str(data.fingerprint))
        return self._cohort

    def _ledger(self) -> Ledger:
        return Ledger.open(self.site.state_dir, hospital=self.site.name,
                           signing_key_path=self.site.signing_key or None)

    def _size_file(self) -> Path:
        return Path(self.site.state_dir) / "train_size.json"

    def _size_key(self, cfg: ExperimentConfig) -> str:
        return hashlib.sha256((self.site.cohort + cfg.data.model_dump_json()).encode()).hexdigest()[:16]

    def _known_train_size(self, cfg: ExperimentConfig) -> int | None:
        try:
            return int(json.loads(self._size_file().read_text())[self._size_key(cfg)])
        except (OSError, KeyError, ValueError):
            return None

    def _remember_train_size(self, cfg: ExperimentConfig, n_train: int) -> None:
        path = self._size_file()
        try:
            sizes = json.loads(path.read_text())
        except (OSError, ValueError):
            sizes = {}
        sizes[self._size_key(cfg)] = n_train
        atomic_write(path, json.dumps(sizes))

    def _train_size(self, cfg: ExperimentConfig) -> tuple[int, _CohortCache | None]:
        """The training-set size for ``cfg``'s data: known from an earlier message (kept in
        the state directory, so a refusal or decline reads no patient file), else from the
        cohort, which is then loaded (and returned)."""
        n_train = self._known_train_size(cfg)
        if n_train is not None:
            return n_train, None
        cache = self.cohort(cfg)
        self._remember_train_size(cfg, cache.n_train)
        return cache.n_train, cache

    # ------------------------------------------------------------------ dispatch
    def handle(self, action: str, payload: Payload, state: Payload) -> Payload:
        """Answer one server message; ``state`` persists between messages of a run."""
        if action == "train":
            with self._accounting():
                return self.train(payload, state)
        if action == "evaluate":
            with self._accounting():
                return self.evaluate(payload)
        if action.startswith(ACTION_PREFIX):
            from fedrg.hospital.secure import client_stage

            return client_stage(action, payload, state, site=self.site)
        raise FedrgError(f"unknown action {action!r}")

    @contextlib.contextmanager
    def _accounting(self) -> Iterator[None]:
        """Around a message that computes epsilons: the RDP vectors this hospital signed
        earlier are used, and those it computes kept (:mod:`fedrg.privacy.rdp_store`)."""
        from fedrg.privacy.rdp_store import rdp_vectors_kept
        from fedrg.signing import load_private_key

        ledger = self._ledger()
        assert ledger.key_path is not None  # Ledger.open sets it
        with rdp_vectors_kept(self.site.state_dir, load_private_key(ledger.key_path)):
            yield

    def _declined(self, err: FedrgError, ledger: Ledger, reply: Payload | None = None, *,
                  rnd: int | None = None) -> Payload:
        """The typed reply for a refused or declined message (nothing spent, no data sent):
        training round ``rnd``, or an evaluation (``rnd`` None)."""
        what = f"refuses round {rnd}" if rnd is not None else "declines evaluation"
        log.warning("%s %s (nothing spent, no data sent): %s", self.site.name, what, err)
        reply = reply if reply is not None else Payload(meta={"site": self.site.name})
        reply.meta.update(declined_reply(err))
        if isinstance(err, BudgetExceededError):  # the lifetime epsilon the ledger records
            reply.meta["epsilon_lifetime"] = float(err.epsilon_spent)
        reply.meta["ledger_head"] = ledger.signed_head()
        return reply

    # ------------------------------------------------------------------ state checks
    def state_problem(self, ledger: Ledger, known: Any = None) -> str:
        """Why this hospital refuses to use its state directory (``''``: it does not).

        Without any server's help: the anchor beside the signing key must pin this ledger
        (:func:`fedrg.privacy.ledger.anchor_problem`), and the roster the hospital pins must
        list its signing key. With the head a server last saw (``known``): the ledger must
        extend it, unless it starts with an explicit re-initialisation. The message is local
        (it may name paths); the reply carries :data:`STATE_REFUSAL`.
        """
        problem = anchor_problem(ledger) or self._roster_problem(ledger)
        if problem:
            return problem
        if not isinstance(known, dict) or not known or int(known.get("entries", 0) or 0) == 0:
            return ""
        if ledger.extends(known):
            return ""
        if ledger.reinit_entry() is not None:
            log.warning("%s: the ledger does not extend the head the server last saw (%s "
                        "entries, key %s); it was re-initialised explicitly, so it trains",
                        self.site.name, known.get("entries"), known.get("key_id"))
            return ""
        return (f"this hospital's ledger ({len(ledger.read())} entries) does not extend the "
                f"last ledger head the server saw ({known.get('entries')} entries, key "
                f"{known.get('key_id')}): its state directory was wiped or entries were removed")

    def _roster_problem(self, ledger: Ledger) -> str:
        """The pinned roster must list this hospital with the key that signs its ledger."""
        if not self.site.roster:
            return ""
        from cryptography.hazmat.primitives import serialization

        from fedrg.secagg.roster import load_roster

        entry = load_roster(self.site.roster).entries.get(self.site.name)
        if entry is None:
            return ""  # not this check's business: secure aggregation refuses such a roster
        pinned = entry.signing_key.hex()
        mine = ledger.public_key.public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw).hex()
        if pinned != mine:
            return (f"the ledger is signed by key {mine[:16]}..., but the roster this hospital "
                    f"pins ({self.site.roster}) lists {pinned[:16]}... for {self.site.name}: the "
                    "state directory (and its key) was wiped or replaced")
        return ""

    def _state_refusal(self, ledger: Ledger, known: Any, what: str) -> Payload | None:
        problem = self.state_problem(ledger, known)
        if not problem:
            return None
        log.warning("%s refuses %s: %s", self.site.name, what, problem)
        return Payload(meta={"site": self.site.name, "status": "declined",
                             "reason": LEDGER_NOT_EXTENDING, "message": STATE_REFUSAL,
                             "ledger_head": ledger.signed_head()})

    # ------------------------------------------------------------------ train
    def _global_arrays(self, cfg: ExperimentConfig,
                       payload: Payload) -> tuple[RadiogenomicsModel, list[np.ndarray]]:
        """The model for ``cfg`` and the server's global adapter arrays, checked.

        Refuses (before any ledger entry) a wrong count of arrays, a wrong shape or dtype
        kind, and NaN/Inf values.
        """
        from fedrg.model.payload import get_adapter_arrays

        model = _model_for(cfg, self.model_factory)
        expected = get_adapter_arrays(model)
        try:
            got = [np.asarray(a) for a in payload.array_list("global")]
        except (KeyError, ValueError) as err:
            raise PolicyViolationError(setting="global adapter", requested="unreadable",
                                       allowed=f"{len(expected)} float arrays ({err})") from None
        if len(got) != len(expected):
            raise PolicyViolationError(setting="global adapter", requested=f"{len(got)} arrays",
                                       allowed=f"exactly {len(expected)} arrays for this model")
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            if g.shape != e.shape or g.dtype.kind != "f":
                raise PolicyViolationError(
                    setting=f"global adapter array {i}", requested=f"{g.dtype}{list(g.shape)}",
                    allowed=f"float{list(e.shape)}")
            if not np.isfinite(g).all():
                raise PolicyViolationError(setting=f"global adapter array {i}",
                                           requested="NaN/Inf values", allowed="finite values")
        return model, got

    def train(self, payload: Payload, state: Payload) -> Payload:
        """Answer a train request: first the evaluation it may fold in, then the training.

        A request with ``meta["evaluate_round"] = r`` (its round minus one: the arrays it
        carries are round ``r``'s result) gets, in ``reply.meta["evaluation"]``, exactly what
        :meth:`evaluate` answers for those arrays and round ``r``, under every limit of an
        ``evaluate`` message; the release (if any) is in the ledger before training is
        planned, so the plan sees its cost. A declined or refused evaluation does not stop
        the training, and a declined training still carries the evaluation answer. See
        :meth:`_train` for the training itself.

        Parameters
        ----------
        payload
            The server's train request (global adapter arrays, run config, round, run id).
        state
            What the hospital keeps between messages of the run (updated in place).

        Returns
        -------
        Payload
            The train reply, with ``meta["evaluation"]`` when an evaluation was asked for.
        """
        if EVALUATE_FIELD not in payload.meta:
            return self._train(payload, state)
        t0 = time.perf_counter()
        answer = self._folded_evaluation(payload)
        # (local log only; benchmarks/deployment_latency.py reads it from the worker's log)
        log.info("folded evaluation of round %.40r answered in %.3f s", payload.meta.get(EVALUATE_FIELD),
                 time.perf_counter() - t0)
        reply = self._train(Payload(meta={k: v for k, v in payload.meta.items() if k != EVALUATE_FIELD},
                                    arrays=payload.arrays), state)
        reply.meta[EVALUATION_FIELD] = answer
        return reply

    def _folded_evaluation(self, payload: Payload) -> dict[str, Any]:
        """The :meth:`evaluate` answer to the evaluation a train request asks for (its meta)."""
        from fedrg.hospital.protocol import check_evaluate_round

        rnd, why = check_evaluate_round(payload.meta)
        if rnd is None:
            return self._declined(DeclinedError("evaluation_request_invalid", why), self._ledger()).meta
        request = Payload(meta={"config": payload.meta.get("config"), "round": rnd,
                                "run_id": payload.meta.get("run_id")}, arrays=payload.arrays)
        if rnd == 0:  # the starting adapter: released only for a run this site trains in
            refused = self._would_refuse_training(payload)
            if refused is not None:
                return self._declined(DeclinedError("evaluation_not_in_run", (
                    "the starting adapter is evaluated only for a run this hospital trains in, "
                    f"and it declines round 1: {refused.public_message()}")), self._ledger()).meta
        try:
            return self.evaluate(request).meta
        except FedrgError as err:  # e.g. an unreadable config: the training part says so too
            return self._declined(DeclinedError("evaluation_failed", err.public_message()),
                                  self._ledger()).meta

    def _would_refuse_training(self, payload: Payload) -> FedrgError | None:
        """Why this train request would be refused or declined (None: it would be trained),
        from the same checks and plan as :meth:`_train`, with nothing spent or written."""
        peers = payload.meta.get("hospitals_in_round")
        return self.would_refuse(from_run_config(payload.meta["config"]),
                                 round_=int(payload.meta["round"]),
                                 hospitals_in_round=None if peers is None else int(peers),
                                 run_id=str(payload.meta["run_id"]))

    def would_refuse(self, request: ExperimentConfig, *, round_: int,
                     hospitals_in_round: int | None, run_id: str) -> FedrgError | None:
        """Why this hospital would refuse or decline to train ``request``'s round ``round_``
        (None: it would train), from the same checks and plan as a train message, with
        nothing spent or sent (the cohort is loaded once if its size is not known yet).

        Parameters
        ----------
        request : ExperimentConfig
            The server's request.
        round_ : int
            The round asked for.
        hospitals_in_round : int or None
            How many hospitals the round would have.
        run_id : str
            The run (a new id: nothing of it spent yet).

        Returns
        -------
        FedrgError or None
            The refusal (:class:`PolicyViolationError`), budget decline or other decline.
        """
        try:
            cfg = check_request(request, self.site.policy, round_=round_,
                                hospitals_in_round=hospitals_in_round)
            n_train, _ = self._train_size(cfg)
            with self._accounting():
                plan_training(cfg, self.site.policy, n_train=n_train,
                              spent=Spent.from_ledger(self._ledger().read(), run_id),
                              run_id=run_id, round_=round_, state_dir=self.site.state_dir)
        except (PolicyViolationError, BudgetExceededError, DeclinedError) as err:
            return err
        return None

    def train_size(self, request: ExperimentConfig) -> int:
        """Training patients for ``request``'s data under this site's split (its policy)."""
        return self._train_size(with_site_split(request, self.site.policy))[0]

    def _train(self, payload: Payload, state: Payload) -> Payload:
        """Train one round locally and prepare the update.

        The server's config is a request: it is checked against the site's policy before any
        patient file is read, and every privacy value used comes from the one
        :class:`~fedrg.hospital.plan.RoundPlan` the hospital makes for this message. A request
        outside the policy gets a typed refusal (``status: declined``, ``reason:
        policy_violation``), one past the run's cap or the budget a decline.
        """
        from fedrg.model.payload import get_adapter_arrays, set_adapter_arrays
        from fedrg.train.loop import train_local

        policy = self.site.policy
        rnd = int(payload.meta["round"])
        run_id = str(payload.meta["run_id"])
        reply = Payload(meta={"site": self.site.name, "status": "ok"})
        ledger = self._ledger()
        refusal = self._state_refusal(ledger, payload.meta.get("ledger_head"), f"round {rnd}")
        if refusal is not None:
            return refusal
        try:
            # no data needed: the request against the policy, the secure sum, the arrays;
            # the plan needs only the training-set size (known after the first round)
            peers = payload.meta.get("hospitals_in_round")
            cfg = check_request(from_run_config(payload.meta["config"]), policy, round_=rnd,
                                hospitals_in_round=None if peers is None else int(peers))
            setup = self._secure_setup_request(cfg, payload, state)
            model, global_arrays = self._global_arrays(cfg, payload)
            n_train, cache = self._train_size(cfg)
            plan = plan_training(cfg, policy, n_train=n_train,
                                 spent=Spent.from_ledger(ledger.read(), run_id), run_id=run_id,
                                 round_=rnd, state_dir=self.site.state_dir)
        except (PolicyViolationError, BudgetExceededError, DeclinedError) as err:
            return self._declined(err, ledger, reply, rnd=rnd)
        if cache is None:
            cache = self.cohort(cfg)
            if cache.n_train != n_train:  # the cohort changed: plan again
                self._remember_train_size(cfg, cache.n_train)
                return self._train(payload, state)
        self._log_plan(plan)
        set_adapter_arrays(model, global_arrays)
        # from the shared seeds, round and site (not the run id), so a resumed run repeats the
        # interrupted one; DP noise never comes from here (OS entropy, see privacy/dpsgd.py)
        seed = _round_seed(cfg.training.seed, cfg.federation.seed, rnd, self.site.name)
        torch.manual_seed(seed)
        session = _dp_session(plan, cfg, key=f"{self.site.name}/round-{rnd}") if plan.private else None
        distributed = plan.noise_mode == "distributed"
        with torch_threads(cfg.training.threads):  # restored afterwards: the host process keeps its own
            train_local(model, cache.data.train, cfg.training, steps=plan.steps, privacy=session,
                        seed=seed, frozen=cfg.privacy.frozen_under_dp if session else (),
                        gradient_step=distributed)
        if session is not None and session.history != plan.lifetime_history.extended(
                noise_multiplier=plan.noise_multiplier_added, sample_rate=plan.sample_rate,
                steps=plan.steps):
            raise PrivacyError(f"{self.site.name} round {rnd}: the accountant's history "
                               f"{session.history} is not the plan's ({plan.steps} steps at sigma "
                               f"{plan.noise_multiplier_added:.4f}); nothing was recorded or sent")
        new_arrays = get_adapter_arrays(model)
        update = [(n - g).astype(np.float32) for n, g in zip(new_arrays, global_arrays, strict=True)]
        # the signed entry is on disk before the update can leave the hospital; a
        # non-private round is recorded too (accountant 'none', sigma 0, DP epsilon unchanged)
        ledger.append(**plan.ledger_fields(), config_hash=cfg.config_hash(),
                      dataset_fingerprint=cache.fingerprint, policy_hash=policy.policy_hash(),
                      details=plan.ledger_details())
        reply.meta.update(plan.reply_meta())
        # distributed noise: every hospital's noisy gradient step counts once in the sum (its
        # noise share was sized for an unweighted sum); local noise: FedAvg by cohort size
        weight = 1.0 if distributed else float(n_train)
        if cfg.privacy.hospital_level:
            # hospital-level DP: clip the whole update; equal weights (sensitivity C per hospital)
            from fedrg.privacy.hospital_dp import clip_update, privatize_update

            weight = 1.0
            if cfg.secagg.enabled:  # the server sees only the sum: each hospital adds a noise share
                update = privatize_update(update, hospital_noise_multiplier=cfg.privacy.hospital_noise_multiplier,
                                          hospital_clip=cfg.privacy.hospital_clip,
                                          # the site's own guarantee, never the server's
                                          # federation.min_hospitals: its policy refuses any
                                          # secure sum with fewer hospitals
                                          min_contributors=policy.min_secure_sum_size)
            else:  # the server adds the noise to the mean
                update, _ = clip_update(update, hospital_clip=cfg.privacy.hospital_clip)
        # no raw per-hospital training loss leaves (a statistic of the training patients that
        # no accountant covers): train_local's metrics stay on site
        reply.meta["ledger_head"] = ledger.signed_head()
        if cfg.secagg.enabled:
            state.arrays = {}
            state.put_array_list("pending", update)
            state.meta["pending_weight"] = weight
            state.meta["pending_round"] = rnd
            if setup is not None:
                self._secure_answer(setup, reply, state)
        else:
            reply.put_array_list("update", update)
            reply.meta["weight"] = weight
        return reply

    def _log_plan(self, plan: RoundPlan) -> None:
        name, rnd = self.site.name, plan.round
        if not plan.private:
            log.warning("%s round %d: training WITHOUT DP-SGD (policy.require_dp = false); "
                        "recorded in the ledger as a non-private round", name, rnd)
            return
        if plan.replanned:
            log.warning("%s round %d: this run already spent epsilon %.3f of its cap %.3f; "
                        "sigma re-planned to %.4f for the rounds left", name, rnd,
                        plan.epsilon_run_before, plan.epsilon_run_cap, plan.noise_multiplier)
        if plan.budget_limited:
            log.warning("%s round %d: the lifetime budget left (%.3f of %.3f spent) cannot hold "
                        "this run at its cap: sigma raised to %.4f so that it does", name, rnd,
                        plan.epsilon_lifetime_before, plan.budget, plan.noise_multiplier)
        log.info("%s round %d: sigma %.4f, q %.4f, %d steps, delta %.2g (%s); eps %.3f -> %.3f "
                 "of budget %.3f", name, rnd, plan.noise_multiplier, plan.sample_rate, plan.steps,
                 plan.target_delta, plan.accountant, plan.epsilon_lifetime_before,
                 plan.epsilon_lifetime_after, plan.budget)

    def _secure_setup_request(self, cfg: ExperimentConfig, payload: Payload,
                              state: Payload) -> tuple[str, dict[str, Any]] | None:
        """The secure sum's request sent with this train message, checked up front.

        Either a fresh set-up (stage 1, :data:`~fedrg.federated.secure.SETUP_FIELD`) or, for
        a round set up during the previous one, the shares routed to this hospital
        (:data:`~fedrg.federated.secure.MASKED_FIELD`). The site's policy on the secure sum
        (peers, threshold), its roster, replays and the pending pipelined session are
        checked before any patient file is read, so a sum it would refuse costs no budget.

        Returns
        -------
        tuple or None
            ``(field, request)``; None without secure aggregation.

        Raises
        ------
        PolicyViolationError
            When the secure sum has too few peers or too low a threshold for the policy.
        SecAggError
            When the request is malformed, carries both kinds, reuses a round id this
            hospital has answered, or names a pipelined round it has not set up.
        FedrgError
            When the hospital has no usable roster.
        """
        from fedrg.hospital.secure import (
            check_masked_in_train,
            check_setup_policy,
            check_setup_replay,
            client_trust,
        )
        from fedrg.secagg.wire import MASKED_FIELD, SETUP_FIELD

        if not cfg.secagg.enabled:
            return None
        setup, masked = payload.meta.get(SETUP_FIELD), payload.meta.get(MASKED_FIELD)
        if setup is not None and masked is not None:
            raise SecAggError("the train request carries both a fresh and a pipelined secure "
                              "sum; refusing before training")
        if masked is not None:
            return MASKED_FIELD, check_masked_in_train(masked, state, site=self.site)
        if setup is None:
            return None
        if not isinstance(setup, dict):
            raise SecAggError("the secure-aggregation setup in the train request is not a mapping")
        check_setup_policy(setup, self.site.policy)
        check_setup_replay(setup, state)  # a replayed round id must not cost budget either
        client_trust(self.site)  # a roster listing this hospital under its own key
        return SETUP_FIELD, setup

    def _secure_answer(self, request: tuple[str, dict[str, Any]], reply: Payload,
                       state: Payload) -> None:
        from fedrg.hospital.secure import answer_masked_in_train, answer_setup_in_train
        from fedrg.secagg.wire import SETUP_FIELD

        field, body = request
        answer = answer_setup_in_train if field == SETUP_FIELD else answer_masked_in_train
        answer(body, reply, state, site=self.site)

    # ------------------------------------------------------------------ evaluate
    #: Tests only: seed of the release noise (None: OS entropy). Never set from a config or
    #: a message: whoever knows the seed can subtract the noise.
    _release_seed: int | None = None

    def evaluate(self, payload: Payload) -> Payload:
        """Release this hospital's validation metrics of the global adapter, as its policy allows.

        Metrics leave only as aggregates planned by :func:`fedrg.hospital.plan.plan_release`:
        noisy (a Gaussian mechanism, :mod:`fedrg.privacy.release`) and charged to the ledger
        before they leave, checked against the run's cap and the lifetime budget; or exact
        where the policy opts out (recorded as non-private). At most once per trained round
        of this run, never twice for the same global model, at most
        ``policy.evaluation.max_releases_per_run`` times, on the site's own split, and not at
        all with ``release = 'none'``. Every limit is checked before any patient file is read.
        """
        from fedrg.hospital.evaluation import release_aggregates
        from fedrg.model.payload import set_adapter_arrays
        from fedrg.privacy.release import BINS, EXACT_BINS, noisy_release

        policy = self.site.policy
        ledger = self._ledger()
        refusal = self._state_refusal(ledger, None, "an evaluation")
        if refusal is not None:
            return refusal
        rnd = int(payload.meta.get("round", 0))
        run_id = str(payload.meta.get("run_id", ""))
        try:
            cfg = with_site_split(from_run_config(payload.meta["config"]), policy)
            check_sizes(cfg)
            check_base_model(cfg.model.base, policy)
            if policy.evaluation.release == "none":
                raise DeclinedError("evaluation_not_released", "this hospital's policy releases "
                                    "no evaluation metrics (evaluation.release = 'none')")
            model, global_arrays = self._global_arrays(cfg, payload)
            model_hash = hashlib.sha256(b"".join(
                np.ascontiguousarray(a).tobytes() for a in global_arrays)).hexdigest()
            entries = ledger.read()
            released = _check_release_limits(entries, policy, run_id=run_id, round_=rnd,
                                              model_hash=model_hash)
            n_train, cache = self._train_size(cfg)
            plan = plan_release(cfg, policy, n_train=n_train,
                                spent=Spent.from_ledger(entries, run_id), run_id=run_id, round_=rnd)
        except (PolicyViolationError, BudgetExceededError, DeclinedError) as err:
            return self._declined(err, ledger)
        cache = cache if cache is not None else self.cohort(cfg)
        set_adapter_arrays(model, global_arrays)
        exact = release_aggregates(model, cache.data.val, bins=BINS if plan.private else EXACT_BINS)
        details: dict[str, Any] = {"model_hash": model_hash, "release": released + 1}
        if plan.private:
            details["epsilon_per_release"] = policy.evaluation.epsilon_per_release
        else:
            details["exact"] = True
        # the signed entry is on disk before the release can leave the hospital
        ledger.append(**plan.ledger_fields(), config_hash=cfg.config_hash(),
                      dataset_fingerprint=cache.fingerprint, policy_hash=policy.policy_hash(),
                      details=details)
        noisy = noisy_release(exact, noise_multiplier=plan.noise_multiplier,
                              n_markers=len(cfg.data.markers),
                              seed=self._release_seed if plan.private else None)
        return Payload(meta={
            "site": self.site.name, "status": "ok", "release": noisy,
            "markers": list(cfg.data.markers), "noise_multiplier": plan.noise_multiplier,
            **plan.reply_meta(), "ledger_head": ledger.signed_head()})


#: What a reply says when the state directory is refused (the local log says why, with paths).
STATE_REFUSAL = ("this hospital's state directory does not hold the privacy ledger it anchored "
                 "(state wiped or replaced, or its ledger does not extend the head this server "
                 "saw), which would silently reset its lifetime privacy budget; it trains and "
                 "releases again only after its operator restores the state or re-initialises "
                 "it explicitly with `fedrg site reinit --state-dir DIR --reason TEXT "
                 "--previous-head ledger_heads.json` (recorded in the ledger)")


def _check_release_limits(entries: list[LedgerEntry], policy: SitePolicy, *, run_id: str, round_: int,
                          model_hash: str) -> int:
    """The release limits that need no data; returns how many releases this run made.

    Raises
    ------
    DeclinedError
        ``evaluation_repeated`` (a second noisy release of one model would let its noise be
        averaged away), ``evaluation_not_after_training``, ``evaluation_release_cap``.
    """
    ev = policy.evaluation
    trained = {e.round for e in entries if e.kind == "train" and e.run_id == run_id}
    released = [e for e in entries if e.kind == "evaluation" and e.run_id == run_id]
    seen_models = {e.details.get("model_hash") for e in entries if e.kind == "evaluation"}
    if model_hash in seen_models and ev.release == "dp":
        # (an exact release of the same model again reveals nothing new)
        raise DeclinedError("evaluation_repeated", "metrics of this global model were already "
                            "released once")
    if (round_ != 0 and round_ not in trained) or any(e.round == round_ for e in released):
        raise DeclinedError("evaluation_not_after_training", (
            f"at most one release of the starting adapter (round 0) and one per round this "
            f"hospital trained in this run (trained rounds {sorted(trained)}, round {round_} "
            "asked)"))
    if len(released) >= ev.max_releases_per_run:
        raise DeclinedError("evaluation_release_cap", (
            f"policy.evaluation.max_releases_per_run={ev.max_releases_per_run} releases already "
            "made in this run"))
    return len(released)


def _dp_session(plan: RoundPlan, cfg: ExperimentConfig, *, key: str) -> DPSession:
    """The DP-SGD session of a private training plan: every privacy number from the plan.

    Its noise comes from OS entropy; only a test that selected keyed seeded noise in this
    process (:func:`fedrg.privacy.dpsgd.seed_noise_by_key_for_tests`) gets the seed of
    ``key`` (site and round) instead."""
    from fedrg.privacy.dpsgd import DPSession, keyed_test_noise_seed

    return DPSession.for_plan(plan, privacy_cfg=cfg.privacy, training_cfg=cfg.training,
                              seed=keyed_test_noise_seed(key))
