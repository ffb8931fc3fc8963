"""The server's round loop, independent of Flower (it talks through a :class:`Transport`).

Per round: sample hospitals, send the global adapter, collect typed replies (trained or
declined), aggregate the deltas (secure aggregation or plain weighted FedAvg), apply the
server optimiser, checkpoint, record metrics. Federated evaluation of round ``r``'s adapter
rides on round ``r + 1``'s train message (:mod:`fedrg.federated.evaluation_fold`), so
round ``r``'s metrics row is recorded one train message later; hospitals that do not train
in round ``r + 1``, and the last round, get a plain ``evaluate`` message.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrg.config import ExperimentConfig, FederationConfig, to_run_config
from fedrg.errors import FedrgError, SecAggError
from fedrg.federated.aggregate import Aggregator, ServerOptimizer, unflatten, weighted_mean
from fedrg.federated.checkpoint import RunCheckpoint, load_checkpoint, save_checkpoint
from fedrg.federated.evaluation_fold import EVALUATE_FIELD, EVALUATION_FIELD, PendingEvaluation, request_bytes
from fedrg.files import atomic_write
from fedrg.payload import Payload, Reply, Transport, meta_to_json

log = logging.getLogger("fedrg.server")

SecureAggregate = Callable[[Transport, list[int], int, int], tuple[np.ndarray, float]]
"""(transport, participants, round, n_params) -> (flat weighted-mean delta, total weight)."""


@dataclass
class RoundOutcome:
    """What happened in one round (goes into metrics.json)."""

    round: int
    participants: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    failed: int = 0
    aggregated: bool = False
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServerResult:
    """Final state of a run."""

    global_arrays: list[np.ndarray]
    metrics: dict[str, Any]
    stopped_early: str = ""


def sample_size(n_nodes: int, fraction: float, minimum: int) -> int:
    """How many of ``n_nodes`` hospitals a round samples (``fraction``, at least ``minimum``)."""
    return min(n_nodes, max(minimum, round(fraction * n_nodes)))


def _sample(nodes: list[int], fraction: float, minimum: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(sorted(nodes), sample_size(len(nodes), fraction, minimum)))


def round_draw(nodes: list[int], fed: FederationConfig, rnd: int) -> tuple[list[int], random.Random]:
    """Round ``rnd``'s training sample from the public seed, and the generator positioned for
    its evaluation draw: the one draw :meth:`Server.run`, the pipelined set-up and a resumed
    run all make."""
    rng = random.Random(f"{fed.seed}-{rnd}")
    return _sample(nodes, fed.fraction_train, fed.min_hospitals, rng), rng


def aggregate_evaluation(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics from the hospitals' DP releases: noisy aggregates summed over hospitals.

    Each reply's ``release`` holds noisy histograms and sums (see
    :mod:`fedrg.privacy.release`); the server adds them up and computes loss, AUROC per
    marker (image only and multimodal), findings F1 and ROUGE-L from the sum. No exact
    per-hospital metric exists on the server.

    Returns
    -------
    dict
        Empty without a release; else the metrics, ``releases`` (how many), ``released``
        (``"dp"``, ``"exact"`` or ``"dp+exact"``), ``released_by`` (the hospitals whose
        releases are in the sum) and ``interval`` (:func:`fedrg.privacy.release.metric_intervals`,
        the noise std summed over the DP releases as each hospital reported its noise
        multiplier).
    """
    from fedrg.privacy.release import (
        metric_intervals,
        metrics_from_release,
        release_std,
        sum_releases,
        summed_std,
    )

    released = [r for r in replies if isinstance(r.get("release"), dict)]
    if not released:
        return {}
    markers = list(released[0].get("markers") or [])
    summed = sum_releases([r["release"] for r in released])
    out = metrics_from_release(summed, markers)
    out["releases"] = len(released)
    kinds = sorted({"dp" if r.get("private") else "exact" for r in released})
    out["released"] = "+".join(kinds)
    out["released_by"] = sorted(str(r.get("site")) for r in released)
    std = summed_std([release_std(float(r.get("noise_multiplier") or 0.0), n_markers=len(markers))
                      for r in released if r.get("private")])
    out["interval"] = metric_intervals(summed, markers, noise_std=std)
    return out


def _why_no_keys(sampled: list[int], replies: dict[int, Reply], keys: dict[int, Any]) -> dict[int, str]:
    """Why each sampled hospital without secure-aggregation keys sent none (for the log)."""
    out: dict[int, str] = {}
    for node in sampled:
        reply = replies.get(node)
        if node in keys:
            continue
        if reply is None:
            out[node] = "no reply"
        elif not reply.ok:
            out[node] = reply.error or "failed"
        elif reply.body.meta.get("status") == "declined":
            out[node] = f"declined: {reply.body.meta.get('reason', '')}"
        else:
            out[node] = str(reply.body.meta.get("secagg_error") or "sent no secure-aggregation answer")
    return out


class FederationServer:
    """Runs the rounds of one federated training run.

    Parameters
    ----------
    cfg
        The experiment configuration (sent to hospitals each round).
    run_dir
        Where checkpoints, metrics and the final adapter go.
    initial_arrays
        The initial global adapter (ignored when resuming).
    secure_aggregate
        Secure-aggregation driver; required when ``cfg.secagg.enabled``.
    on_round
        Called with each round's complete metrics dict (progress display). With federated
        evaluation on, round ``r``'s row comes when its evaluation arrives: with round
        ``r + 1``'s train replies (the last round's after a plain ``evaluate`` message).
    aggregator
        A custom :class:`~fedrg.federated.aggregate.Aggregator` object; default the one
        ``federation.server_optimizer`` names. It sees only the round's mean delta (after
        secure aggregation, of DP-noised updates): it cannot switch either off.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, initial_arrays: list[np.ndarray],
                 *, secure_aggregate: SecureAggregate | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 timeout: float | None = None, aggregator: Aggregator | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.global_arrays = [np.asarray(a, dtype=np.float32) for a in initial_arrays]
        if aggregator is not None and not isinstance(aggregator, Aggregator):
            raise FedrgError(f"aggregator {aggregator!r} is not an Aggregator: it needs a name and "
                             "apply/state_arrays/load_state_arrays (fedrg.federated.aggregate)")
        self.optimizer = aggregator if aggregator is not None else ServerOptimizer(
            cfg.federation.server_optimizer, cfg.federation.server_lr)
        if aggregator is None and cfg.federation.server_optimizer == "fedadam" and cfg.federation.server_lr > 0.1:
            log.warning(
                "federation.server_lr=%g with server_optimizer='fedadam': Adam moves every "
                "adapter weight by about server_lr per round (1.0 was measured to wreck the "
                "model); use about 1e-2", cfg.federation.server_lr)
        self.secure_aggregate = secure_aggregate
        self.on_round = on_round or (lambda m: None)
        self.timeout = timeout
        self.run_id = uuid.uuid4().hex[:12]
        self.metrics: dict[str, Any] = {"run_id": self.run_id, "config_hash": cfg.config_hash(),
                                        "rounds": []}
        self.start_round = 1
        # the last signed ledger head each hospital reported, kept in the run directory and
        # sent back with the next request (see fedrg.federated.ledger_heads)
        from fedrg.federated.ledger_heads import HeadBook

        self.heads = HeadBook(self.run_dir)
        self.node_sites: dict[int, str] = {}
        # the next round's secure sum, set up during this round's last messages
        self._pipelined: Any = None
        #: the last aggregated round's row, waiting for its evaluation (fedrg.federated.evaluation_fold)
        self.pending: PendingEvaluation | None = None
        if cfg.secagg.enabled and secure_aggregate is None:
            raise FedrgError("secagg.enabled=true but no secure-aggregation driver was given")

    # ----------------------------------------------------------------- resume
    def resume(self) -> None:
        """Continue from ``run_dir/checkpoint`` (same config required)."""
        ckpt = load_checkpoint(self.run_dir)
        if ckpt.config_hash != self.cfg.config_hash():
            raise FedrgError(
                f"cannot resume {self.run_dir}: its checkpoint was made with another configuration "
                f"(config hash {ckpt.config_hash[:12]} != {self.cfg.config_hash()[:12]}); resume with "
                f"the run's own config ({self.run_dir / 'config.toml'})")
        self.global_arrays = ckpt.global_arrays
        self.optimizer.load_state_arrays(ckpt.optimizer_state)
        self.metrics = ckpt.metrics
        self.run_id = ckpt.run_id
        self.start_round = ckpt.round + 1
        if ckpt.pending_evaluation is not None:  # asked for with the next train message
            try:
                self.pending = PendingEvaluation.from_json(ckpt.pending_evaluation)
            except (ValueError, KeyError, TypeError) as err:
                raise FedrgError(
                    f"cannot resume {self.run_dir}: pending_evaluation in its checkpoint "
                    f"(checkpoint/state.json) is unreadable ({err}); restore the checkpoint "
                    "from a backup") from None
        log.info("resuming run %s after round %d", self.run_id, ckpt.round)

    # ----------------------------------------------------------------- rounds
    def _train_payload(self, rnd: int, hospitals_in_round: int | None = None) -> Payload:
        p = Payload(meta={"config": to_run_config(self.cfg), "round": rnd, "run_id": self.run_id})
        if hospitals_in_round is not None:  # each hospital checks it against its policy
            p.meta["hospitals_in_round"] = int(hospitals_in_round)
        p.put_array_list("global", self.global_arrays)
        return p

    def _payloads(self, payload: Payload, nodes: list[int]) -> dict[int, Payload]:
        """One payload per node: the shared one plus the hospital's last known ledger head."""
        out: dict[int, Payload] = {}
        for node in nodes:
            head = self.heads.get(self.node_sites.get(node) or self.heads.site_of(node) or "")
            out[node] = payload if head is None else Payload(
                meta={**payload.meta, "ledger_head": head}, arrays=payload.arrays)
        return out

    def _note_head(self, node: int, meta: dict[str, Any], rnd: int) -> None:
        """Keep the ledger head a reply carries; report one that does not extend the last."""
        site = str(meta.get("site", node))
        self.node_sites[node] = site
        self.heads.remember_node(node, site)
        alert = self.heads.observe(site, meta.get("ledger_head"), round_=rnd)
        if alert:
            log.warning("round %d: %s", rnd, alert["message"])
            self.metrics.setdefault("ledger_alerts", []).append(alert)

    def run(self, transport: Transport) -> ServerResult:
        """Run rounds ``start_round .. cfg.federation.rounds``."""
        fed = self.cfg.federation
        stopped = ""
        nodes: list[int] | None = None
        if self.start_round == 1 and self.pending is None:
            self._start_round_zero(transport)
        for rnd in range(self.start_round, fed.rounds + 1):
            t0 = time.perf_counter()
            nodes = transport.nodes()
            if len(nodes) < fed.min_hospitals:
                stopped = (f"round {rnd}: only {len(nodes)} hospital(s) connected, "
                           f"federation.min_hospitals={fed.min_hospitals}")
                break
            sampled, rng = round_draw(nodes, fed, rnd)
            self._rebind_pending(nodes)
            # the last round's evaluators that do not train now get a plain `evaluate`; the
            # others answer it in their train reply (see _fold_requests / _take_evaluations)
            self._evaluate_pending(transport, [n for n in self._pending_nodes() if n not in sampled])
            outcome, bytes_up, bytes_down = self._train_round(transport, sampled, rnd)
            self._finish_pending()  # when the train message did not run (or carried none)
            if not outcome.aggregated:
                stopped = outcome.reason
                self._record(rnd, outcome, bytes_up, bytes_down, t0, {})
                break
            eval_nodes = _sample(nodes, fed.fraction_evaluate, 1, rng) if fed.fraction_evaluate > 0 else []
            if hasattr(transport, "pop_message_seconds"):  # wall time per message exchange
                outcome.metrics["message_seconds"] = transport.pop_message_seconds()
            row = self._row(rnd, outcome, bytes_up, bytes_down, t0)
            if eval_nodes:  # its row is complete when the evaluation arrives
                self.pending = PendingEvaluation(round=rnd, nodes=eval_nodes, row=row)
            else:
                self._emit(row, {})
            self._checkpoint(rnd)
            crash_after = os.environ.get("FEDRG_CRASH_AFTER_ROUND")
            if crash_after and int(crash_after) == rnd:
                raise RuntimeError(f"FEDRG_CRASH_AFTER_ROUND={rnd}: simulated crash after checkpoint")
        if self.pending is not None:  # the last round's evaluation: a plain `evaluate` message
            self._rebind_pending(transport.nodes() if nodes is None else nodes)
            self._evaluate_pending(transport, self._pending_nodes())
            self._finish_pending()
        if stopped:
            self.metrics["stopped_early"] = stopped
            log.warning("run stopped early: %s", stopped)
        return ServerResult(self.global_arrays, self.metrics, stopped)

    def _checkpoint(self, rnd: int) -> None:
        """Save the run after round ``rnd`` (with its pending evaluation, if any)."""
        save_checkpoint(self.run_dir, RunCheckpoint(
            round=rnd, global_arrays=self.global_arrays,
            optimizer_state=self.optimizer.state_arrays(), metrics=self.metrics,
            config_hash=self.cfg.config_hash(), run_id=self.run_id,
            pending_evaluation=None if self.pending is None else self.pending.to_json()))

    def _train_round(self, transport: Transport, sampled: list[int], rnd: int
                     ) -> tuple[RoundOutcome, int, int]:
        outcome = RoundOutcome(round=rnd)
        payload = self._train_payload(rnd, hospitals_in_round=len(sampled))
        payloads = self._payloads(payload, sampled)
        payloads = self._fold_requests(payloads, rnd)  # the last round's evaluation rides along
        secure_round = None
        pipelined, self._pipelined = self._pipelined, None
        if self.cfg.secagg.enabled and hasattr(self.secure_aggregate, "begin"):
            from fedrg.secagg.wire import MASKED_FIELD, SETUP_FIELD

            if pipelined is not None and pipelined.participants == sampled and pipelined.ready:
                # set up during the last round: the routed shares ride on the train message
                # and the masked update comes back in its reply
                secure_round = pipelined
                field, requests = MASKED_FIELD, pipelined.masked_requests()
            else:
                # the secure sum's setup rides on the train message and the signed round keys
                # on its reply: one message fewer per round (fedrg.federated.secure.SecureRound)
                secure_round = self.secure_aggregate.begin(  # type: ignore[union-attr]
                    sampled, rnd, sum(a.size for a in self.global_arrays))
                field, requests = SETUP_FIELD, secure_round.setup_requests()
            payloads = {node: Payload(meta={**p.meta, field: requests[node]}, arrays=p.arrays)
                        for node, p in payloads.items()}
        replies = transport.send("train", payloads, round_=rnd, timeout=self.timeout)
        self._take_evaluations(replies)  # (and out of the replies: their bytes count there)
        bytes_down = payload.nbytes() * len(sampled)
        bytes_up = sum(r.payload.nbytes() for r in replies.values() if r.payload is not None)
        trained: dict[int, Reply] = {}
        epsilons: dict[str, float] = {}
        lifetime: dict[str, float] = {}
        for node in sampled:
            reply = replies.get(node)
            if reply is None or not reply.ok:
                outcome.failed += 1
                log.warning("round %d: hospital node %s failed: %s", rnd, node,
                            reply.error if reply else "no reply")
                continue
            meta = reply.body.meta
            site = str(meta.get("site", node))
            self._note_head(node, meta, rnd)
            if meta.get("epsilon") is not None:
                epsilons[site] = float(meta["epsilon"])
            if meta.get("epsilon_lifetime") is not None:
                lifetime[site] = float(meta["epsilon_lifetime"])
            if meta.get("status") == "declined":
                reason = str(meta.get("reason", "declined"))
                if meta.get("setting"):  # a policy refusal: which setting, what is allowed
                    reason += f": {meta['setting']}={meta.get('requested')} (allowed: {meta.get('allowed')})"
                outcome.declined[site] = reason
                log.warning("round %d: %s declined: %s", rnd, site, reason)
                continue
            trained[node] = reply
            outcome.participants.append(site)
        outcome.metrics["epsilon"] = epsilons
        outcome.metrics["epsilon_lifetime"] = lifetime
        if len(trained) < self.cfg.federation.min_hospitals:
            why = "; ".join(f"{s}: {r}" for s, r in outcome.declined.items())
            outcome.reason = (f"round {rnd}: {len(trained)} hospital(s) trained, fewer than "
                              f"federation.min_hospitals={self.cfg.federation.min_hospitals}"
                              + (f" (declined: {why})" if why else "")
                              + (f" ({outcome.failed} failed)" if outcome.failed else ""))
            return outcome, bytes_up, bytes_down
        try:
            if secure_round is not None:
                from fedrg.secagg.wire import KEYS_FIELD, MASKED_FIELD

                t_sa = time.perf_counter()
                next_sampled = (self._predicted_sample(transport, rnd)
                                if self.cfg.secagg.pipelined else None)
                if secure_round.ready:  # pipelined: the masked updates are in the train replies
                    masked = {node: {**r.body.meta[MASKED_FIELD],
                                     "masked": r.body.arrays["sa.masked"]}
                              for node, r in trained.items()
                              if isinstance(r.body.meta.get(MASKED_FIELD), dict)
                              and "sa.masked" in r.body.arrays}
                    flat, _total = secure_round.finish_masked(
                        transport, masked, _why_no_keys(sampled, replies, masked),
                        next_participants=next_sampled)
                else:
                    keys = {node: r.body.meta[KEYS_FIELD] for node, r in trained.items()
                            if isinstance(r.body.meta.get(KEYS_FIELD), dict)}
                    flat, _total = secure_round.finish(
                        transport, keys, _why_no_keys(sampled, replies, keys),
                        next_participants=next_sampled)
                self._pipelined = secure_round.next_round
                # wall time of the whole protocol after training (its messages included), and
                # the server's own share of it (its crypto; waiting for hospitals excluded)
                outcome.metrics["secagg_seconds"] = round(time.perf_counter() - t_sa, 3)
                outcome.metrics["secagg_server_seconds"] = round(secure_round.server_seconds, 3)
                delta = unflatten(np.asarray(flat, dtype=np.float32), self.global_arrays)
                sa_up, sa_down = getattr(transport, "last_secagg_bytes", (0, 0))
                bytes_up += sa_up
                bytes_down += sa_down
            elif self.cfg.secagg.enabled:
                assert self.secure_aggregate is not None  # checked in __init__
                n_params = sum(a.size for a in self.global_arrays)
                t_sa = time.perf_counter()
                flat, _total = self.secure_aggregate(transport, sorted(trained), rnd, n_params)
                # wall time of the whole protocol (its messages included)
                outcome.metrics["secagg_seconds"] = round(time.perf_counter() - t_sa, 3)
                delta = unflatten(np.asarray(flat, dtype=np.float32), self.global_arrays)
                sa_up, sa_down = getattr(transport, "last_secagg_bytes", (0, 0))
                bytes_up += sa_up
                bytes_down += sa_down
            else:
                updates = [r.body.array_list("update") for r in trained.values()]
                weights = [float(r.body.meta["weight"]) for r in trained.values()]
                delta = weighted_mean(updates, weights)
            if self.cfg.privacy.hospital_level:
                delta = self._hospital_level_noise(delta, n_trained=len(trained), rnd=rnd, outcome=outcome)
        except SecAggError as err:
            outcome.reason = f"round {rnd}: secure aggregation aborted, global model unchanged: {err}"
            log.warning(outcome.reason)
            return outcome, bytes_up, bytes_down
        self.global_arrays = self.optimizer.apply(self.global_arrays, delta)
        outcome.aggregated = True
        return outcome, bytes_up, bytes_down

    def _predicted_sample(self, transport: Transport, rnd: int) -> list[int] | None:
        """The hospitals round ``rnd + 1`` will sample if the connected set stays (None: last
        round or too few). The same draw as :meth:`run`'s, so a pipelined set-up matches."""
        fed = self.cfg.federation
        if rnd >= fed.rounds:
            return None
        nodes = transport.nodes()
        if len(nodes) < fed.min_hospitals:
            return None
        return round_draw(nodes, fed, rnd + 1)[0]

    def _hospital_level_noise(self, delta: list[np.ndarray], *, n_trained: int, rnd: int,
                              outcome: RoundOutcome) -> list[np.ndarray]:
        """Hospital-level DP: noise on the mean (plain) or already in the shares (secure)."""
        from fedrg.privacy.hospital_dp import add_server_noise, hospital_level_epsilon

        p = self.cfg.privacy
        if not self.cfg.secagg.enabled:
            delta = add_server_noise(delta, hospital_noise_multiplier=p.hospital_noise_multiplier,
                                     hospital_clip=p.hospital_clip, n_sampled=n_trained)
        # Hospitals are drawn as a fixed-size sample from a public seed (_sample), not by
        # secret Poisson sampling: no amplification, every round counts in full (q = 1).
        outcome.metrics["epsilon_hospital_level"] = hospital_level_epsilon(
            hospital_noise_multiplier=p.hospital_noise_multiplier,
            sample_rate=1.0, rounds=rnd, target_delta=p.hospital_target_delta, accountant="rdp")
        return delta

    # ------------------------------------------------------------ evaluation
    def _start_round_zero(self, transport: Transport) -> None:
        """Round 0: the starting adapter, evaluated like any round (an accounted release at
        each hospital), so every run shows what the federation added. Its evaluators are
        drawn like a round's; those that train in round 1 answer inside that train message."""
        fed = self.cfg.federation
        if fed.fraction_evaluate <= 0:
            return
        nodes = transport.nodes()
        if not nodes:
            return
        _, rng = round_draw(nodes, fed, 0)
        row = self._row(0, RoundOutcome(round=0), 0, 0, time.perf_counter())
        self.pending = PendingEvaluation(round=0, nodes=_sample(nodes, fed.fraction_evaluate, 1, rng),
                                         row=row)

    def _pending_nodes(self) -> list[int]:
        return [] if self.pending is None else list(self.pending.nodes)

    def _rebind_pending(self, nodes: list[int]) -> None:
        """A resumed run's pending evaluators when none of their node ids is connected (a new
        simulation numbers its nodes anew): drawn again from ``nodes`` with that round's draws."""
        pending = self.pending
        if pending is None or not pending.nodes or set(pending.nodes) & set(nodes):
            return
        fed = self.cfg.federation
        _, rng = round_draw(nodes, fed, pending.round)  # after the round's training draw
        pending.nodes = _sample(nodes, fed.fraction_evaluate, 1, rng)
        log.info("round %d's evaluation hospitals are no longer connected under their node ids; "
                 "drawn again from the %d connected", pending.round, len(nodes))

    def _evaluate_pending(self, transport: Transport, nodes: list[int]) -> None:
        """A plain ``evaluate`` message for the pending round to ``nodes`` (the global adapter
        is still that round's result); the answers wait in ``self.pending``."""
        pending = self.pending
        if pending is None or not nodes:
            return
        t0 = time.perf_counter()
        payload = self._train_payload(pending.round)
        replies = transport.send("evaluate", self._payloads(payload, nodes), round_=pending.round,
                                 timeout=self.timeout)
        for node, r in replies.items():
            if r.ok and r.payload is not None:
                self._note_head(node, r.payload.meta, pending.round)
                pending.answers.append(r.payload.meta)
        row = pending.row
        row["bytes_up"] += sum(r.payload.nbytes() for r in replies.values() if r.payload is not None)
        row["bytes_down"] += payload.nbytes() * len(nodes)
        row["seconds"] = round(row["seconds"] + time.perf_counter() - t0, 3)
        if hasattr(transport, "pop_message_seconds"):  # only this exchange since the last pop
            seconds = {**row.get("message_seconds", {})}
            for action, s in transport.pop_message_seconds().items():
                seconds[action] = round(seconds.get(action, 0.0) + s, 3)
            row["message_seconds"] = seconds
        pending.nodes = [n for n in pending.nodes if n not in nodes]

    def _fold_requests(self, payloads: dict[int, Payload], rnd: int) -> dict[int, Payload]:
        """Ask the pending round's evaluators among ``payloads``' nodes to evaluate the global
        adapter their train message carries (round ``rnd - 1``'s result)."""
        pending = self.pending
        if pending is None or pending.round != rnd - 1:
            return payloads
        asked = [n for n in pending.nodes if n in payloads]
        pending.row["bytes_down"] += request_bytes(pending.round) * len(asked)
        return {node: p if node not in asked else Payload(
                    meta={**p.meta, EVALUATE_FIELD: pending.round}, arrays=p.arrays)
                for node, p in payloads.items()}

    def _take_evaluations(self, replies: dict[int, Reply]) -> None:
        """Move the evaluation answers out of the train ``replies`` into the pending round's
        row, and record that row (its bytes count there, not in the train round's)."""
        pending = self.pending
        answered: set[int] = set()
        for node, reply in replies.items():
            if not reply.ok or EVALUATION_FIELD not in reply.body.meta:
                continue
            answer = reply.body.meta.pop(EVALUATION_FIELD)
            if pending is None or node not in pending.nodes or not isinstance(answer, dict):
                log.warning("node %s sent an evaluation nobody asked for; ignored", node)
                continue
            pending.row["bytes_up"] += len(meta_to_json({EVALUATION_FIELD: answer})) - 1
            self._note_head(node, answer, pending.round)
            pending.answers.append(answer)
            answered.add(node)
        # no plain `evaluate` again for the others: a hospital that made the release refuses
        # a second one of the same model, and one that failed to answer would likely fail again
        if pending is not None:
            for node in sorted(set(pending.nodes) - answered):
                log.warning("round %d: node %s sent no evaluation with its train reply",
                            pending.round, node)
        self._finish_pending()

    def _finish_pending(self) -> None:
        """Record the pending round's row with the evaluation answers it got, and checkpoint
        that round again without it (the global adapter is still that round's result)."""
        pending = self.pending
        if pending is None:
            return
        for meta in pending.answers:
            if meta.get("status") == "declined":
                log.info("round %d: %s released no metrics: %s", pending.round, meta.get("site"),
                         meta.get("reason"))
        self.pending = None
        if pending.round == 0:  # no training: the row's epsilon is that of the DP releases
            for key in ("epsilon", "epsilon_lifetime"):
                pending.row[key] = {str(a["site"]): float(a[key]) for a in pending.answers
                                    if a.get("status") == "ok" and a.get("private")
                                    and a.get(key) is not None}
        evaluation = aggregate_evaluation([a for a in pending.answers if "release" in a])
        evaluation["evaluation_declined"] = {
            str(a.get("site")): str(a.get("reason", "declined")) for a in pending.answers
            if a.get("status") == "declined"}
        self._emit(pending.row, evaluation)
        self._checkpoint(pending.round)

    # ------------------------------------------------------------ metrics rows
    def _record(self, rnd: int, outcome: RoundOutcome, bytes_up: int, bytes_down: int,
                t0: float, evaluation: dict[str, Any]) -> None:
        self._emit(self._row(rnd, outcome, bytes_up, bytes_down, t0), evaluation)

    def _row(self, rnd: int, outcome: RoundOutcome, bytes_up: int, bytes_down: int,
             t0: float) -> dict[str, Any]:
        """Round ``rnd``'s metrics row, its evaluation fields still empty (see :meth:`_emit`)."""
        evaluation: dict[str, Any] = {}
        row: dict[str, Any] = {
            "round": rnd,
            "loss": evaluation.get("loss"),
            "auroc": evaluation.get("auroc", {}),
            "auroc_multimodal": evaluation.get("auroc_multimodal", {}),
            "findings_f1": evaluation.get("findings_f1"),
            "rouge_l": evaluation.get("rouge_l"),
            "participants": len(outcome.participants),
            "hospitals": sorted(outcome.participants),
            "declined": outcome.declined,
            "failed": outcome.failed,
            "aggregated": outcome.aggregated,
            "epsilon": outcome.metrics.get("epsilon", {}),
            "epsilon_lifetime": outcome.metrics.get("epsilon_lifetime", {}),
            "bytes_up": int(bytes_up),
            "bytes_down": int(bytes_down),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        for key in ("secagg_seconds", "secagg_server_seconds"):
            if key in outcome.metrics:
                row[key] = outcome.metrics[key]
        if outcome.metrics.get("message_seconds"):
            row["message_seconds"] = outcome.metrics["message_seconds"]
        if "epsilon_hospital_level" in outcome.metrics:
            row["epsilon_hospital_level"] = outcome.metrics["epsilon_hospital_level"]
        if outcome.reason:
            row["reason"] = outcome.reason
        return row

    def _emit(self, row: dict[str, Any], evaluation: dict[str, Any]) -> None:
        """Fill ``row``'s evaluation fields, append it to the metrics and hand it to ``on_round``."""
        row.update({
            "loss": evaluation.get("loss"),
            "auroc": evaluation.get("auroc", {}),
            "auroc_multimodal": evaluation.get("auroc_multimodal", {}),
            "findings_f1": evaluation.get("findings_f1"),
            "rouge_l": evaluation.get("rouge_l"),
            # whose numbers the metrics are: the hospitals whose releases were summed (not
            # the round's trainers, ``hospitals``), how (``dp``/``exact``), with what noise
            "released": evaluation.get("released"),
            "released_by": evaluation.get("released_by", []),
            "evaluation_declined": evaluation.get("evaluation_declined", {}),
        })
        if "interval" in evaluation:
            row["interval"] = evaluation["interval"]
        alerts = [a for a in self.metrics.get("ledger_alerts", []) if a.get("round") == row["round"]]
        if alerts:
            row["ledger_alerts"] = alerts
        self.metrics["rounds"].append(row)
        self.on_round(row)


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``run_dir/metrics.json`` atomically."""
    return atomic_write(Path(run_dir) / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
