"""Site policy bound into the ledger: policy hashes, old (v1) ledgers, re-initialisation,
ledger heads, the auditor's key registry and `fedrg audit --policy/--keys/--heads`."""

from __future__ import annotations

import json

from privacy_ledger_helpers import CONFIG_HASH, FINGERPRINT, opacus_epsilon
from typer.testing import CliRunner

from fedrg import signing
from fedrg.audit.verify import audit_path
from fedrg.cli import app
from fedrg.federated.ledger_heads import HeadBook
from fedrg.policy import SitePolicy
from fedrg.privacy.ledger import (
    Ledger,
    canonical_bytes,
    head_extends,
    sha256_hex,
    signed_payload,
    verify_head,
)

runner = CliRunner()
POLICY = SitePolicy(target_delta=1e-5)


def _train(ledger, run_id, rnd, sigma=1.1, q=0.05, steps=30, policy=POLICY, delta=1e-5):
    eps = opacus_epsilon([*ledger.history(), (sigma, q, steps)], delta=delta)
    return ledger.append(run_id=run_id, round=rnd, noise_multiplier=sigma, sample_rate=q,
                         steps=steps, max_grad_norm=1.0, accountant="rdp", target_delta=delta,
                         epsilon=eps, budget=10.0, config_hash=CONFIG_HASH,
                         dataset_fingerprint=FINGERPRINT, policy_hash=policy.policy_hash())


def _registry(tmp_path, **keys):
    path = tmp_path / "keys.toml"
    path.write_text("\n".join(f'"{n}" = "{signing.raw_public_b64(k)}"' for n, k in keys.items()))
    return path


def test_entries_bind_the_policy_and_audit_checks_it(tmp_path):
    ledger = Ledger.open(tmp_path / "s", hospital="h1")
    e = _train(ledger, "r", 1)
    assert e.policy_hash == POLICY.policy_hash() and e.kind == "train" and e.version == 2
    assert ledger.verify().ok
    policy_file = tmp_path / "hospital.toml"
    policy_file.write_text("[policy]\ntarget_delta = 1e-5\n")
    assert audit_path(tmp_path / "s", policy=POLICY).ok
    res = runner.invoke(app, ["audit", str(tmp_path / "s"), "--policy", str(policy_file)])
    assert res.exit_code == 0, res.output
    # an entry outside the policy (noise below the floor, made under another policy)
    loose = SitePolicy(target_delta=1e-5, min_noise_multiplier=0.1)
    _train(ledger, "r", 2, sigma=0.45, q=0.01, steps=1, policy=loose)
    res = runner.invoke(app, ["audit", str(tmp_path / "s"), "--policy", str(policy_file)],
                        terminal_width=200)
    assert res.exit_code == 1
    text = " ".join(res.output.split())  # the console wraps at 80 columns
    assert "OUTSIDE POLICY" in text and "below the policy's floor 0.5" in text
    assert "not the policy given" in text


def test_old_v1_ledger_still_verifies_and_is_reported_without_policy(tmp_path):
    key = signing.load_or_create_signing_key(tmp_path / "s" / signing.PRIVATE_KEY_NAME)
    signing.load_or_create_signing_key(tmp_path / "s" / signing.PRIVATE_KEY_NAME)
    eps = opacus_epsilon([(1.1, 0.05, 30)], delta=1e-5)
    entry = {"version": 1, "seq": 0, "hospital": "h1", "run_id": "old", "round": 1,
             "mechanism": {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 30,
                           "max_grad_norm": 1.0, "accountant": "rdp"},
             "delta": 1e-5, "epsilon": eps, "budget": 10.0, "timestamp": "2026-01-01T00:00:00",
             "config_hash": CONFIG_HASH, "dataset_fingerprint": FINGERPRINT,
             "prev_hash": "0" * 64, "key_id": signing.key_id(key)}
    entry["signature"] = signing.sign(key, signed_payload(entry))
    line = canonical_bytes(entry)
    (tmp_path / "s" / "ledger.jsonl").write_bytes(line + b"\n")
    head = {"entries": 1, "last_hash": sha256_hex(line), "key_id": signing.key_id(key),
            "hospital": "h1"}
    head["signature"] = signing.sign(key, signed_payload(head))
    (tmp_path / "s" / "ledger_head.json").write_bytes(canonical_bytes(head))
    ledger = Ledger.open(tmp_path / "s", hospital="h1")
    assert ledger.read()[0].policy_hash is None
    plain = audit_path(tmp_path / "s")
    assert plain.ok and any("predate site policies" in w for w in plain.hospitals[0].warnings)
    checked = audit_path(tmp_path / "s", policy=POLICY).hospitals[0]
    assert not checked.ok and any("predate site policies" in p for p in checked.problems)
    _train(ledger, "new", 1)  # a new entry appends after the old one, in version 2
    assert [e.version for e in ledger.read()] == [1, 2]


def test_registry_key_decides_a_ledger_signed_by_another_key_is_unverified(tmp_path):
    ledger = Ledger.open(tmp_path / "s", hospital="h1")
    _train(ledger, "r", 1)
    trusted = _registry(tmp_path, h1=ledger.public_key)
    assert audit_path(tmp_path / "s", keys=trusted).hospitals[0].status == "OK"
    # someone wipes the state and writes a fresh ledger with a fresh key next to it
    other = signing.write_keypair(tmp_path / "o.pem", tmp_path / "o.pub")
    forged = _registry(tmp_path, h1=other.public_key())
    h = audit_path(tmp_path / "s", keys=forged).hospitals[0]
    assert h.status == "UNVERIFIED" and not h.ok
    res = runner.invoke(app, ["audit", str(tmp_path / "s"), "--keys", str(forged)],
                        terminal_width=200)
    assert res.exit_code == 1 and "UNVERIFIED" in res.output
    unknown = _registry(tmp_path, h2=ledger.public_key)
    assert audit_path(tmp_path / "s", keys=unknown).hospitals[0].status == "UNVERIFIED"
    # without a registry the key next to the ledger is used, with a warning saying so
    plain = audit_path(tmp_path / "s").hospitals[0]
    assert plain.ok and any("--keys REGISTRY" in w for w in plain.warnings)


def test_heads_extend_and_headbook_keeps_the_old_head_until_reinit(tmp_path):
    ledger = Ledger.open(tmp_path / "s", hospital="h1")
    h0 = ledger.signed_head()
    _train(ledger, "r", 1)
    h1 = ledger.signed_head()
    assert verify_head(h1, ledger.public_key) and h1["entries"] == 1
    assert head_extends(h0, h1) == (True, "") and ledger.extends(h1) and ledger.extends(h0)
    book = HeadBook(tmp_path / "run")
    assert book.observe("h1", h1, round_=1) is None
    # wiped: a fresh state dir has a new key and no entries
    wiped = Ledger.open(tmp_path / "wiped", hospital="h1")
    assert not wiped.extends(h1)
    alert = book.observe("h1", wiped.signed_head(), round_=2)
    assert alert and not alert["reinitialised"] and "state wiped" in alert["message"]
    assert HeadBook(tmp_path / "run").get("h1") == h1  # the old head stays, persisted
    wiped.reinitialise(reason="disk replaced", previous_head=h1, policy_hash=POLICY.policy_hash(),
                       accountant="rdp", target_delta=1e-5, budget=10.0)
    alert = book.observe("h1", wiped.signed_head(), round_=3)
    assert alert and alert["reinitialised"]
    assert book.get("h1")["reinit_seq"] == 0
    assert ledger.signed_head()["reinit_seq"] == -1


def test_site_reinit_command_and_audit_of_wiped_and_reinitialised_state(tmp_path):
    old = Ledger.open(tmp_path / "old", hospital="h1")
    _train(old, "r", 1)
    heads = tmp_path / "run" / "ledger_heads.json"
    HeadBook(tmp_path / "run").observe("h1", old.signed_head(), round_=1)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    # nothing here: the audit names the hospital the server saw
    res = runner.invoke(app, ["audit", str(fresh), "--heads", str(heads)], terminal_width=200)
    assert res.exit_code == 1 and "NOT EXTENDING" in res.output and "h1" in res.output
    res = runner.invoke(app, ["site", "reinit", "--state-dir", str(fresh), "--name", "h1",
                              "--reason", "", "--previous-head", str(heads)])
    assert res.exit_code == 1 and "reason" in res.output
    res = runner.invoke(app, ["site", "reinit", "--state-dir", str(fresh), "--name", "h1",
                              "--reason", "state disk lost", "--previous-head", str(heads)])
    assert res.exit_code == 0, res.output
    entry = Ledger.open(fresh, hospital="h1").read()[0]
    assert entry.kind == "reinit" and entry.details["reason"] == "state disk lost"
    assert entry.details["previous_head"]["entries"] == 1
    res = runner.invoke(app, ["site", "reinit", "--state-dir", str(fresh), "--name", "h1",
                              "--reason", "again"])
    assert res.exit_code == 1 and "already holds" in res.output
    res = runner.invoke(app, ["audit", str(fresh), "--heads", str(heads), "--json"])
    out = json.loads(res.output)["hospitals"][0]
    assert out["reinits"] and "state disk lost" in out["reinits"][0]
    assert out["extends_last_head"] is True and any("re-initialis" in w for w in out["warnings"])
