"""Attack: a server that queries evaluation again and again, against the real site."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import tiny_cohort

from fedrg.audit.verify import audit_path
from fedrg.config import SiteConfig, load_config, to_run_config
from fedrg.federated.local import LocalTransport
from fedrg.federated.payload import Payload
from fedrg.federated.runner import run_federation
from fedrg.privacy.ledger import Ledger
from fedrg.privacy.policy import EvaluationPolicy, SitePolicy

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
    row = result.metrics["rounds"][0]
    h1, h2 = transport.sites[1], transport.sites[2]
    # the split is the site's own: about 25 % of the patients, not the 99 % asked for
    n_val = len(h1.cohort(cfg).data.val)
    assert 0 < n_val < 0.5 * 24
    # one release (h1's), noisy: the count is not the exact validation size
    assert row["auroc_multimodal"].keys() == set(cfg.data.markers)
    ledger1 = Ledger.open(sites[0].state_dir, hospital="h1")
    releases = [e for e in ledger1.read() if e.kind == "evaluation"]
    assert len(releases) == 1 and releases[0].round == 1 and releases[0].sample_rate == 1.0
    assert releases[0].epsilon > next(e for e in ledger1.read() if e.kind == "train").epsilon
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
    # the one release is in the ledger and in the audit, within the budget
    audit = audit_path(sites[0].state_dir)
    assert audit.ok and audit.hospitals[0].evaluation_releases == 1
