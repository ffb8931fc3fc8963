"""Attacks on the hospital's one round plan, against the real site (issue 23, item 3).

* A server asks for no evaluation while training, then for evaluation releases of models
  changed a little each time: the run must still end within the hospital's per-run cap.
* A server sends requests the hospital refuses, to read its cohort size from the refusals:
  two hospitals with different cohorts must refuse with byte-identical replies.
* A hospital's state directory is wiped and the server says nothing: the hospital must
  notice by itself (its roster-pinned key, the anchor beside its signing key).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import tiny_cohort

from fedrg.config import SiteConfig
from fedrg.hospital.site import HospitalSite
from fedrg.payload import Payload
from fedrg.policy import EvaluationPolicy
from fedrg.privacy.accounting import PrivacyHistory, epsilon_of
from fedrg.privacy.ledger import Ledger

from .hostile import HONEST_RUN, honest_request, request, site_policy, tiny_config

pytestmark = pytest.mark.slow


def _run_epsilon(site: HospitalSite, run_id: str) -> float:
    entries = Ledger.open(site.site.state_dir, hospital=site.site.name).read()
    segs = [e.segment for e in entries if e.run_id == run_id and e.private and e.steps > 0]
    return epsilon_of(PrivacyHistory(segs), target_delta=entries[-1].delta)


def _evaluate(site: HospitalSite, cfg, arrays, rnd: int, run_id: str) -> Payload:
    from fedrg.config import to_run_config

    p = Payload(meta={"config": to_run_config(cfg), "round": rnd, "run_id": run_id})
    p.put_array_list("global", arrays)
    return site.handle("evaluate", p, Payload())


def test_attack_evaluation_exceeds_run_cap(tmp_path, base_dir, cohort):
    """epsilon_per_run = 2: the server trains two rounds asking for no evaluation
    (fraction_evaluate = 0), then asks for a release after each round, and more, with the
    arrays changed a little each time (no two releases of one model). On 2f5b27c the run
    ended at epsilon 2.126: the reserve came from the request and releases were checked
    against the lifetime budget only. Every release is checked against the run's cap now,
    and the reserve comes from the policy."""
    policy = site_policy(base_dir, epsilon_per_run=2.0, require_secagg=False,
                         evaluation=EvaluationPolicy(release="dp", epsilon_per_release=0.5))
    site = HospitalSite(SiteConfig(name="h1", cohort=str(cohort), state_dir=str(tmp_path / "s"),
                                   policy=policy))
    run = "run-greedy"
    cfg = tiny_config(base_dir, "federation.fraction_evaluate=0", "secagg.enabled=false")
    rng = np.random.default_rng(0)
    arrays = honest_request(base_dir).array_list("global")
    answers = []
    for rnd in (1, 2):
        reply = site.handle("train", request(cfg, round_=rnd, run_id=run, arrays=arrays), Payload())
        assert reply.meta["status"] == "ok", reply.meta
        arrays = [a + u for a, u in zip(arrays, reply.array_list("update"), strict=True)]
        for _ in range(3):  # the round's release, and two more asks with nudged arrays
            nudged = [a + rng.normal(0, 1e-4, a.shape).astype(a.dtype) for a in arrays]
            answers.append(_evaluate(site, cfg, nudged, rnd, run).meta)
    released = [a for a in answers if a["status"] == "ok"]
    assert released, answers  # the policy's reserve leaves room for the releases it allows
    assert {a["reason"] for a in answers if a["status"] != "ok"} <= {
        "evaluation_not_after_training", "evaluation_run_cap"}
    assert _run_epsilon(site, run) <= 2.0 * (1 + 1e-6)
    assert all(a["epsilon"] <= 2.0 * (1 + 1e-6) for a in released)


def _veteran(tmp_path: Path, base_dir, patients: int, name: str, **policy) -> HospitalSite:
    cohort = tiny_cohort(tmp_path / f"fx-{name}", patients=patients, seed=41)
    site = HospitalSite(SiteConfig(name="h", cohort=str(cohort), state_dir=str(tmp_path / name),
                                   policy=site_policy(base_dir, require_secagg=False, **policy)))
    reply = site.handle("train", honest_request(base_dir, "secagg.enabled=false", round_=1,
                                                run_id=HONEST_RUN), Payload())
    assert reply.meta["status"] == "ok", reply.meta
    return site


def test_attack_refusal_reveals_cohort_size(tmp_path, base_dir):
    """Two hospitals, 24 and 40 patients, the same policy, each after one honest round (so
    both refuse without reading patient files). Every refusal a server can provoke at no
    privacy cost (a flood of steps at batch 1, a batch above the sample-rate cap, a noise
    floor the calibration cannot meet, a fixed sigma below the floor) must read the same at
    both: on 2f5b27c the steps refusal said "this request makes 1800 steps" (n_train = 18)
    and the batch refusal "allowed: <= 9 for this site"."""
    small = _veteran(tmp_path, base_dir, 24, "small")
    large = _veteran(tmp_path, base_dir, 40, "large")
    assert small._known_train_size(tiny_config(base_dir)) != large._known_train_size(tiny_config(base_dir))
    asks = [
        ("training.batch_size=1", "training.local_epochs=100"),
        ("training.batch_size=1000",),
        ("privacy.noise_multiplier=0.1",),
    ]
    for overrides in asks:
        replies = []
        for site in (small, large):
            hostile = honest_request(base_dir, "secagg.enabled=false", *overrides, round_=1,
                                     run_id="run-probe")
            reply = site.handle("train", hostile, Payload()).meta
            assert reply["status"] == "declined", (overrides, reply)
            replies.append({k: v for k, v in reply.items() if k not in ("site", "ledger_head")})
        assert replies[0] == replies[1], overrides
    # a noise floor the calibrated sigma falls below: the refusal does not carry that sigma
    floor = {"min_noise_multiplier": 20.0}
    replies = []
    for site in (small, large):
        strict = HospitalSite(site.site.model_copy(update={"policy": site.site.policy.model_copy(update=floor)}))
        reply = strict.handle("train", honest_request(base_dir, "secagg.enabled=false", round_=1,
                                                      run_id="run-floor"), Payload()).meta
        assert reply["status"] == "declined" and reply["setting"].startswith("privacy.noise_multiplier")
        replies.append({k: v for k, v in reply.items() if k not in ("site", "ledger_head")})
    assert replies[0] == replies[1]


def _wiped_round_two(tmp_path: Path, base_dir, cohort, *, key_outside: bool):
    from fedrg.federated.secure import provision_roster

    key = tmp_path / "keys" / "ledger_ed25519.pem" if key_outside else None
    site_cfg = SiteConfig(name="h1", cohort=str(cohort), state_dir=str(tmp_path / "state"),
                          signing_key=str(key) if key else "",
                          policy=site_policy(base_dir, require_secagg=False))
    if not key_outside:  # the operator's roster pins h1's long-term key
        site_cfg = provision_roster([site_cfg], tmp_path / "roster.toml")[0]
    site = HospitalSite(site_cfg)
    cfg = tiny_config(base_dir, "secagg.enabled=false")
    assert site.handle("train", request(cfg, round_=1, run_id="r"), Payload()).meta["status"] == "ok"
    shutil.rmtree(site_cfg.state_dir)  # the wipe; the server says nothing (no ledger_head)
    reply = HospitalSite(site_cfg).handle("train", request(cfg, round_=2, run_id="r"), Payload())
    return site_cfg, reply.meta


@pytest.mark.parametrize("key_outside", [False, True], ids=["key-in-state-roster", "key-outside"])
def test_attack_state_wiped_server_silent(tmp_path, base_dir, cohort, key_outside):
    """The state directory is wiped between rounds and the server omits the old head. On
    2f5b27c the hospital trained round 2 on a fresh ledger (a fresh lifetime budget). Now it
    refuses by itself: a wiped key is not the one its pinned roster lists; a key kept
    elsewhere has an anchor that pins the wiped ledger. Nothing is written, nothing leaves;
    `fedrg site reinit` stays the one (recorded) way to train again."""
    from typer.testing import CliRunner

    from fedrg.cli import app

    site_cfg, meta = _wiped_round_two(tmp_path, base_dir, cohort, key_outside=key_outside)
    assert meta["status"] == "declined" and meta["reason"] == "ledger_not_extending", meta
    assert str(tmp_path) not in meta["message"]  # no path leaves the site
    assert not (Path(site_cfg.state_dir) / "ledger.jsonl").exists()
    args = ["site", "reinit", "--state-dir", site_cfg.state_dir, "--name", "h1",
            "--reason", "state disk replaced"]
    if key_outside:
        args += ["--signing-key", site_cfg.signing_key]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    if not key_outside:  # the new key reaches the roster the operator publishes
        from fedrg.federated.secure import provision_roster

        site_cfg = provision_roster([site_cfg], tmp_path / "roster.toml")[0]
    cfg = tiny_config(base_dir, "secagg.enabled=false")
    again = HospitalSite(site_cfg).handle("train", request(cfg, round_=2, run_id="r"), Payload())
    assert again.meta["status"] == "ok", again.meta
    entries = Ledger.open(site_cfg.state_dir, hospital="h1",
                          signing_key_path=site_cfg.signing_key or None).read()
    assert [e.kind for e in entries] == ["reinit", "train"]
    if key_outside:
        assert entries[0].details["previous_anchor"]["first_entry_hash"]
