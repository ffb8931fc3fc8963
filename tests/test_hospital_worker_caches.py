"""What one worker process keeps between messages (model, cohort, RDP vectors) never carries
one message's or one hospital's state into another, and is read again when its files change."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from model_fixtures import tiny_cohort, tiny_data_cfg, tiny_model_cfg

from fedrg.config import SiteConfig, load_config, to_run_config
from fedrg.hospital import site as site_mod
from fedrg.hospital.site import HospitalSite
from fedrg.model.adapter import RadiogenomicsModel, build_model
from fedrg.model.payload import get_adapter_arrays
from fedrg.payload import Payload
from fedrg.policy import EvaluationPolicy, SitePolicy
from fedrg.privacy import accounting, rdp_store
from fedrg.privacy.dpsgd import use_seeded_noise_for_tests
from fedrg.train.loop import collate


def _cfg(base_dir, *extra):
    return load_config(None, [
        f"model.base={base_dir}", "model.encoder_width=16", "model.lora_rank=4",
        "model.max_report_tokens=24", "model.public_init=none", "data.image_shape=[32, 32]",
        "training.local_epochs=0.5", "training.batch_size=8", "federation.rounds=2", *extra])


def _policy(base_dir, **kw):
    from fedrg.model.fingerprint import model_content_hash

    return SitePolicy(allowed_base_models=[model_content_hash(base_dir)], **kw)


def _site(name, cohort, state_dir, policy):
    site = HospitalSite(SiteConfig(name=name, cohort=str(cohort), state_dir=str(state_dir), policy=policy))
    site._release_seed = 7  # tests only: the release noise repeats
    return site


def _request(cfg, global_arrays, rnd=1, run_id="r1"):
    p = Payload(meta={"config": to_run_config(cfg), "round": rnd, "run_id": run_id,
                      "hospitals_in_round": 3})
    p.put_array_list("global", global_arrays)
    return p


@pytest.fixture
def fresh_worker(monkeypatch):
    """A worker process's caches as a new process has them (empty)."""
    def reset():
        monkeypatch.setattr(site_mod, "_MODELS", {})
        accounting.clear_accounting_caches()
        monkeypatch.setattr(rdp_store, "_LOADED", {})
    reset()
    yield reset
    accounting.clear_accounting_caches()


# ------------------------------------------------------------------ one pass of evaluation

def test_evaluation_outputs_are_exactly_the_separate_methods(base_dir, dataset):
    """The one-pass evaluation (shared encoding and image features) returns the very values
    of per_example_loss, marker_probabilities (both) and generate_reports."""
    model = build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the initial adapter, so every path carries signal
        for _, p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    batch = collate([dataset[i] for i in range(min(6, len(dataset)))])
    got = model.evaluation_outputs(batch, generate=True)
    with torch.no_grad():
        loss = model.per_example_loss(batch)
    assert torch.equal(got["loss"], loss)
    assert torch.equal(got["probs_image"], model.marker_probabilities(batch, withhold_genomics=True))
    assert torch.equal(got["probs_multimodal"], model.marker_probabilities(batch))
    assert got["generated"] == model.generate_reports(batch)
    # the two probabilities differ (genomics withheld or not): the test compares real signal
    assert not torch.equal(got["probs_image"], got["probs_multimodal"])
    assert model.evaluation_outputs(batch, generate=False)["generated"] is None


def test_a_subclass_overriding_an_evaluation_method_is_evaluated_through_it(base_dir, dataset):
    class Calibrated(RadiogenomicsModel):
        def marker_probabilities(self, batch, *, withhold_genomics=False, test_time_flip=True):
            return torch.full((len(batch["patient_id"]), 3), 0.25)

    model = build_model(tiny_model_cfg(base_dir), tiny_data_cfg(), seed=0)
    model.__class__ = Calibrated
    batch = collate([dataset[i] for i in range(4)])
    got = model.evaluation_outputs(batch, generate=False)
    assert torch.equal(got["probs_multimodal"], torch.full((4, 3), 0.25))


# ------------------------------------------------------------------ isolation on one worker

def test_two_hospitals_on_one_worker_never_see_each_others_state(tmp_path, base_dir, fx_root,
                                                                  fresh_worker):
    """h1 trains on the worker's cached model, then h2 trains and evaluates on it: h2's update
    and release equal those of h2 alone in a fresh process (same seeds), bit for bit."""
    cfg = _cfg(base_dir)
    policy = _policy(base_dir, evaluation=EvaluationPolicy(release="exact"))
    c1 = tiny_cohort(fx_root, patients=24, seed=31)
    c2 = tiny_cohort(fx_root, patients=24, seed=32)
    start = get_adapter_arrays(site_mod._model_for(cfg))

    def h2_round(site):
        state = Payload()
        with use_seeded_noise_for_tests(2):
            reply = site.handle("train", _request(cfg, start), state)
        assert reply.meta["status"] == "ok", reply.meta
        evaluation = site.handle("evaluate", _request(cfg, start, rnd=0), Payload())
        assert evaluation.meta["status"] == "ok", evaluation.meta
        return state.array_list("pending"), evaluation.meta["release"]

    h1, state1 = _site("h1", c1, tmp_path / "s1", policy), Payload()
    with use_seeded_noise_for_tests(1):
        assert h1.handle("train", _request(cfg, start), state1).meta["status"] == "ok"
    trained_by_h1 = get_adapter_arrays(site_mod._model_for(cfg))
    assert any(not np.array_equal(a, b) for a, b in zip(trained_by_h1, start, strict=True))
    shared_update, shared_release = h2_round(_site("h2", c2, tmp_path / "s2", policy))

    fresh_worker()  # h2 alone, as a new worker process would answer it
    alone_update, alone_release = h2_round(_site("h2", c2, tmp_path / "s2-alone", policy))

    assert len(shared_update) == len(alone_update)
    for a, b in zip(shared_update, alone_update, strict=True):
        np.testing.assert_array_equal(a, b)
    assert json.dumps(shared_release, sort_keys=True) == json.dumps(alone_release, sort_keys=True)
    # and h1's training is not h2's (the comparison above is not between two no-ops)
    h1_update = state1.array_list("pending")
    assert any(not np.array_equal(a, b) for a, b in zip(h1_update, shared_update, strict=True))


# ------------------------------------------------------------------ invalidation

def test_a_changed_cohort_is_loaded_again(tmp_path, base_dir, fx_root):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort(fx_root, patients=24, seed=33), cohort)
    site = _site("h1", cohort, tmp_path / "state", _policy(base_dir))
    cfg = _cfg(base_dir)
    first = site.cohort(cfg)
    assert site.cohort(cfg) is first  # unchanged files: kept
    manifest = cohort / "manifest.csv"
    text = manifest.read_text()
    assert text.count("IMPRESSION:") > 1
    manifest.write_text(text.replace("IMPRESSION:", "CONCLUSION:"))  # every report rewritten
    second = site.cohort(cfg)
    assert second is not first and second.fingerprint != first.fingerprint
    reports = [second.data.train[i]["report"] for i in range(len(second.data.train))]
    assert any("CONCLUSION:" in r for r in reports) and not any("IMPRESSION:" in r for r in reports)


def test_a_changed_local_base_model_is_built_again(tmp_path, base_dir, fresh_worker):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    cfg = _cfg(base)
    model = site_mod._model_for(cfg)
    assert site_mod._model_for(cfg) is model
    config = base / "config.json"
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
    assert site_mod._model_for(cfg) is not model


# ------------------------------------------------------------------ signed RDP vectors

def _rdp_site(tmp_path, base_dir, fx_root, name="h1"):
    return _site(name, tiny_cohort(fx_root, patients=24, seed=34), tmp_path / name, _policy(base_dir))


def _rdp_cfg(base_dir):
    return _cfg(base_dir, "training.batch_size=6")


def _would_refuse(site, cfg):
    return site.would_refuse(cfg, round_=1, hospitals_in_round=3, run_id="r1")


def test_a_fresh_process_uses_the_rdp_vectors_its_hospital_signed(tmp_path, base_dir, fx_root,
                                                                  fresh_worker, monkeypatch):
    cfg = _rdp_cfg(base_dir)
    site = _rdp_site(tmp_path, base_dir, fx_root)
    assert _would_refuse(site, cfg) is None
    store = tmp_path / "h1" / rdp_store.STORE_NAME
    stored = {(s, q): np.array(v) for s, q, v in json.loads(store.read_text())["vectors"]}
    assert stored
    for (sigma, q), vector in stored.items():
        assert np.array_equal(vector, accounting.compute_rdp_vector(noise_multiplier=sigma, sample_rate=q))

    fresh_worker()
    computed = []
    real = accounting.compute_rdp_vector
    monkeypatch.setattr(accounting, "compute_rdp_vector",
                        lambda **kw: computed.append(kw) or real(**kw))
    assert _would_refuse(site, cfg) is None
    assert computed == []  # loaded, verified, not recomputed
    for pair, vector in stored.items():
        assert np.array_equal(accounting.known_rdp_vectors()[pair], vector)


@pytest.mark.parametrize("damage", ["value", "other_key"])
def test_an_rdp_store_not_signed_by_the_hospital_is_ignored(tmp_path, base_dir, fx_root,
                                                            fresh_worker, monkeypatch, damage):
    from fedrg import signing

    cfg = _rdp_cfg(base_dir)
    site = _rdp_site(tmp_path, base_dir, fx_root)
    assert _would_refuse(site, cfg) is None
    store = tmp_path / "h1" / rdp_store.STORE_NAME
    doc = json.loads(store.read_text())
    sigma, q, vector = doc["vectors"][0]
    doc["vectors"][0][2] = [v / 100 for v in vector]  # an epsilon 100 times too small
    if damage == "other_key":  # well signed, by a key that is not the hospital's
        other = signing.write_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
        body = {k: v for k, v in doc.items() if k != "signature"}
        doc["signature"] = signing.sign(other, rdp_store._payload(body))
    store.write_text(json.dumps(doc))

    fresh_worker()
    computed = []
    real = accounting.compute_rdp_vector
    monkeypatch.setattr(accounting, "compute_rdp_vector",
                        lambda **kw: computed.append(kw) or real(**kw))
    assert _would_refuse(site, cfg) is None
    assert computed  # recomputed ...
    assert np.array_equal(accounting.known_rdp_vectors()[(sigma, q)],
                          real(noise_multiplier=sigma, sample_rate=q))  # ... not the file's
    rewritten = json.loads(store.read_text())  # and the store is good again
    assert rewritten["vectors"][0][2] == [float(x) for x in real(noise_multiplier=sigma, sample_rate=q)]


def test_a_hospital_stores_only_the_rdp_vectors_its_own_messages_computed(tmp_path, base_dir,
                                                                          fx_root, fresh_worker):
    cfg = _rdp_cfg(base_dir)
    h1 = _rdp_site(tmp_path, base_dir, fx_root, "h1")
    h2 = _site("h2", tiny_cohort(fx_root, patients=30, seed=35), tmp_path / "h2", _policy(base_dir))
    assert _would_refuse(h1, cfg) is None and _would_refuse(h2, cfg) is None
    pairs = {name: {(s, q) for s, q, _ in json.loads(
        (tmp_path / name / rdp_store.STORE_NAME).read_text())["vectors"]} for name in ("h1", "h2")}
    assert pairs["h1"] and pairs["h2"] and not pairs["h1"] & pairs["h2"]


def test_tree_stamp_sees_added_rewritten_touched_and_removed_files(tmp_path):
    from fedrg.paths import tree_stamp

    root = tmp_path / "cohort"
    assert tree_stamp(root) == ""
    (root / "images").mkdir(parents=True)
    (root / "manifest.csv").write_text("a\n")
    stamps = [tree_stamp(root)]
    (root / "images" / "p1.nii").write_bytes(b"x")  # added
    stamps.append(tree_stamp(root))
    (root / "images" / "p1.nii").write_bytes(b"yy")  # rewritten
    stamps.append(tree_stamp(root))
    st = (root / "manifest.csv").stat()
    os.utime(root / "manifest.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    stamps.append(tree_stamp(root))
    (root / "images" / "p1.nii").unlink()  # removed
    stamps.append(tree_stamp(root))
    assert len(set(stamps)) == len(stamps) and all(stamps)
    assert tree_stamp(root) == stamps[-1]  # nothing changed: the same stamp
