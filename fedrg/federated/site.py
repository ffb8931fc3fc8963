"""A hospital's side of the federation, independent of Flower.

``HospitalSite.handle(action, payload, state)`` answers one server message:

* ``train``: plan the round against the privacy budget (decline before touching data if it
  would pass it), train with DP-SGD, append the signed ledger entry, compute the update
  (delta from the global adapter). With secure aggregation the update stays in ``state``
  until the masked upload; without, it is returned with its weight.
* ``secagg_*``: the four secure-aggregation stages (the update only leaves masked).
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
from fedrg.errors import BudgetExceededError, FedrgError
from fedrg.federated.payload import Payload

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
    cohort: Any
    train_idx: list[int]
    val_idx: list[int]
    fingerprint: str


_MODELS: dict[str, Any] = {}


def _model_for(cfg: ExperimentConfig) -> Any:
    """One model per (model, data) config per process; adapter arrays are set per message."""
    from fedrg.model.adapter import build_model

    key = json.dumps([cfg.model.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
                      cfg.federation.seed], sort_keys=True)
    if key not in _MODELS:
        _MODELS.clear()  # keep one model per worker process
        _MODELS[key] = build_model(cfg.model, cfg.data, seed=cfg.federation.seed)
    return _MODELS[key]


def _round_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") % 2**63


class HospitalSite:
    """One hospital: its cohort, ledger and state directory (all stay on site)."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self._cohort: _CohortCache | None = None

    # ------------------------------------------------------------------ helpers
    def cohort(self, cfg: ExperimentConfig) -> _CohortCache:
        """Load and validate the cohort once per data config; deterministic split."""
        from fedrg.data.cohort import load_cohort
        from fedrg.data.dataset import split_indices

        key = cfg.data.model_dump_json()
        if self._cohort is None or self._cohort.key != key:
            cohort = load_cohort(self.site.cohort, cfg.data)
            train_idx, val_idx = split_indices(cohort, cfg.data)
            manifest = Path(self.site.cohort) / "manifest.csv"
            fingerprint = hashlib.sha256(manifest.read_bytes()).hexdigest()
            self._cohort = _CohortCache(key, cohort, list(train_idx), list(val_idx), fingerprint)
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
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            sizes = json.loads(path.read_text())
        except (OSError, ValueError):
            sizes = {}
        sizes[self._size_key(cfg)] = n_train
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sizes))
        tmp.replace(path)

    # ------------------------------------------------------------------ dispatch
    def handle(self, action: str, payload: Payload, state: Payload) -> Payload:
        """Answer one server message; ``state`` persists between messages of a run."""
        if action == "train":
            return self.train(payload, state)
        if action == "evaluate":
            return self.evaluate(payload)
        if action.startswith("secagg_"):
            from fedrg.federated.secure import client_stage

            return client_stage(action, payload, state, site_name=self.site.name)
        raise FedrgError(f"unknown action {action!r}")

    # ------------------------------------------------------------------ train
    def plan(self, cfg: ExperimentConfig, n_train: int) -> dict[str, Any]:
        """Privacy plan of one round: sample rate, steps, calibrated noise (no data touched)."""
        from fedrg.privacy.accounting import (
            calibrate_noise_multiplier,
            check_delta,
            local_steps,
            poisson_sample_rate,
        )

        q = poisson_sample_rate(batch_size=cfg.training.batch_size, n_records=n_train)
        steps = local_steps(local_epochs=cfg.training.local_epochs, batch_size=cfg.training.batch_size,
                            n_records=n_train)
        plan: dict[str, Any] = {"sample_rate": q, "steps": steps}
        if cfg.privacy.enabled:
            check_delta(target_delta=cfg.privacy.target_delta, n_patients=n_train)
            if cfg.privacy.noise_multiplier is not None:
                sigma = float(cfg.privacy.noise_multiplier)
            else:
                # calibrated once for the whole planned federation (rounds x local steps)
                sigma = calibrate_noise_multiplier(
                    target_epsilon=cfg.privacy.target_epsilon, target_delta=cfg.privacy.target_delta,
                    sample_rate=q, steps=steps * cfg.federation.rounds,
                    accountant=cfg.privacy.accountant)
            plan["noise_multiplier"] = sigma
        return plan

    def train(self, payload: Payload, state: Payload) -> Payload:
        """Train one round locally and prepare the update."""
        from fedrg.data.dataset import CohortDataset
        from fedrg.model.payload import get_adapter_arrays, set_adapter_arrays
        from fedrg.privacy.accounting import PrivacyHistory, epsilon_of
        from fedrg.privacy.budget import decline_reply, plan_round
        from fedrg.train.loop import train_local

        cfg = from_run_config(payload.meta["config"])
        rnd = int(payload.meta["round"])
        run_id = str(payload.meta["run_id"])
        reply = Payload(meta={"site": self.site.name, "status": "ok"})
        session = None
        ledger = None
        # The budget check needs only the training-set size: known from an earlier round
        # (kept in the state directory), so a hospital over budget declines before it reads
        # any patient file. Only the very first round on a dataset loads the cohort first.
        n_train = self._known_train_size(cfg)
        cache = None
        if n_train is None or not cfg.privacy.enabled:
            cache = self.cohort(cfg)
            n_train = len(cache.train_idx)
            self._remember_train_size(cfg, n_train)
        plan = self.plan(cfg, n_train)
        if cfg.privacy.enabled:
            ledger = self._ledger()
            past = ledger.history()
            try:
                round_plan = plan_round(past, noise_multiplier=plan["noise_multiplier"],
                                        sample_rate=plan["sample_rate"], steps=plan["steps"],
                                        target_delta=cfg.privacy.target_delta,
                                        budget=self.site.epsilon_budget,
                                        accountant=cfg.privacy.accountant)
            except BudgetExceededError as err:
                log.warning("%s declines round %d: %s", self.site.name, rnd, err)
                reply.meta.update(decline_reply(err))
                reply.meta["epsilon"] = self._run_epsilon(ledger.read(), run_id, cfg)
                reply.meta["epsilon_lifetime"] = float(err.epsilon_spent)
                return reply
            if cache is None:
                cache = self.cohort(cfg)
                if len(cache.train_idx) != n_train:  # the cohort changed: plan again
                    self._remember_train_size(cfg, len(cache.train_idx))
                    return self.train(payload, state)
            from fedrg.privacy.dpsgd import DPSession

            session = DPSession.from_config(
                cfg.privacy, cfg.training, n_records=n_train,
                noise_multiplier=plan["noise_multiplier"],
                history=PrivacyHistory([tuple(s) for s in past]))
            log.info("%s round %d: eps %.3f -> %.3f of budget %.3f", self.site.name, rnd,
                     round_plan.epsilon_spent, round_plan.epsilon_after, self.site.epsilon_budget)
        model = _model_for(cfg)
        global_arrays = [np.asarray(a) for a in payload.array_list("global")]
        set_adapter_arrays(model, global_arrays)
        # from the shared seeds, round and site (not the run id), so a resumed run repeats the
        # interrupted one; DP noise never comes from here (OS entropy, see privacy/dpsgd.py)
        seed = _round_seed(cfg.training.seed, cfg.federation.seed, rnd, self.site.name)
        torch.manual_seed(seed)
        if cfg.training.threads:
            torch.set_num_threads(cfg.training.threads)
        train_ds = CohortDataset(cache.cohort, cfg.data, cache.train_idx)
        metrics = train_local(model, train_ds, cfg.training, steps=plan["steps"], privacy=session,
                              seed=seed, frozen=cfg.privacy.frozen_under_dp if session else ())
        new_arrays = get_adapter_arrays(model)
        update = [(n - g).astype(np.float32) for n, g in zip(new_arrays, global_arrays, strict=True)]
        if cfg.privacy.enabled and session is not None and ledger is not None:
            history = session.history
            eps_lifetime = epsilon_of(history, target_delta=cfg.privacy.target_delta,
                                      accountant=cfg.privacy.accountant)
            # the signed entry is on disk before the update can leave the hospital
            ledger.append(run_id=run_id, round=rnd, noise_multiplier=plan["noise_multiplier"],
                          sample_rate=plan["sample_rate"], steps=plan["steps"],
                          max_grad_norm=cfg.privacy.max_grad_norm,
                          accountant=cfg.privacy.accountant, target_delta=cfg.privacy.target_delta,
                          epsilon=eps_lifetime, budget=self.site.epsilon_budget,
                          config_hash=cfg.config_hash(), dataset_fingerprint=cache.fingerprint)
            reply.meta["epsilon"] = self._run_epsilon(ledger.read(), run_id, cfg)
            reply.meta["epsilon_lifetime"] = eps_lifetime
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
    def _run_epsilon(entries: list[Any], run_id: str, cfg: ExperimentConfig) -> float:
        """Epsilon of this run's segments alone (the per-run target applies to this)."""
        from fedrg.privacy.accounting import PrivacyHistory, epsilon_of

        segs = [e.segment for e in entries if e.run_id == run_id and e.steps > 0]
        return epsilon_of(PrivacyHistory([tuple(s) for s in segs]),
                          target_delta=cfg.privacy.target_delta, accountant=cfg.privacy.accountant)

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, payload: Payload) -> Payload:
        """Aggregate metrics of the global adapter on this hospital's validation split."""
        from fedrg.data.dataset import CohortDataset
        from fedrg.model.payload import set_adapter_arrays
        from fedrg.train.evaluate import evaluate

        cfg = from_run_config(payload.meta["config"])
        cache = self.cohort(cfg)
        model = _model_for(cfg)
        set_adapter_arrays(model, [np.asarray(a) for a in payload.array_list("global")])
        val_ds = CohortDataset(cache.cohort, cfg.data, cache.val_idx)
        metrics = evaluate(model, val_ds)
        keep = {k: metrics.get(k) for k in ("loss", "auroc", "auroc_multimodal", "rouge_l", "findings_f1")}
        return Payload(meta={"site": self.site.name, "n": len(cache.val_idx), "metrics": keep})
