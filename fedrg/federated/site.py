"""A hospital's side of the federation, independent of Flower.

``HospitalSite.handle(action, payload, state)`` answers one server message:

* ``train``: check the server's request against the site's own policy
  (:mod:`fedrg.privacy.enforce`; refuse before touching data if it is outside it), plan the
  round against the privacy budget (decline before touching data if it would pass it),
  train with DP-SGD, append the signed ledger entry, compute the update (delta from the
  global adapter). With secure aggregation the update stays in ``state``
  until the masked upload; without, it is returned with its weight.
* ``secagg_*``: the five secure-aggregation stages (:class:`~fedrg.secagg.stages.SecAggStage`;
  the update only leaves masked).
* ``evaluate``: aggregate validation metrics of the global adapter.

Nothing in a reply names a patient, a path or a sample value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrg.config import ExperimentConfig, SiteConfig, from_run_config
from fedrg.errors import BudgetExceededError, FedrgError, PolicyViolationError
from fedrg.federated.payload import Payload
from fedrg.files import atomic_write
from fedrg.runtime import torch_threads
from fedrg.secagg.stages import ACTION_PREFIX

log = logging.getLogger("fedrg.site")

_SITES: dict[str, HospitalSite] = {}


def get_site(site: SiteConfig) -> HospitalSite:
    """The process-wide :class:`HospitalSite` for ``site`` (caches cohort and model)."""
    key = site.model_dump_json()
    if key not in _SITES:
        _SITES[key] = HospitalSite(site)
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
            from fedrg.federated.secure import client_stage

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

    def _refuse(self, reply: Payload, rnd: int, err: PolicyViolationError) -> Payload:
        from fedrg.privacy.enforce import refusal_reply

        log.warning("%s refuses round %d (nothing spent, no data sent): %s", self.site.name, rnd, err)
        reply.meta.update(refusal_reply(err))
        return reply

    def train(self, payload: Payload, state: Payload) -> Payload:
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
        try:
            # 1. no data needed: the request against the policy, then the server's arrays
            peers = payload.meta.get("hospitals_in_round")
            cfg = check_request(from_run_config(payload.meta["config"]), policy, round_=rnd,
                                hospitals_in_round=None if peers is None else int(peers))
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
            ledger = self._ledger()
            entries = ledger.read()
            run_segments = [e.segment for e in entries if e.run_id == run_id and e.private and e.steps > 0]
            plan = plan_under_policy(cfg, policy, n_train=n_train, round_=rnd,
                                     run_history=run_segments)
        except PolicyViolationError as err:
            return self._refuse(reply, rnd, err)
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
            metrics = train_local(model, cache.data.train, cfg.training, steps=plan.steps,
                                  privacy=session, seed=seed)
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
                      dataset_fingerprint=cache.fingerprint)
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
                                          min_contributors=cfg.federation.min_hospitals)
            else:  # the server adds the noise to the mean
                update, _ = clip_update(update, hospital_clip=cfg.privacy.hospital_clip)
        loss = metrics.get("loss_mean")
        reply.meta["train_loss"] = float(loss) if loss is not None and math.isfinite(loss) else None
        if cfg.secagg.enabled:
            state.arrays = {}
            state.put_array_list("pending", update)
            state.meta["pending_weight"] = weight
            state.meta["pending_round"] = rnd
        else:
            reply.put_array_list("update", update)
            reply.meta["weight"] = weight
        return reply

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
    def evaluate(self, payload: Payload) -> Payload:
        """Aggregate metrics of the global adapter on this hospital's validation split."""
        from fedrg.model.payload import set_adapter_arrays
        from fedrg.privacy.enforce import check_base_model, check_sizes
        from fedrg.train.evaluate import evaluate

        cfg = from_run_config(payload.meta["config"])
        check_sizes(cfg)
        check_base_model(cfg.model.base, self.site.policy)
        # the site's own split (never the server's val_fraction / split_seed)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "val_fraction": self.site.policy.val_fraction, "split_seed": self.site.policy.split_seed})})
        cache = self.cohort(cfg)
        model = _model_for(cfg, self.model_factory)
        set_adapter_arrays(model, [np.asarray(a) for a in payload.array_list("global")])
        metrics = evaluate(model, cache.data.val)
        keep = {k: metrics.get(k) for k in ("loss", "auroc", "auroc_multimodal", "rouge_l", "findings_f1")}
        return Payload(meta={"site": self.site.name, "n": len(cache.data.val), "metrics": keep})
