"""Privacy ledger: keys, signed hash chain, tamper detection, atomic appends."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from privacy_ledger_helpers import CONFIG_HASH, FINGERPRINT, STANDARD_ROUNDS, write_ledger

from fedrg import signing
from fedrg.errors import BudgetExceededError, LedgerError
from fedrg.privacy.ledger import (
    GENESIS_HASH,
    HEAD_NAME,
    LEDGER_NAME,
    Ledger,
    canonical_bytes,
    sha256_hex,
    signed_payload,
    verify_ledger,
    verify_ledger_bytes,
)


@pytest.fixture(scope="module")
def reference_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real five-entry, two-run ledger (built once); tests work on copies."""
    state = tmp_path_factory.mktemp("ref") / "state"
    write_ledger(state, STANDARD_ROUNDS)
    return state


@pytest.fixture
def state(reference_ledger: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "state"
    shutil.copytree(reference_ledger, dst)
    return dst


def _lines(state: Path) -> list[bytes]:
    return (state / LEDGER_NAME).read_bytes().splitlines(keepends=True)


def _write_lines(state: Path, lines: list[bytes]) -> None:
    (state / LEDGER_NAME).write_bytes(b"".join(lines))


def _pub(state: Path) -> Path:
    return state / signing.PUBLIC_KEY_NAME


# --------------------------------------------------------------------------- keys

def test_keypair_files_follow_contract(tmp_path: Path) -> None:
    priv, pub = signing.default_key_paths(tmp_path / "st")
    assert priv.name == "ledger_ed25519.pem" and pub.name == "ledger_ed25519.pub"
    key = signing.load_or_create_signing_key(priv)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    again = signing.load_or_create_signing_key(priv)
    assert signing.key_id(again) == signing.key_id(key)
    assert signing.key_id(signing.load_public_key(pub)) == signing.key_id(key)
    with pytest.raises(LedgerError, match="already exists"):
        signing.write_keypair(priv, pub)


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    priv = tmp_path / "k.pem"
    signing.load_or_create_signing_key(priv)
    os.chmod(priv, 0o644)
    with pytest.raises(LedgerError, match="chmod 600"):
        signing.load_private_key(priv)


def test_noncanonical_base64_signature_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    sig = signing.sign(key, b"msg")
    assert signing.verify(key.public_key(), b"msg", sig)
    assert sig.endswith("==")
    # The last data character carries 4 unused bits: flipping them decodes to the same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    i = alphabet.index(sig[-3])
    twin = sig[:-3] + alphabet[i ^ 1] + "=="
    assert not signing.verify(key.public_key(), b"msg", twin)


# --------------------------------------------------------------------------- round trip

def test_entries_are_chained_signed_and_canonical(state: Path) -> None:
    ledger = Ledger(state)
    entries = ledger.read()
    assert [e.seq for e in entries] == list(range(len(STANDARD_ROUNDS)))
    assert entries[0].prev_hash == GENESIS_HASH
    raw = _lines(state)
    for i, line in enumerate(raw):
        obj = json.loads(line)
        assert canonical_bytes(obj) + b"\n" == line
        assert set(obj["mechanism"]) == {"noise_multiplier", "sample_rate", "steps",
                                         "max_grad_norm", "accountant"}
        for k in ("run_id", "round", "delta", "epsilon", "budget", "timestamp",
                  "config_hash", "dataset_fingerprint", "prev_hash", "signature"):
            assert k in obj
        if i:
            assert obj["prev_hash"] == sha256_hex(raw[i - 1].rstrip(b"\n"))
        assert signing.verify(ledger.public_key, signed_payload(obj), obj["signature"])
    assert ledger.history() == [(s, q, n) for _, _, s, q, n in STANDARD_ROUNDS]
    eps = [e.epsilon for e in entries]
    assert eps == sorted(eps) and eps[0] > 0
    assert {e.run_id for e in entries} == {"run-a", "run-b"}
    assert entries[-1].config_hash == CONFIG_HASH
    assert entries[-1].dataset_fingerprint == FINGERPRINT


def test_ledger_spans_runs_when_reopened(state: Path) -> None:
    before = Ledger(state).read()
    ledger, new = write_ledger(state, [("run-c", 1, 1.0, 0.05, 10)])
    after = ledger.read()
    assert after[: len(before)] == before
    assert new[0].seq == len(before) and new[0].epsilon > before[-1].epsilon
    assert verify_ledger(state / LEDGER_NAME, _pub(state)).ok


def test_empty_ledger_is_valid(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "s", hospital="h")
    assert ledger.read() == [] and ledger.history() == [] and ledger.epsilon_spent() == 0.0


# --------------------------------------------------------------------------- tampering

def _edit_epsilon(state: Path) -> None:
    lines = _lines(state)
    obj = json.loads(lines[2])
    obj["epsilon"] = obj["epsilon"] / 2
    lines[2] = canonical_bytes(obj) + b"\n"
    _write_lines(state, lines)


def _edit_number_in_text(state: Path) -> None:
    lines = _lines(state)
    lines[1] = lines[1].replace(b'"steps":30', b'"steps":3', 1)
    _write_lines(state, lines)


def _drop_middle(state: Path) -> None:
    lines = _lines(state)
    del lines[2]
    _write_lines(state, lines)


def _reorder(state: Path) -> None:
    lines = _lines(state)
    lines[1], lines[3] = lines[3], lines[1]
    _write_lines(state, lines)


def _swap_signatures(state: Path) -> None:
    lines = _lines(state)
    a, b = json.loads(lines[0]), json.loads(lines[1])
    a["signature"], b["signature"] = b["signature"], a["signature"]
    lines[0], lines[1] = canonical_bytes(a) + b"\n", canonical_bytes(b) + b"\n"
    _write_lines(state, lines)


def _truncate_last_line(state: Path) -> None:
    data = (state / LEDGER_NAME).read_bytes()
    (state / LEDGER_NAME).write_bytes(data[:-40])


def _drop_last(state: Path) -> None:
    _write_lines(state, _lines(state)[:-1])


def _whitespace(state: Path) -> None:
    lines = _lines(state)
    lines[0] = lines[0].replace(b'","', b'", "', 1)
    _write_lines(state, lines)


@pytest.mark.parametrize(
    ("tamper", "codes"),
    [
        (_edit_epsilon, {"signature", "chain"}),
        (_edit_number_in_text, {"signature", "chain"}),
        (_drop_middle, {"seq", "chain"}),
        (_reorder, {"seq", "chain"}),
        (_swap_signatures, {"signature", "chain"}),
        (_truncate_last_line, {"truncated"}),
        (_drop_last, {"dropped_tail"}),
        (_whitespace, {"noncanonical"}),
    ],
    ids=["edited-number", "edited-text", "dropped-line", "reordered", "swapped-signature",
         "truncated-last-line", "dropped-last-line", "whitespace"],
)
def test_tampering_is_detected(state: Path, tamper, codes: set[str]) -> None:
    assert verify_ledger(state / LEDGER_NAME, _pub(state)).ok
    tamper(state)
    report = verify_ledger(state / LEDGER_NAME, _pub(state))
    assert not report.ok
    assert codes <= report.codes, report.summary()
    with pytest.raises(LedgerError):
        Ledger(state).read()


def test_ledger_signed_by_another_key_is_detected(state: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_ledger(other, STANDARD_ROUNDS)  # a complete, self-consistent forgery
    for name in (LEDGER_NAME, HEAD_NAME):
        shutil.copy(other / name, state / name)
    report = verify_ledger(state / LEDGER_NAME, _pub(state))
    assert "foreign_key" in report.codes and "head" in report.codes
    assert verify_ledger(other / LEDGER_NAME, _pub(other)).ok


def test_resigned_forgery_with_another_key_is_detected(state: Path) -> None:
    """Re-sign an edited entry with a fresh key and rewrite the chain after it."""
    lines = _lines(state)
    forger = Ed25519PrivateKey.generate()
    prev = GENESIS_HASH
    out = []
    for i, line in enumerate(lines):
        obj = json.loads(line)
        if i == 1:
            obj["epsilon"] = 0.01
        obj["prev_hash"] = prev
        obj["signature"] = signing.sign(forger, signed_payload(obj))
        raw = canonical_bytes(obj)
        prev = sha256_hex(raw)
        out.append(raw + b"\n")
    _write_lines(state, out)
    report = verify_ledger(state / LEDGER_NAME, _pub(state))
    assert {"signature"} <= report.codes and not report.ok


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_changing_any_byte_is_detected(reference_ledger: Path, data: st.DataObject) -> None:
    raw = (reference_ledger / LEDGER_NAME).read_bytes()
    head = (reference_ledger / HEAD_NAME).read_bytes()
    pub = signing.load_public_key(_pub(reference_ledger))
    assert verify_ledger_bytes(raw, pub, path=Path("x"), head=head).ok
    pos = data.draw(st.integers(0, len(raw) - 1), label="position")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]), label="byte")
    tampered = raw[:pos] + bytes([new]) + raw[pos + 1:]
    report = verify_ledger_bytes(tampered, pub, path=Path("x"), head=head)
    assert not report.ok


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_deleting_or_inserting_bytes_is_detected(reference_ledger: Path, data) -> None:
    raw = (reference_ledger / LEDGER_NAME).read_bytes()
    head = (reference_ledger / HEAD_NAME).read_bytes()
    pub = signing.load_public_key(_pub(reference_ledger))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        n = data.draw(st.integers(1, 50))
        tampered = raw[:pos] + raw[pos + n:]
    else:
        tampered = raw[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + raw[pos:]
    assert not verify_ledger_bytes(tampered, pub, path=Path("x"), head=head).ok


# --------------------------------------------------------------------------- writing

def _append_args(**over):
    args = dict(run_id="run-z", round=1, noise_multiplier=1.0, sample_rate=0.05, steps=10,
                max_grad_norm=1.0, accountant="rdp", target_delta=1e-5, epsilon=9.0,
                budget=10.0, config_hash=CONFIG_HASH, dataset_fingerprint=FINGERPRINT)
    args.update(over)
    return args


def test_crash_during_replace_leaves_previous_ledger_intact(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (state / LEDGER_NAME).read_bytes()
    head_before = (state / HEAD_NAME).read_bytes()
    ledger = Ledger.open(state, hospital="hospital-1")

    def boom(src, dst):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(LedgerError, match="previous ledger is intact"):
        ledger.append(**_append_args())
    monkeypatch.undo()
    assert (state / LEDGER_NAME).read_bytes() == before
    assert (state / HEAD_NAME).read_bytes() == head_before
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]  # temp file removed
    assert verify_ledger(state / LEDGER_NAME, _pub(state)).ok
    ledger.append(**_append_args())  # and the ledger still takes the next entry
    assert len(ledger.read()) == len(STANDARD_ROUNDS) + 1


def test_crash_mid_write_leaves_previous_ledger_intact(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception after half the bytes are written (in the temp file) changes nothing."""
    import fedrg.privacy.ledger as ledger_mod

    before = (state / LEDGER_NAME).read_bytes()
    real_fsync = os.fsync

    def fsync_then_die(fd):
        real_fsync(fd)
        raise OSError(5, "I/O error (injected)")

    monkeypatch.setattr(ledger_mod.os, "fsync", fsync_then_die)
    with pytest.raises(LedgerError):
        Ledger.open(state, hospital="hospital-1").append(**_append_args())
    monkeypatch.undo()
    assert (state / LEDGER_NAME).read_bytes() == before


def test_crash_between_ledger_and_head_is_tolerated(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedrg.privacy.ledger as ledger_mod

    ledger = Ledger.open(state, hospital="hospital-1")
    real = ledger_mod.atomic_write

    def fail_on_head(path, data, **kw):
        if path.name == HEAD_NAME:
            raise OSError(28, "injected")
        return real(path, data, **kw)

    monkeypatch.setattr(ledger_mod, "atomic_write", fail_on_head)
    with pytest.raises(LedgerError, match="head"):
        ledger.append(**_append_args())
    monkeypatch.undo()
    report = ledger.verify()
    assert report.ok and any("lags" in w for w in report.warnings)
    ledger.append(**_append_args(epsilon=9.5))  # repairs the head
    report = ledger.verify()
    assert report.ok and not report.warnings and len(report.entries) == len(STANDARD_ROUNDS) + 2


def test_append_refuses_over_budget_and_decreasing_epsilon(state: Path) -> None:
    ledger = Ledger.open(state, hospital="hospital-1")
    before = (state / LEDGER_NAME).read_bytes()
    spent = ledger.epsilon_spent()
    with pytest.raises(BudgetExceededError):
        ledger.append(**_append_args(epsilon=10.5, budget=10.0))
    with pytest.raises(LedgerError, match="below the cumulative"):
        ledger.append(**_append_args(epsilon=spent / 2))
    with pytest.raises(LedgerError, match="sample_rate"):
        ledger.append(**_append_args(sample_rate=1.5))
    assert (state / LEDGER_NAME).read_bytes() == before


def test_append_refuses_tampered_ledger(state: Path) -> None:
    _reorder(state)
    with pytest.raises(LedgerError, match="does not verify"):
        Ledger.open(state, hospital="hospital-1").append(**_append_args())


def test_read_only_ledger_cannot_append(state: Path) -> None:
    with pytest.raises(LedgerError, match="without a signing key"):
        Ledger(state).append(**_append_args())


def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    state = tmp_path / "s"
    Ledger.open(state, hospital="h")
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            lg = Ledger.open(state, hospital="h")
            for r in range(3):
                lg.append(**_append_args(run_id=f"run-{k}", round=r, epsilon=1.0))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    entries = Ledger(state).read()
    assert len(entries) == 12
    assert sorted((e.run_id, e.round) for e in entries) == sorted(
        (f"run-{k}", r) for k in range(4) for r in range(3))


def test_public_key_mismatch_is_refused(state: Path, tmp_path: Path) -> None:
    other = tmp_path / "o"
    Ledger.open(other, hospital="x")
    shutil.copy(other / signing.PUBLIC_KEY_NAME, state / signing.PUBLIC_KEY_NAME)
    with pytest.raises(LedgerError, match="does not belong"):
        Ledger.open(state, hospital="hospital-1")


def test_append_refuses_another_hospitals_ledger(state: Path) -> None:
    with pytest.raises(LedgerError, match="belongs to hospital"):
        Ledger.open(state, hospital="someone-else").append(**_append_args())
