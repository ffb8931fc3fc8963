"""Server round loop, aggregation, checkpoints and payloads (no Flower, no model)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrg.config import load_config
from fedrg.errors import FedrgError
from fedrg.federated.aggregate import ServerOptimizer, flatten, unflatten, weighted_mean
from fedrg.federated.checkpoint import RunCheckpoint, load_checkpoint, save_checkpoint
from fedrg.federated.server import FederationServer, aggregate_evaluation
from fedrg.payload import Payload, Reply, meta_from_json, meta_to_json


@given(st.lists(st.floats(0.1, 100), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_weighted_mean_matches_numpy(weights, seed):
    rng = np.random.default_rng(seed)
    updates = [[rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
               for _ in weights]
    got = weighted_mean(updates, weights)
    w = np.asarray(weights) / sum(weights)
    for i in range(2):
        expected = sum(wi * u[i].astype(np.float64) for wi, u in zip(w, updates, strict=True))
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)


def test_flatten_roundtrip_and_errors():
    like = [np.zeros((2, 3), np.float32), np.zeros(5, np.float32)]
    vec = np.arange(11, dtype=np.float32)
    back = unflatten(vec, like)
    np.testing.assert_array_equal(flatten(back), vec)
    with pytest.raises(FedrgError, match="11"):
        unflatten(np.zeros(10, np.float32), like)
    with pytest.raises(FedrgError):
        weighted_mean([], [])


def test_fedadam_moves_towards_delta_and_state_roundtrips():
    opt = ServerOptimizer("fedadam", lr=0.1)
    g = [np.zeros(3, np.float32)]
    new = opt.apply(g, [np.array([1.0, -1.0, 0.0], np.float32)])
    assert new[0][0] > 0 > new[0][1] and new[0][2] == 0
    clone = ServerOptimizer("fedadam", lr=0.1)
    clone.load_state_arrays(opt.state_arrays())
    d = [np.array([0.5, 0.5, 0.5], np.float32)]
    np.testing.assert_array_equal(opt.apply(new, d)[0], clone.apply(new, d)[0])


def test_payload_meta_json_roundtrip_with_bytes():
    meta = {"a": b"\x00\xff", "b": [b"x", 1, 2.5, "s"], "c": {"d": None, "e": True}}
    assert meta_from_json(meta_to_json(meta)) == meta
    p = Payload(meta=meta)
    p.put_array_list("u", [np.ones(3, np.float32), np.zeros((2, 2), np.float32)])
    assert [a.shape for a in p.array_list("u")] == [(3,), (2, 2)]
    assert p.nbytes() >= 3 * 4 + 4 * 4


def test_checkpoint_atomic_and_backup(tmp_path, monkeypatch):
    ck = RunCheckpoint(round=2, global_arrays=[np.arange(4, dtype=np.float32)], optimizer_state={},
                       metrics={"rounds": [1, 2]}, config_hash="h", run_id="r")
    save_checkpoint(tmp_path, ck)
    import fedrg.federated.checkpoint as mod

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, RunCheckpoint(3, [np.zeros(4, np.float32)], {}, {}, "h", "r"))
    loaded = load_checkpoint(tmp_path)  # the failed save left the previous checkpoint intact
    assert loaded.round == 2 and loaded.metrics == {"rounds": [1, 2]}
    np.testing.assert_array_equal(loaded.global_arrays[0], np.arange(4))
    with pytest.raises(FedrgError, match="no checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")


def test_aggregate_evaluation_sums_releases_before_computing_metrics():
    """The server sums the hospitals' (here noise-free) aggregates, then computes metrics."""
    from fedrg.privacy.release import exact_aggregates

    def agg(p, y, loss):
        p, y = np.asarray(p, float)[:, None], np.asarray(y, float)[:, None]
        return {k: v.tolist() for k, v in exact_aggregates(
            markers=["idh"], probs={"auroc": p, "auroc_multimodal": p}, labels=y,
            mask=np.ones_like(y), loss=np.asarray(loss, float), findings_f1=None,
            rouge_l=None).items()}

    out = aggregate_evaluation([
        {"markers": ["idh"], "release": agg([0.9, 0.1], [1, 0], [1.0, 1.0])},
        {"markers": ["idh"], "release": agg([0.15, 0.85, 0.55], [1, 0, 1], [2.0, 2.0, 2.0])},
        {"status": "declined"},
    ])
    assert out["releases"] == 2 and out["n"] == 5
    assert out["loss"] == pytest.approx(8.0 / 5)
    # pooled: positives in bins 9, 1, 5; negatives in bins 1, 8 -> 3 of 6 pairs, 1 tie
    assert out["auroc"]["idh"] == pytest.approx((3 + 0.5) / 6)
    assert out["findings_f1"] is None


class ArithmeticHospitals:
    """In-process hospitals whose update is a fixed function of the global model.

    Exercises the server loop (sampling, declines, FedAvg, checkpoints, resume, evaluation
    folded into the train message); the real hospital side is tested with the model in the
    simulation tests and tests/adversary.
    """

    def __init__(self, targets, declines=(), fail=(), decline_rounds=None, eval_declines=None):
        self.targets = targets  # node -> target vector; update = target - global
        self.eval_declines = eval_declines or {}  # evaluated round -> nodes declining its release
        self.declines = set(declines)
        self.decline_rounds = decline_rounds or {}  # round -> nodes declining that round
        self.fail = set(fail)
        self.calls = []
        self.exchanges = []  # (action, round, nodes): one per message exchange of the server

    def nodes(self):
        return sorted(self.targets)

    def _release(self, node, g, round_=None):
        # a release as a hospital makes it (zero noise here: the arithmetic is the point)
        from fedrg.privacy.release import exact_aggregates, noisy_release

        if node in self.eval_declines.get(round_, ()):  # as a hospital that already released it
            return {"site": f"h{node}", "status": "declined", "reason": "evaluation_repeated"}

        loss = float(np.abs(g - self.targets[node]).sum())
        labels = np.array([[1.0], [0.0]] * 5)
        probs = np.where(labels > 0, 0.75, 0.25)
        agg = exact_aggregates(markers=["idh"], probs={"auroc": probs, "auroc_multimodal": probs},
                               labels=labels, mask=np.ones_like(labels),
                               loss=np.full(10, min(loss, 9.0)), findings_f1=None, rouge_l=None)
        return {"site": f"h{node}", "status": "ok", "markers": ["idh"],
                "release": noisy_release(agg, noise_multiplier=0.0, n_markers=1)}

    def send(self, action, messages, *, round_, timeout=None):
        self.exchanges.append((action, round_, sorted(messages)))
        out = {}
        for node, p in messages.items():
            self.calls.append((action, node, round_))
            if node in self.fail:
                out[node] = Reply(node=node, error="boom")
                continue
            g = p.array_list("global")[0]
            if action == "train":
                if node in self.declines or node in self.decline_rounds.get(round_, ()):
                    r = Payload(meta={"site": f"h{node}", "status": "declined",
                                      "reason": "privacy_budget_exhausted", "epsilon": 7.9})
                else:
                    r = Payload(meta={"site": f"h{node}", "status": "ok", "weight": float(node),
                                      "epsilon": 1.0 * round_})
                    r.put_array_list("update", [self.targets[node] - g])
                if "evaluate_round" in p.meta:  # the arrays it carries are the round's result
                    assert p.meta["evaluate_round"] == round_ - 1
                    r.meta["evaluation"] = self._release(node, g, round_ - 1)
                out[node] = Reply(node, r)
            else:
                out[node] = Reply(node, Payload(meta=self._release(node, g, round_)))
        return out


def _cfg(**over):
    items = ["secagg.enabled=false"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(None, items)


def test_server_fedavg_rounds_converge_to_weighted_target(tmp_path):
    targets = {1: np.array([1.0, 0.0], np.float32), 2: np.array([0.0, 1.0], np.float32),
               3: np.array([1.0, 1.0], np.float32)}
    cfg = _cfg(**{"federation.rounds": 2})
    server = FederationServer(cfg, tmp_path, [np.zeros(2, np.float32)])
    result = server.run(ArithmeticHospitals(targets))
    expected = (1 * targets[1] + 2 * targets[2] + 3 * targets[3]) / 6
    np.testing.assert_allclose(result.global_arrays[0], expected, rtol=1e-6)
    rows = result.metrics["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]  # round 0: the starting adapter, evaluated
    assert rows[0]["participants"] == 0 and rows[0]["auroc"] == {"idh": pytest.approx(1.0)}
    assert rows[1]["participants"] == 3 and rows[1]["epsilon"] == {"h1": 1.0, "h2": 1.0, "h3": 1.0}
    assert rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] > 0
    assert load_checkpoint(tmp_path).round == 2


def test_server_carries_on_without_declined_and_stops_cleanly_when_too_few(tmp_path):
    targets = {i: np.full(2, i, np.float32) for i in (1, 2, 3)}
    cfg = _cfg(**{"federation.rounds": 2})
    result = FederationServer(cfg, tmp_path / "a", [np.zeros(2, np.float32)]).run(
        ArithmeticHospitals(targets, declines={3}))
    assert result.metrics["rounds"][1]["declined"] == {"h3": "privacy_budget_exhausted"}
    assert result.metrics["rounds"][1]["participants"] == 2 and not result.stopped_early
    np.testing.assert_allclose(result.global_arrays[0], (1 * 1 + 2 * 2) / 3)

    result = FederationServer(cfg, tmp_path / "b", [np.zeros(2, np.float32)]).run(
        ArithmeticHospitals(targets, declines={2, 3}))
    assert "fewer than federation.min_hospitals=2" in result.stopped_early
    assert "privacy_budget_exhausted" in result.stopped_early
    np.testing.assert_array_equal(result.global_arrays[0], 0)  # unchanged


def test_server_resume_equals_uninterrupted(tmp_path, monkeypatch):
    targets = {i: np.full(3, float(i), np.float32) for i in (1, 2, 3)}
    cfg = _cfg(**{"federation.rounds": 3, "federation.server_optimizer": "fedadam",
                  "federation.server_lr": 0.3, "federation.fraction_train": 0.67})
    full = FederationServer(cfg, tmp_path / "full", [np.zeros(3, np.float32)]).run(
        ArithmeticHospitals(targets))
    monkeypatch.setenv("FEDRG_CRASH_AFTER_ROUND", "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        FederationServer(cfg, tmp_path / "cut", [np.zeros(3, np.float32)]).run(ArithmeticHospitals(targets))
    monkeypatch.delenv("FEDRG_CRASH_AFTER_ROUND")
    resumed = FederationServer(cfg, tmp_path / "cut", [np.ones(3, np.float32)])
    resumed.resume()
    out = resumed.run(ArithmeticHospitals(targets))
    np.testing.assert_array_equal(out.global_arrays[0], full.global_arrays[0])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(out.metrics["rounds"]) == strip(full.metrics["rounds"])
    other = _cfg(**{"federation.rounds": 4})
    with pytest.raises(FedrgError, match="another configuration"):
        FederationServer(other, tmp_path / "cut", [np.zeros(3, np.float32)]).resume()


# ------------------------------------------------ evaluation folded into the next train message
EVAL_KEYS = ("loss", "auroc", "auroc_multimodal", "findings_f1", "rouge_l", "released", "released_by",
             "evaluation_declined", "interval")


def _moving(rounds, **over):
    """A run whose global adapter changes every round (FedAdam), so each round's evaluation differs."""
    return _cfg(**{"federation.rounds": rounds, "federation.server_optimizer": "fedadam",
                   "federation.server_lr": 0.3, **over})


TARGETS = {i: np.full(3, float(i), np.float32) for i in (1, 2, 3)}


def test_evaluation_rides_on_the_next_train_message_one_exchange_fewer_per_round(tmp_path):
    rows_seen = []
    hospitals = ArithmeticHospitals(TARGETS)
    server = FederationServer(_moving(3), tmp_path, [np.zeros(3, np.float32)],
                              on_round=lambda row: rows_seen.append((row["round"], len(hospitals.exchanges))))
    result = server.run(hospitals)
    # before: train + evaluate per round (6 exchanges); now one train message per round and
    # one plain `evaluate` after the last round
    assert hospitals.exchanges == [("train", 1, [1, 2, 3]), ("train", 2, [1, 2, 3]),
                                   ("train", 3, [1, 2, 3]), ("evaluate", 3, [1, 2, 3])]
    # one complete row per round, in order, each one train message later than before; round
    # 0 (the starting adapter) rides on round 1's train message
    assert rows_seen == [(0, 1), (1, 2), (2, 3), (3, 4)]
    rows = result.metrics["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["auroc"] == {"idh": pytest.approx(1.0)} and r["loss"] is not None
        assert r["participants"] == (3 if r["round"] else 0) and r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert len({tuple(sorted(r)) for r in rows}) == 1  # one shape for every row
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 3 and ckpt.pending_evaluation is None and ckpt.metrics["rounds"] == rows


def test_folded_evaluation_equals_a_plain_evaluate_of_the_same_round(tmp_path):
    """Differential: round r's row of a 3-round run (folded into round r + 1's train
    message) equals the last row of an r-round run (a plain `evaluate` of the same adapter)."""
    full = FederationServer(_moving(3), tmp_path / "full", [np.zeros(3, np.float32)]).run(
        ArithmeticHospitals(TARGETS)).metrics["rounds"]
    losses = set()
    for k in (1, 2):
        hospitals = ArithmeticHospitals(TARGETS)
        short = FederationServer(_moving(k), tmp_path / f"r{k}", [np.zeros(3, np.float32)]).run(
            hospitals).metrics["rounds"]
        assert hospitals.exchanges[-1] == ("evaluate", k, [1, 2, 3])
        assert {key: short[-1][key] for key in EVAL_KEYS} == {key: full[k][key] for key in EVAL_KEYS}
        losses.add(full[k]["loss"])
    assert len(losses) == 2  # the rounds' adapters differ: the rows are not all the same
    # the rest of the row is as without evaluation (train part, participants, epsilon)
    plain = FederationServer(_moving(3, **{"federation.fraction_evaluate": 0.0}), tmp_path / "none",
                             [np.zeros(3, np.float32)]).run(ArithmeticHospitals(TARGETS)).metrics["rounds"]
    skip = (*EVAL_KEYS, "seconds", "bytes_up", "bytes_down")
    assert full[0]["round"] == 0 and [r["round"] for r in plain] == [1, 2, 3]  # no round 0 then
    assert [{k: v for k, v in r.items() if k not in skip} for r in full[1:]] == \
        [{k: v for k, v in r.items() if k not in skip} for r in plain]
    # evaluation bytes count in the row of the round they evaluate
    assert all(f["bytes_up"] > p["bytes_up"] and f["bytes_down"] > p["bytes_down"]
               for f, p in zip(full[1:], plain, strict=True))


def test_fraction_evaluate_zero_sends_no_evaluation_at_all(tmp_path):
    hospitals = ArithmeticHospitals(TARGETS)
    rows_seen = []
    server = FederationServer(_moving(2, **{"federation.fraction_evaluate": 0.0}), tmp_path,
                              [np.zeros(3, np.float32)],
                              on_round=lambda row: rows_seen.append((row["round"], len(hospitals.exchanges))))
    server.run(hospitals)
    assert [a for a, _, _ in hospitals.exchanges] == ["train", "train"]
    assert rows_seen == [(1, 1), (2, 2)]  # each row right after its own round, as before
    assert load_checkpoint(tmp_path).pending_evaluation is None


def test_evaluators_not_sampled_to_train_get_a_plain_evaluate(tmp_path):
    cfg = _moving(3, **{"federation.fraction_train": 0.67})
    hospitals = ArithmeticHospitals(TARGETS)
    result = FederationServer(cfg, tmp_path, [np.zeros(3, np.float32)]).run(hospitals)
    trains = {rnd: nodes for action, rnd, nodes in hospitals.exchanges if action == "train"}
    for action, rnd, nodes in hospitals.exchanges:
        if action == "evaluate" and rnd < 3:  # before round rnd + 1's train message
            assert nodes == sorted(set(TARGETS) - set(trains[rnd + 1]))
    assert hospitals.exchanges[-1] == ("evaluate", 3, [1, 2, 3])
    for r in result.metrics["rounds"]:
        assert r["auroc"] == {"idh": pytest.approx(1.0)}
        assert r["participants"] == (2 if r["round"] else 0)
    # every evaluator answered every round: 3 releases summed per row
    assert result.metrics["rounds"][0]["loss"] is not None


def test_a_round_that_stops_the_run_still_carries_the_previous_evaluation(tmp_path):
    hospitals = ArithmeticHospitals(TARGETS, decline_rounds={2: {1, 2, 3}})
    result = FederationServer(_moving(3), tmp_path, [np.zeros(3, np.float32)]).run(hospitals)
    rows = result.metrics["rounds"]
    assert "fewer than federation.min_hospitals" in result.stopped_early
    assert [r["round"] for r in rows] == [0, 1, 2] and not rows[2]["aggregated"]
    assert rows[1]["auroc"] == {"idh": pytest.approx(1.0)}  # from the declined train replies
    assert [a for a, _, _ in hospitals.exchanges] == ["train", "train"]
    ckpt = load_checkpoint(tmp_path)  # round 1, its row complete: a resume redoes round 2 only
    assert ckpt.round == 1 and ckpt.pending_evaluation is None and len(ckpt.metrics["rounds"]) == 2


@pytest.mark.parametrize("crash_after", [1, 3])
def test_resume_keeps_the_pending_evaluation(tmp_path, monkeypatch, crash_after):
    from fedrg.federated.checkpoint import completed_rounds

    cfg = _moving(3, **{"federation.fraction_train": 0.67})
    full = FederationServer(cfg, tmp_path / "full", [np.zeros(3, np.float32)]).run(ArithmeticHospitals(TARGETS))
    monkeypatch.setenv("FEDRG_CRASH_AFTER_ROUND", str(crash_after))
    with pytest.raises(RuntimeError, match="simulated crash"):
        FederationServer(cfg, tmp_path / "cut", [np.zeros(3, np.float32)]).run(ArithmeticHospitals(TARGETS))
    monkeypatch.delenv("FEDRG_CRASH_AFTER_ROUND")
    ckpt = load_checkpoint(tmp_path / "cut")
    assert ckpt.round == crash_after and ckpt.pending_evaluation["round"] == crash_after
    assert [r["round"] for r in ckpt.metrics["rounds"]] == list(range(0, crash_after))
    assert completed_rounds(tmp_path / "cut") == crash_after - 1  # its row is not written yet
    resumed = FederationServer(cfg, tmp_path / "cut", [np.ones(3, np.float32)])
    resumed.resume()
    hospitals = ArithmeticHospitals(TARGETS)
    out = resumed.run(hospitals)
    if crash_after == 3:  # nothing left to train: only the last round's evaluation
        assert hospitals.exchanges == [("evaluate", 3, [1, 2, 3])]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(out.metrics["rounds"]) == strip(full.metrics["rounds"])
    assert completed_rounds(tmp_path / "cut") == 3
    with pytest.raises(FedrgError, match="pending_evaluation"):
        bad = tmp_path / "cut" / "checkpoint" / "state.json"
        import json

        state = json.loads(bad.read_text())
        bad.write_text(json.dumps({**state, "pending_evaluation": {"round": 3}}))
        FederationServer(cfg, tmp_path / "cut", [np.zeros(3, np.float32)]).resume()


def test_resume_with_renumbered_nodes_still_gets_the_pending_evaluation(tmp_path, monkeypatch):
    """A resumed simulation numbers its nodes anew: the pending evaluators are drawn again
    (the round's own draws) from the nodes connected now, and the row gets its evaluation."""
    cfg = _moving(2)
    monkeypatch.setenv("FEDRG_CRASH_AFTER_ROUND", "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        FederationServer(cfg, tmp_path, [np.zeros(3, np.float32)]).run(ArithmeticHospitals(TARGETS))
    monkeypatch.delenv("FEDRG_CRASH_AFTER_ROUND")
    assert load_checkpoint(tmp_path).pending_evaluation["nodes"] == [1, 2, 3]
    renumbered = ArithmeticHospitals({node + 10: t for node, t in TARGETS.items()})
    resumed = FederationServer(cfg, tmp_path, [np.zeros(3, np.float32)])
    resumed.resume()
    rows = resumed.run(renumbered).metrics["rounds"]
    assert renumbered.exchanges[0] == ("train", 2, [11, 12, 13])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["auroc"] == {"idh": pytest.approx(1.0)} for r in rows)


def test_a_run_stopped_for_too_few_hospitals_still_gets_the_pending_evaluation(tmp_path):
    class Leaving(ArithmeticHospitals):
        def nodes(self):  # two hospitals leave after round 1
            return [1, 2, 3] if not self.exchanges else [1]

    hospitals = Leaving(TARGETS)
    result = FederationServer(_moving(3), tmp_path, [np.zeros(3, np.float32)]).run(hospitals)
    assert "only 1 hospital(s) connected" in result.stopped_early
    assert hospitals.exchanges == [("train", 1, [1, 2, 3]), ("evaluate", 1, [1, 2, 3])]
    rows = result.metrics["rounds"]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["auroc"] == {"idh": pytest.approx(1.0)}
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1 and ckpt.pending_evaluation is None and ckpt.metrics["rounds"] == rows


def test_rows_say_whose_releases_they_hold_after_resume(tmp_path, monkeypatch):
    """Issue 24: after a resume, round 1's evaluation came from one hospital (the other two
    declined a repeated release) but its row said ``participants 3``, ``declined {}``. Now the
    row names the hospitals whose releases its metrics are (``released_by``) and the declines
    (``evaluation_declined``), apart from the round's trainers; round 0 has the fields too."""
    from fedrg.federated.report import release_text

    cfg = _moving(3)
    monkeypatch.setenv("FEDRG_CRASH_AFTER_ROUND", "1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        FederationServer(cfg, tmp_path, [np.zeros(3, np.float32)]).run(ArithmeticHospitals(TARGETS))
    monkeypatch.delenv("FEDRG_CRASH_AFTER_ROUND")
    resumed = FederationServer(cfg, tmp_path, [np.zeros(3, np.float32)])
    resumed.resume()
    rows = resumed.run(ArithmeticHospitals(TARGETS, eval_declines={1: {2, 3}})).metrics["rounds"]
    r1 = next(r for r in rows if r["round"] == 1)
    assert r1["participants"] == 3 and r1["hospitals"] == ["h1", "h2", "h3"]  # who trained
    assert r1["released_by"] == ["h1"] and r1["released"] == "exact"  # whose metrics these are
    assert r1["evaluation_declined"] == {"h2": "evaluation_repeated", "h3": "evaluation_repeated"}
    text = release_text(r1)
    assert "exact release by h1" in text and "h2 (evaluation_repeated)" in text
    r0 = rows[0]
    assert r0["round"] == 0 and r0["released_by"] == ["h1", "h2", "h3"]
    assert r0["evaluation_declined"] == {} and r0["interval"]["noise_std"] == 0.0


def test_no_row_claims_a_train_loss_no_hospital_released(tmp_path):
    """Issue 24: every row had ``"train_loss": null``. A hospital releases no training loss
    (it would be a release outside its ledger), so rows carry no such key, even when a reply
    sends one."""
    class Chatty(ArithmeticHospitals):
        def send(self, action, messages, *, round_, timeout=None):
            out = super().send(action, messages, round_=round_, timeout=timeout)
            for reply in out.values():
                if reply.ok:
                    reply.body.meta["train_loss"] = 0.5
            return out

    rows = FederationServer(_moving(2), tmp_path, [np.zeros(3, np.float32)]).run(
        Chatty(TARGETS)).metrics["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert not any("train_loss" in r for r in rows)
