"""A hospital's side of the federation, independent of Flower.

``HospitalSite.handle(action, payload, state)`` answers one server message:

* ``train``: check the server's request against the site's own policy
  (:mod:`fedrg.privacy.enforce`; refuse before touching data if it is outside it), plan the
  round against the privacy budget (decline before touching data if it would pass it),
  train with DP-SGD, append the signed ledger entry, compute the update (delta from the
  global adapter). With secure aggregation the update stays in ``state``
  until the masked upload; without, it is returned with its weight. A train request may
  also ask for the evaluation of the global adapter it carries (the previous round's result,
  ``meta["evaluate_round"]``): answered first, exactly as an ``evaluate`` message, in
  ``reply.meta["evaluation"]`` (:mod:`fedrg.federated.evaluation_fold`).
* ``secagg_*``: the five secure-aggregation stages (:class:`~fedrg.secagg.stages.SecAggStage`;
  the update only leaves masked).
* ``evaluate``: a DP release of validation aggregates of the global adapter (noisy, charged
  to the ledger, as the site's policy allows; see :mod:`fedrg.privacy.release`).

Every reply carries the hospital's signed ledger head; a hospital whose ledger does not
extend the head the server last saw refuses to train until re-initialised explicitly.

Nothing in a reply names a patient, a path or a sample value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrg.config import ExperimentConfig, SiteConfig, from_run_config
from fedrg.errors import BudgetExceededError, FedrgError, PolicyViolationError, PrivacyError, SecAggError
from fedrg.files import atomic_write
from fedrg.hospital.protocol import LEDGER_NOT_EXTENDING
from fedrg.payload import Payload
from fedrg.runtime import torch_threads
from fedrg.secagg.stages import ACTION_PREFIX

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
    data: Any  # fedrg.data.loader.SiteData
    fingerprint: str

    @property
    def n_train(self) -> int:
        return len(self.data.train)


_MODELS: dict[str, Any] = {}


def _model_for(cfg: ExperimentConfig, factory: Any = None) -> Any:
    """One model per (factory, model, data) config per process; adapter arrays are set per message."""
    from fedrg.model.factory import DEFAULT_MODEL_FACTORY

    factory = DEFAULT_MODEL_FACTORY if factory is None else factory
    key = json.dumps([f"{type(factory).__qualname__}@{id(factory)}", cfg.model.model_dump(mode="json"),
                      cfg.data.model_dump(mode="json"), cfg.federation.seed], sort_keys=True)
    if key not in _MODELS:
        _MODELS.clear()  # keep one model per worker process
        _MODELS[key] = factory.build(cfg.model, cfg.data, cfg.federation.seed)
    return _MODELS[key]


def _round_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") % 2**63


class HospitalSite:
    """One hospital: its cohort, ledger and state directory (all stay on site)."""

    def __init__(self, site: SiteConfig, *, model_factory: Any = None, cohort_loader: Any = None) -> None:
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
        """Load the site's data once per data config (the loader validates and splits)."""
        key = cfg.data.model_dump_json()
        if self._cohort is None or self._cohort.key != key:
            data = self.cohort_loader.load(self.site, cfg.data)
            self._cohort = _CohortCache(key, data, str(data.fingerprint))
        return self._cohort

    def _ledger(self) -> Any:
        from fedrg.privacy.ledger import Ledger

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

    # ------------------------------------------------------------------ dispatch
    def handle(self, action: str, payload: Payload, state: Payload) -> Payload:
        """Answer one server message; ``state`` persists between messages of a run."""
        if action == "train":
            return self.train(payload, state)
        if action == "evaluate":
            return self.evaluate(payload)
        if action.startswith(ACTION_PREFIX):
            from fedrg.hospital.secure import client_stage

            return client_stage(action, payload, state, site=self.site)
        raise FedrgError(f"unknown action {action!r}")

    # ------------------------------------------------------------------ train
    def _global_arrays(self, cfg: ExperimentConfig, payload: Payload) -> tuple[Any, list[np.ndarray]]:
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

    def _refuse(self, reply: Payload, rnd: int, err: PolicyViolationError, ledger: Any) -> Payload:
        from fedrg.privacy.enforce import refusal_reply

        log.warning("%s refuses round %d (nothing spent, no data sent): %s", self.site.name, rnd, err)
        reply.meta.update(refusal_reply(err))
        reply.meta["ledger_head"] = ledger.signed_head()
        return reply

    def _releases_per_run(self, cfg: ExperimentConfig) -> int:
        """How many evaluation releases this run may make at this hospital (its policy's cap)."""
        ev = self.site.policy.evaluation
        if ev.release != "dp" or cfg.federation.fraction_evaluate <= 0:
            return 0
        return min(cfg.federation.rounds, ev.max_releases_per_run)

    def _release_sigma(self, target_delta: float) -> float | None:
        """Noise multiplier of one evaluation release (None: such releases are declined)."""
        from fedrg.privacy.accounting import calibrate_noise_multiplier

        policy = self.site.policy
        if policy.evaluation.release != "dp":
            return None
        try:
            return calibrate_noise_multiplier(
                target_epsilon=policy.evaluation.epsilon_per_release, target_delta=target_delta,
                sample_rate=1.0, steps=1, accountant=policy.accountant)
        except PrivacyError:  # unreachable epsilon: such releases are declined (see evaluate)
            return None

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
        from fedrg.federated.evaluation_fold import EVALUATE_FIELD, EVALUATION_FIELD

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
            return self._decline_eval("evaluation_request_invalid", why, self._ledger()).meta
        request = Payload(meta={"config": payload.meta.get("config"), "round": rnd,
                                "run_id": payload.meta.get("run_id")}, arrays=payload.arrays)
        try:
            return self.evaluate(request).meta
        except FedrgError as err:  # e.g. an unreadable config: the training part says so too
            return self._decline_eval("evaluation_failed", err.public_message(), self._ledger()).meta

    def _train(self, payload: Payload, state: Payload) -> Payload:
        """Train one round locally and prepare the update.

        The server's config is a request: it is checked against the site's policy
        (:mod:`fedrg.privacy.enforce`) before any patient file is read, and every privacy
        value used comes from the policy or from the hospital's own plan. A request outside
        the policy gets a typed refusal (``status: declined``, ``reason: policy_violation``).
        """
        from fedrg.model.payload import get_adapter_arrays, set_adapter_arrays
        from fedrg.privacy.accounting import PrivacyHistory, epsilon_of
        from fedrg.privacy.budget import decline_reply, plan_round
        from fedrg.privacy.enforce import check_request, plan_under_policy
        from fedrg.privacy.ledger import NON_PRIVATE
        from fedrg.train.loop import train_local

        policy = self.site.policy
        rnd = int(payload.meta["round"])
        run_id = str(payload.meta["run_id"])
        reply = Payload(meta={"site": self.site.name, "status": "ok"})
        session = None
        # A server that saw this hospital's ledger before sends its last signed head back: a
        # ledger that does not extend it (state wiped, entries removed) trains only after an
        # explicit `fedrg site reinit`, which is recorded. Checked before any patient file.
        ledger = self._ledger()
        refusal = self.check_known_head(ledger, payload.meta.get("ledger_head"))
        if refusal:
            log.warning("%s refuses round %d: %s", self.site.name, rnd, refusal)
            reply.meta.update(status="declined", reason=LEDGER_NOT_EXTENDING, message=refusal,
                              ledger_head=ledger.signed_head())
            return reply
        try:
            # 1. no data needed: the request against the policy, then the server's arrays
            peers = payload.meta.get("hospitals_in_round")
            cfg = check_request(from_run_config(payload.meta["config"]), policy, round_=rnd,
                                hospitals_in_round=None if peers is None else int(peers))
            setup = self._secure_setup_request(cfg, payload, state)
            model, global_arrays = self._global_arrays(cfg, payload)
            # 2. the plan needs only the training-set size: known from an earlier round (kept
            # in the state directory), so a refusal or decline reads no patient file. Only the
            # very first round on a dataset loads the cohort first.
            n_train = self._known_train_size(cfg)
            cache = None
            if n_train is None:
                cache = self.cohort(cfg)
                n_train = cache.n_train
                self._remember_train_size(cfg, n_train)
            entries = ledger.read()
            run_segments = [e.segment for e in entries if e.run_id == run_id and e.private and e.steps > 0]
            releases_done = sum(1 for e in entries if e.run_id == run_id and e.kind == "evaluation")
            plan = plan_under_policy(cfg, policy, n_train=n_train, round_=rnd,
                                     run_history=run_segments,
                                     release_noise_multiplier=self._release_sigma(policy.delta_for(n_train)),
                                     releases_per_run=self._releases_per_run(cfg),
                                     releases_done=releases_done,
                                     state_dir=self.site.state_dir)
        except PolicyViolationError as err:
            return self._refuse(reply, rnd, err, ledger)
        past = [e.segment for e in entries if e.private and e.steps > 0]
        if plan.replanned:
            log.warning("%s round %d: this run already spent epsilon %.3f of its cap %.3f; "
                        "sigma re-planned to %.4f for the %d round(s) left", self.site.name, rnd,
                        plan.epsilon_run_spent, plan.epsilon_run_cap, plan.noise_multiplier,
                        cfg.federation.rounds - rnd + 1)
        if plan.private:
            try:
                round_plan = plan_round(past, noise_multiplier=plan.noise_multiplier,
                                        sample_rate=plan.sample_rate, steps=plan.steps,
                                        target_delta=plan.target_delta,
                                        budget=policy.epsilon_budget, accountant=plan.accountant)
            except BudgetExceededError as err:
                log.warning("%s declines round %d: %s", self.site.name, rnd, err)
                reply.meta.update(decline_reply(err))
                reply.meta["epsilon"] = self._run_epsilon(entries, run_id, plan.target_delta,
                                                          plan.accountant)
                reply.meta["epsilon_lifetime"] = float(err.epsilon_spent)
                reply.meta["ledger_head"] = ledger.signed_head()
                return reply
        if cache is None:
            cache = self.cohort(cfg)
            if cache.n_train != n_train:  # the cohort changed: plan again
                self._remember_train_size(cfg, cache.n_train)
                return self.train(payload, state)
        if plan.private:
            from fedrg.privacy.dpsgd import DPSession

            session = DPSession.from_config(
                cfg.privacy.model_copy(update={"target_delta": plan.target_delta}), cfg.training,
                n_records=n_train,
                noise_multiplier=plan.noise_multiplier,
                history=PrivacyHistory([tuple(s) for s in past]))
            log.info("%s round %d: sigma %.4f, q %.4f, %d steps, delta %.2g (%s); eps %.3f -> "
                     "%.3f of budget %.3f", self.site.name, rnd, plan.noise_multiplier,
                     plan.sample_rate, plan.steps, plan.target_delta, plan.accountant,
                     round_plan.epsilon_spent, round_plan.epsilon_after, policy.epsilon_budget)
        else:
            log.warning("%s round %d: training WITHOUT DP-SGD (policy.require_dp = false); "
                        "recorded in the ledger as a non-private round", self.site.name, rnd)
        set_adapter_arrays(model, global_arrays)
        # from the shared seeds, round and site (not the run id), so a resumed run repeats the
        # interrupted one; DP noise never comes from here (OS entropy, see privacy/dpsgd.py)
        seed = _round_seed(cfg.training.seed, cfg.federation.seed, rnd, self.site.name)
        torch.manual_seed(seed)
        with torch_threads(cfg.training.threads):  # restored afterwards: the host process keeps its own
            train_local(model, cache.data.train, cfg.training, steps=plan.steps, privacy=session,
                        seed=seed, frozen=cfg.privacy.frozen_under_dp if session else ())
        new_arrays = get_adapter_arrays(model)
        update = [(n - g).astype(np.float32) for n, g in zip(new_arrays, global_arrays, strict=True)]
        # the signed entry is on disk before the update can leave the hospital; a
        # non-private round is recorded too (accountant 'none', sigma 0, DP epsilon unchanged)
        if session is not None:
            eps_lifetime = epsilon_of(session.history, target_delta=plan.target_delta,
                                      accountant=plan.accountant)
        else:
            eps_lifetime = epsilon_of(PrivacyHistory([tuple(s) for s in past]),
                                      target_delta=plan.target_delta,
                                      accountant=plan.accountant) if past else 0.0
        ledger.append(run_id=run_id, round=rnd,
                      noise_multiplier=plan.noise_multiplier if plan.private else 0.0,
                      sample_rate=plan.sample_rate, steps=plan.steps,
                      max_grad_norm=plan.max_grad_norm,
                      accountant=plan.accountant if plan.private else NON_PRIVATE,
                      target_delta=plan.target_delta, epsilon=eps_lifetime,
                      budget=policy.epsilon_budget, config_hash=cfg.config_hash(),
                      dataset_fingerprint=cache.fingerprint, policy_hash=policy.policy_hash())
        reply.meta["epsilon"] = self._run_epsilon(ledger.read(), run_id, plan.target_delta,
                                                  plan.accountant)
        reply.meta["epsilon_lifetime"] = eps_lifetime
        reply.meta["private"] = plan.private
        weight = float(n_train)
        if cfg.privacy.hospital_level:
            # hospital-level DP: clip the whole update; equal weights (sensitivity C per hospital)
            from fedrg.privacy.hospital_dp import clip_update, privatize_update

            weight = 1.0
            if cfg.secagg.enabled:  # the server sees only the sum: each hospital adds a noise share
                update = privatize_update(update, hospital_noise_multiplier=cfg.privacy.hospital_noise_multiplier,
                                          hospital_clip=cfg.privacy.hospital_clip,
                                          # the site's own guarantee, never the
                                          # server's federation.min_hospitals: its policy
                                          # refuses any secure sum with fewer hospitals
                                          min_contributors=policy.min_secagg_peers + 1)
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

    def check_known_head(self, ledger: Any, known: Any) -> str:
        """Why this hospital refuses to train on its ledger given the head a server last saw
        (``''``: it does not refuse).

        The ledger must extend ``known`` (hold the entry it points to), unless ``known`` has
        no entries or the ledger starts with an explicit re-initialisation entry.
        """
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
                f"{known.get('key_id')}): its state directory was wiped or entries were "
                "removed, which would silently reset its lifetime privacy budget. Restore the "
                "state directory, or re-initialise it explicitly with `fedrg site reinit "
                "--state-dir DIR --reason TEXT --previous-head ledger_heads.json` (recorded "
                "in the ledger and shown by `fedrg audit`)")

    @staticmethod
    def _run_epsilon(entries: list[Any], run_id: str, target_delta: float, accountant: str) -> float:
        """Epsilon of this run's DP segments alone (the per-run cap applies to this)."""
        from fedrg.privacy.accounting import PrivacyHistory, epsilon_of

        segs = [e.segment for e in entries if e.run_id == run_id and e.steps > 0 and e.private]
        if not segs:
            return 0.0
        return epsilon_of(PrivacyHistory([tuple(s) for s in segs]),
                          target_delta=target_delta, accountant=accountant)

    # ------------------------------------------------------------------ evaluate
    #: Tests only: seed of the release noise (None: OS entropy). Never set from a config or
    #: a message: whoever knows the seed can subtract the noise.
    _release_seed: int | None = None

    def _releases_file(self) -> Path:
        return Path(self.site.state_dir) / "evaluation_releases.json"

    def _releases(self) -> dict[str, Any]:
        try:
            obj = json.loads(self._releases_file().read_text())
        except (OSError, ValueError):
            return {}
        return obj if isinstance(obj, dict) else {}

    def _decline_eval(self, reason: str, message: str, ledger: Any) -> Payload:
        log.warning("%s declines evaluation: %s", self.site.name, message)
        return Payload(meta={"site": self.site.name, "status": "declined", "reason": reason,
                             "message": message, "ledger_head": ledger.signed_head()})

    def evaluate(self, payload: Payload) -> Payload:
        """Release this hospital's validation metrics of the global adapter, as its policy allows.

        Metrics leave only as noisy aggregates (a Gaussian mechanism, see
        :mod:`fedrg.privacy.release`) whose cost is appended to the ledger before they
        leave; at most once per trained round of this run, never twice for the same global
        model, at most ``policy.evaluation.max_releases_per_run`` times, on the site's own
        split, and not at all with ``release = 'none'``. Every limit is checked before any
        patient file is read.
        """
        from fedrg.model.payload import set_adapter_arrays
        from fedrg.privacy.accounting import calibrate_noise_multiplier, epsilon_of
        from fedrg.privacy.budget import plan_round
        from fedrg.privacy.enforce import check_base_model, check_sizes
        from fedrg.privacy.release import noisy_release, sensitivity
        from fedrg.train.evaluate import release_aggregates

        cfg = from_run_config(payload.meta["config"])
        try:
            check_sizes(cfg)
            check_base_model(cfg.model.base, self.site.policy)
        except PolicyViolationError as err:
            return self._decline_eval("policy_violation", err.public_message(), self._ledger())
        rnd = int(payload.meta.get("round", 0))
        run_id = str(payload.meta.get("run_id", ""))
        policy = self.site.policy
        ev = policy.evaluation
        ledger = self._ledger()
        if ev.release == "none":
            return self._decline_eval("evaluation_not_released", "this hospital's policy "
                                      "releases no evaluation metrics (evaluation.release = "
                                      "'none')", ledger)
        try:  # the same checks as training: count, shapes, finite values
            model, global_arrays = self._global_arrays(cfg, payload)
        except PolicyViolationError as err:
            return self._decline_eval("policy_violation", err.public_message(), ledger)
        model_hash = hashlib.sha256(b"".join(
            np.ascontiguousarray(a).tobytes() for a in global_arrays)).hexdigest()
        entries = ledger.read()
        trained = {e.round for e in entries if e.kind == "train" and e.run_id == run_id}
        released = [e for e in entries if e.kind == "evaluation" and e.run_id == run_id]
        seen_models = {e.details.get("model_hash") for e in entries if e.kind == "evaluation"}
        if model_hash in seen_models and ev.release == "dp":
            # a second noisy release of one model would let its noise be averaged away
            # (an exact release of the same model again reveals nothing new)
            return self._decline_eval("evaluation_repeated", "metrics of this global model "
                                      "were already released once", ledger)
        if rnd not in trained or any(e.round == rnd for e in released):
            return self._decline_eval(
                "evaluation_not_after_training", f"at most one release per round this "
                f"hospital trained in this run (trained rounds {sorted(trained)}, round {rnd} "
                "asked)", ledger)
        if len(released) >= ev.max_releases_per_run:
            return self._decline_eval(
                "evaluation_release_cap", f"policy.evaluation.max_releases_per_run="
                f"{ev.max_releases_per_run} releases already made in this run", ledger)
        n_known = self._known_train_size(cfg)  # set by the round this hospital trained in
        delta = policy.delta_for(n_known) if n_known else (entries[-1].delta if entries
                                                           else policy.delta_for(1))
        k = len(cfg.data.markers)
        if ev.release == "exact":
            return self._exact_release(cfg, rnd=rnd, run_id=run_id, model=model,
                                       global_arrays=global_arrays, model_hash=model_hash,
                                       n_released=len(released), delta=delta, ledger=ledger)
        try:
            sigma = calibrate_noise_multiplier(target_epsilon=ev.epsilon_per_release,
                                               target_delta=delta, sample_rate=1.0, steps=1,
                                               accountant=policy.accountant)
        except PrivacyError as err:
            return self._decline_eval(
                "evaluation_epsilon_unreachable", f"policy.evaluation.epsilon_per_release="
                f"{ev.epsilon_per_release} cannot be met by one Gaussian release at delta "
                f"{delta:g} with the {policy.accountant} accountant ({err}); raise it in the "
                "hospital's [policy.evaluation]", ledger)
        try:
            round_plan = plan_round(ledger.history(), noise_multiplier=sigma, sample_rate=1.0,
                                    steps=1, target_delta=delta, budget=policy.epsilon_budget,
                                    accountant=policy.accountant)
        except BudgetExceededError as err:
            return self._decline_eval("privacy_budget_exhausted", err.public_message(), ledger)
        cache = self.cohort(cfg)
        set_adapter_arrays(model, global_arrays)
        exact = release_aggregates(model, cache.data.val)
        # the signed entry is on disk before the release can leave the hospital
        ledger.append(run_id=run_id, round=rnd, noise_multiplier=sigma, sample_rate=1.0, steps=1,
                      max_grad_norm=sensitivity(k), accountant=policy.accountant,
                      target_delta=delta, epsilon=round_plan.epsilon_after,
                      budget=policy.epsilon_budget, config_hash=cfg.config_hash(),
                      dataset_fingerprint=cache.fingerprint, policy_hash=policy.policy_hash(),
                      kind="evaluation",
                      details={"model_hash": model_hash, "release": len(released) + 1,
                               "epsilon_per_release": ev.epsilon_per_release})
        noisy = noisy_release(exact, noise_multiplier=sigma, n_markers=k, seed=self._release_seed)
        run_segs = [e.segment for e in ledger.read()
                    if e.run_id == run_id and e.steps > 0 and e.private]
        return Payload(meta={
            "site": self.site.name, "status": "ok", "release": noisy,
            "markers": list(cfg.data.markers), "noise_multiplier": sigma,
            "epsilon": epsilon_of(run_segs, target_delta=delta, accountant=policy.accountant),
            "epsilon_lifetime": round_plan.epsilon_after, "ledger_head": ledger.signed_head()})

    def _exact_release(self, cfg: ExperimentConfig, *, rnd: int, run_id: str, model: Any,
                       global_arrays: list[np.ndarray], model_hash: str, n_released: int,
                       delta: float, ledger: Any) -> Payload:
        """``evaluation.release = 'exact'``: the site's explicit opt-out of DP for its metrics.

        Same limits as a DP release (once per trained round, never twice for one model, the
        policy's cap), the same aggregates without noise, and still a signed ledger entry,
        recorded as non-private (accountant ``'none'``): no DP guarantee covers these metrics
        and ``fedrg audit`` says so. Meant for synthetic or public cohorts (``fedrg simulate``).
        """
        from fedrg.model.payload import set_adapter_arrays
        from fedrg.privacy.ledger import NON_PRIVATE
        from fedrg.privacy.release import EXACT_BINS, noisy_release, sensitivity
        from fedrg.train.evaluate import release_aggregates

        policy = self.site.policy
        k = len(cfg.data.markers)
        cache = self.cohort(cfg)
        set_adapter_arrays(model, global_arrays)
        exact = release_aggregates(model, cache.data.val, bins=EXACT_BINS)
        eps_lifetime = ledger.epsilon_spent()
        ledger.append(run_id=run_id, round=rnd, noise_multiplier=0.0, sample_rate=1.0, steps=1,
                      max_grad_norm=sensitivity(k), accountant=NON_PRIVATE, target_delta=delta,
                      epsilon=eps_lifetime, budget=policy.epsilon_budget,
                      config_hash=cfg.config_hash(), dataset_fingerprint=cache.fingerprint,
                      policy_hash=policy.policy_hash(), kind="evaluation",
                      details={"model_hash": model_hash, "release": n_released + 1,
                               "exact": True})
        return Payload(meta={
            "site": self.site.name, "status": "ok",
            "release": noisy_release(exact, noise_multiplier=0.0, n_markers=k),
            "markers": list(cfg.data.markers), "noise_multiplier": 0.0,
            "epsilon": self._run_epsilon(ledger.read(), run_id, delta, policy.accountant),
            "epsilon_lifetime": eps_lifetime, "ledger_head": ledger.signed_head()})
