"""Attack: a server that queries evaluation again and again, against the real site."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import tiny_cohort

from fedrg.audit.verify import audit_path
from fedrg.config import SiteConfig, load_config, to_run_config
from fedrg.federated.local import LocalTransport
from fedrg.federated.runner import run_federation
from fedrg.payload import Payload
from fedrg.policy import EvaluationPolicy, SitePolicy
from fedrg.privacy.ledger import Ledger

pytestmark = pytest.mark.slow


def test_attack_evaluation_queries(tmp_path, base_dir, fx_root):
    """The server asks for 99 % of the patients as validation, asks again and again, with
    the global model and with its own adapter weights, for rounds not trained. The hospital
    releases once per trained round (noisy aggregates of its own 25 % split, charged to its
    ledger) and refuses everything else; a 'none' policy releases nothing."""
    cohorts = [tiny_cohort(fx_root, patients=24, seed=s) for s in (31, 32)]
    from fedrg.federated.secure import provision_roster
    from fedrg.model.fingerprint import model_content_hash

    # two hospitals (each accepts one other in the sum) that allow the tiny test base
    own = {"allowed_base_models": [model_content_hash(base_dir)], "min_secagg_peers": 1}
    sites = provision_roster([
        SiteConfig(name="h1", cohort=str(cohorts[0]), state_dir=str(tmp_path / "s1"),
                   policy=SitePolicy(**own)),
        SiteConfig(name="h2", cohort=str(cohorts[1]), state_dir=str(tmp_path / "s2"),
                   policy=SitePolicy(**own, evaluation=EvaluationPolicy(release="none")))],
        tmp_path / "roster.toml")
    cfg = load_config(None, [
        f"model.base={base_dir}", "model.encoder_width=16", "model.lora_rank=4",
        "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]", "training.local_epochs=0.25",
        "training.batch_size=8", "federation.rounds=1", "federation.hospitals=2",
        "data.val_fraction=0.99"])
    transport = LocalTransport(sites)
    result = run_federation(transport, cfg, tmp_path / "run")
    row = result.metrics["rounds"][-1]
    h1, h2 = transport.sites[1], transport.sites[2]
    # the split is the site's own: about 25 % of the patients, not the 99 % asked for
    n_val = len(h1.cohort(cfg).data.val)
    assert 0 < n_val < 0.5 * 24
    # one release (h1's), noisy: the count is not the exact validation size
    assert row["auroc_multimodal"].keys() == set(cfg.data.markers)
    ledger1 = Ledger.open(sites[0].state_dir, hospital="h1")
    releases = [e for e in ledger1.read() if e.kind == "evaluation"]
    # the starting adapter (round 0) and round 1's result, each once
    assert [e.round for e in releases] == [0, 1] and {e.sample_rate for e in releases} == {1.0}
    assert releases[1].epsilon > next(e for e in ledger1.read() if e.kind == "train").epsilon
    assert not [e for e in Ledger.open(sites[1].state_dir, hospital="h2").read()
                if e.kind == "evaluation"]

    def ask(site, arrays, rnd):
        p = Payload(meta={"config": to_run_config(cfg), "round": rnd,
                          "run_id": result.metrics["run_id"]})
        p.put_array_list("global", arrays)
        return site.handle("evaluate", p, Payload()).meta

    glob = result.global_arrays
    own = [a + np.float32(0.01) for a in glob]
    before = len(ledger1.read())
    for _ in range(5):
        again = ask(h1, glob, 1)
        assert again["status"] == "declined" and again["reason"] == "evaluation_repeated"
        assert "release" not in again and "metrics" not in again
    other = ask(h1, own, 1)
    assert other["status"] == "declined" and other["reason"] == "evaluation_not_after_training"
    later = ask(h1, own, 2)
    assert later["status"] == "declined" and later["reason"] == "evaluation_not_after_training"
    none = ask(h2, own, 1)
    assert none["status"] == "declined" and none["reason"] == "evaluation_not_released"
    assert len(ledger1.read()) == before  # refused queries cost nothing and release nothing
    # the two releases (the start, round 1) are in the ledger and the audit, within the budget
    audit = audit_path(sites[0].state_dir)
    assert audit.ok and audit.hospitals[0].evaluation_releases == 2


# ------------------------------------------- evaluation folded into the next train message
def _fold(request: Payload, evaluate_round) -> Payload:
    """A train request that also asks for an evaluation (as FederationServer folds it)."""
    request.meta["evaluate_round"] = evaluate_round
    return request


def _evaluate(base_dir, arrays, rnd, run_id=None):
    """A plain `evaluate` message of ``arrays`` for round ``rnd``."""
    from .hostile import HONEST_RUN, honest_request

    return honest_request(base_dir, round_=rnd, run_id=run_id or HONEST_RUN, arrays=arrays)


def _evaluations(site):
    return [e for e in Ledger.open(site.site.state_dir, hospital="h1").read() if e.kind == "evaluation"]


def _copy(tmp_path, veteran_state, cohort, policy, name="copy"):
    import shutil

    from fedrg.hospital.site import HospitalSite

    state = tmp_path / name
    shutil.copytree(veteran_state, state)
    site = HospitalSite(SiteConfig(name="h1", cohort=str(cohort), state_dir=str(state), policy=policy))
    site._release_seed = 7  # tests only: the same release noise for both copies
    return site


def test_folded_evaluation_is_exactly_an_evaluate_message_then_training(tmp_path, base_dir,
                                                                      veteran_state, cohort):
    """Differential: one hospital answers `evaluate` (round 1) and then `train` (round 2);
    its copy gets the same two as one folded train message. Same release, same ledger
    (evaluation before training, so the plan saw the release's cost)."""
    from .hostile import HONEST_RUN, global_arrays, honest_request, site_policy, tiny_config

    arrays = global_arrays(tiny_config(base_dir))
    plain = _copy(tmp_path, veteran_state, cohort, site_policy(base_dir), "plain")
    folded = _copy(tmp_path, veteran_state, cohort, site_policy(base_dir), "folded")
    ev = plain.handle("evaluate", _evaluate(base_dir, arrays, 1), Payload()).meta
    tr = plain.handle("train", honest_request(base_dir, round_=2, run_id=HONEST_RUN), Payload()).meta
    both = folded.handle("train", _fold(honest_request(base_dir, round_=2, run_id=HONEST_RUN), 1),
                         Payload()).meta
    answer = both.pop("evaluation")
    assert ev["status"] == "ok" and answer["status"] == "ok" and tr["status"] == both["status"] == "ok"
    assert answer["release"] == ev["release"] and answer["epsilon_lifetime"] == ev["epsilon_lifetime"]
    assert set(answer) == set(ev) and set(both) == set(tr)
    assert both["epsilon_lifetime"] == pytest.approx(tr["epsilon_lifetime"], rel=1e-12)

    def mechanisms(site):
        return [(e.kind, e.round, e.noise_multiplier, e.sample_rate, e.steps, e.epsilon)
                for e in Ledger.open(site.site.state_dir, hospital="h1").read()]

    assert mechanisms(folded) == mechanisms(plain)
    assert [m[:2] for m in mechanisms(folded)] == [("train", 1), ("evaluation", 1), ("train", 2)]
    assert mechanisms(folded)[2][-1] > mechanisms(folded)[1][-1]  # training planned after the release


def test_attack_folded_evaluation_of_a_round_not_trained_or_malformed(hospital, base_dir):
    """Folding asks nothing an `evaluate` message could not: a round this hospital did not
    train (another run), a round other than the one the train message's arrays are the
    result of, and malformed values are refused; none costs anything, and a refused
    evaluation does not stop the training."""
    from .hostile import HONEST_RUN, honest_request

    before = len(Ledger.open(hospital.site.state_dir, hospital="h1").read())
    refused_training = ("privacy.enabled=false",)  # refused up front: only the evaluation part runs
    cases = [("run-evil", 1, "evaluation_not_after_training")]
    cases += [(HONEST_RUN, value, "evaluation_request_invalid")
              for value in (2, 0, -1, "1", True, 1.5, None, [1])]
    for run_id, value, reason in cases:
        reply = hospital.handle("train", _fold(honest_request(base_dir, *refused_training, round_=2,
                                                              run_id=run_id), value), Payload()).meta
        assert reply["status"] == "declined" and reply["reason"] == "policy_violation"
        answer = reply["evaluation"]
        assert answer["status"] == "declined" and answer["reason"] == reason, (value, answer)
        assert "release" not in answer and "ledger_head" in answer
        if reason == "evaluation_request_invalid":
            assert "evaluate_round" in answer["message"]
    assert len(Ledger.open(hospital.site.state_dir, hospital="h1").read()) == before
    # a refused evaluation does not stop an honest training
    reply = hospital.handle("train", _fold(honest_request(base_dir, round_=2, run_id=HONEST_RUN), 7),
                            Payload()).meta
    assert reply["status"] == "ok" and reply["evaluation"]["reason"] == "evaluation_request_invalid"
    kinds = [e.kind for e in Ledger.open(hospital.site.state_dir, hospital="h1").read()]
    assert kinds == ["train", "train"]


def test_attack_same_model_folded_and_as_evaluate(tmp_path, base_dir, veteran_state, cohort):
    """One global model is released once, whichever way it is asked for first."""
    from .hostile import HONEST_RUN, global_arrays, honest_request, site_policy, tiny_config

    arrays = global_arrays(tiny_config(base_dir))
    refused = ("privacy.enabled=false",)
    first_folded = _copy(tmp_path, veteran_state, cohort, site_policy(base_dir), "a")
    reply = first_folded.handle("train", _fold(honest_request(base_dir, *refused, round_=2,
                                                              run_id=HONEST_RUN), 1), Payload()).meta
    # a declined training still carries the evaluation it made
    assert reply["status"] == "declined" and reply["evaluation"]["status"] == "ok"
    again = first_folded.handle("evaluate", _evaluate(base_dir, arrays, 1), Payload()).meta
    assert again["status"] == "declined" and again["reason"] == "evaluation_repeated"
    assert len(_evaluations(first_folded)) == 1

    first_plain = _copy(tmp_path, veteran_state, cohort, site_policy(base_dir), "b")
    assert first_plain.handle("evaluate", _evaluate(base_dir, arrays, 1), Payload()).meta["status"] == "ok"
    reply = first_plain.handle("train", _fold(honest_request(base_dir, *refused, round_=2,
                                                             run_id=HONEST_RUN), 1), Payload()).meta
    assert reply["evaluation"]["status"] == "declined"
    assert reply["evaluation"]["reason"] == "evaluation_repeated"
    assert "release" not in reply["evaluation"]
    assert len(_evaluations(first_plain)) == 1


def test_attack_folded_evaluations_beyond_max_releases_per_run(tmp_path, base_dir, veteran_state, cohort):
    """policy.evaluation.max_releases_per_run counts folded and plain releases together."""
    from .hostile import HONEST_RUN, global_arrays, honest_request, site_policy, tiny_config

    arrays = global_arrays(tiny_config(base_dir))
    site = _copy(tmp_path, veteran_state, cohort,
                 site_policy(base_dir, evaluation=EvaluationPolicy(max_releases_per_run=1)))
    reply = site.handle("train", _fold(honest_request(base_dir, round_=2, run_id=HONEST_RUN), 1),
                        Payload()).meta
    assert reply["status"] == "ok" and reply["evaluation"]["status"] == "ok"
    # round 2 trained: its evaluation would be the run's second release, folded or not
    newer = [a + np.float32(0.01) for a in arrays]
    folded = site.handle("train", _fold(honest_request(base_dir, round_=3, run_id=HONEST_RUN,
                                                       arrays=newer), 2), Payload()).meta
    assert folded["evaluation"]["status"] == "declined"
    assert folded["evaluation"]["reason"] == "evaluation_release_cap"
    plain = site.handle("evaluate", _evaluate(base_dir, newer, 2), Payload()).meta
    assert plain["status"] == "declined" and plain["reason"] == "evaluation_release_cap"
    assert len(_evaluations(site)) == 1


def test_attack_folded_evaluation_with_release_none(base_dir, tmp_path, veteran_state, cohort):
    """evaluation.release = 'none': nothing leaves, folded or not; training goes on."""
    from .hostile import HONEST_RUN, honest_request, site_policy

    site = _copy(tmp_path, veteran_state, cohort,
                 site_policy(base_dir, evaluation=EvaluationPolicy(release="none")))
    reply = site.handle("train", _fold(honest_request(base_dir, round_=2, run_id=HONEST_RUN), 1),
                        Payload()).meta
    assert reply["status"] == "ok"
    assert reply["evaluation"]["status"] == "declined"
    assert reply["evaluation"]["reason"] == "evaluation_not_released"
    assert "release" not in reply["evaluation"] and not _evaluations(site)
