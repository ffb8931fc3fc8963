"""`fedrg audit` cannot be read wrong (issue 24, item 1): training rounds, evaluation
releases and entries without DP are counted apart; a ledger with any entry without DP is
never "protected by differential privacy" (PARTIAL / NOT PRIVATE, exit 3, apart from
verification failures, exit 1); one mechanism row per distinct mechanism; no "0.000" for a
run without DP.

The ledgers are real (signed, hash-chained, Opacus epsilon) and shaped like the ones
`fedrg simulate` writes: a DP-SGD or non-private training entry per round, then the round's
metric release (a Gaussian DP release, or an exact one recorded with accountant "none").
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest
import typer
from privacy_ledger_helpers import SIGMA, STEPS, Q
from privacy_ledger_helpers import write_run as _run
from typer.testing import CliRunner

from fedrg.audit.coverage import coverage_of
from fedrg.audit.report import plain_words, render_html
from fedrg.audit.verify import EXIT_FAILED, EXIT_NOT_PRIVATE, EXIT_OK, audit_path
from fedrg.commands import audit as audit_cmd
from fedrg.privacy.ledger import LEDGER_NAME, NON_PRIVATE, LedgerEntry


def _cli(*args: str):
    app = typer.Typer()
    audit_cmd.register(app)
    app.command("noop", hidden=True)(lambda: None)
    return CliRunner().invoke(app, ["audit", *args])


def _flat(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- verdicts

def test_non_private_run_is_not_private_never_ok(tmp_path: Path) -> None:
    """`configs/non-private.toml`'s run: three rounds without DP-SGD, three exact releases."""
    state = tmp_path / "hospital-1" / "state"
    _run(state, "np-run", train_dp=False, release="exact")
    result = audit_path(state)
    (h,) = result.hospitals
    assert h.integrity_ok and h.verified  # the ledger itself is sound ...
    assert h.status == "NOT PRIVATE" and not h.ok and h.privacy == "none"  # ... but no DP
    assert result.status == "NOT PRIVATE" and not result.ok
    assert result.exit_code == EXIT_NOT_PRIVATE == 3
    assert (h.rounds, h.steps, h.evaluation_releases) == (3, 3 * STEPS, 3)
    assert "3 training round(s) WITHOUT DP-SGD" in h.verdict and "np-run" in h.verdict
    assert "3 exact evaluation release(s) WITHOUT DP" in h.verdict

    res = _cli(str(state))
    out = _flat(res.stdout)
    assert res.exit_code == 3, res.stdout
    assert "NOT PRIVATE" in out and "audit passed" not in out and "0.000" not in out
    assert re.search(r"hospital-1 3 3 no DP no DP no DP 100\.00 NOT PRIVATE", out), out
    assert "no entry is differentially private" in out
    assert max(len(line) for line in res.stdout.splitlines()) <= 80

    data = json.loads(_cli(str(state), "--json").stdout)
    assert data["ok"] is False and data["status"] == "NOT PRIVATE" and data["integrity_ok"]
    (j,) = data["hospitals"]
    assert j["privacy"] == "none" and j["status"] == "NOT PRIVATE"
    assert j["epsilon_recorded"] is None and j["epsilon_recomputed"] is None  # never 0
    assert (j["rounds"], j["non_private_rounds"], j["dp_rounds"]) == (3, 3, 0)
    assert (j["evaluation_releases"], j["exact_releases"], j["dp_releases"]) == (3, 3, 0)
    assert len(j["not_private"]) == 2


def test_non_private_run_after_dp_runs_is_partial_and_names_the_run(tmp_path: Path) -> None:
    """The issue's case: the ledger's earlier DP runs gave "eps 8.978"; the non-private run
    after them must not pass as protected at that epsilon."""
    state = tmp_path / "hospital-1" / "state"
    _run(state, "dp-run", train_dp=True, release="dp")
    _run(state, "np-run", train_dp=False, release="exact", rounds=2)
    (h,) = audit_path(state).hospitals
    assert h.status == "PARTIAL" and h.integrity_ok and not h.ok
    assert h.epsilon_recorded > 1.0  # the DP runs' epsilon, ...
    verdict = h.verdict
    assert "2 training round(s) WITHOUT DP-SGD (18 steps; run np-run: rounds 1, 2)" in verdict
    assert "2 exact evaluation release(s) WITHOUT DP" in verdict
    assert "covers only the DP entries" in verdict  # ... which covers them only
    assert "dp-run" not in verdict.split("covers only")[0]  # the DP run is not named
    res = _cli(str(state))
    assert res.exit_code == 3 and "audit passed" not in res.stdout
    assert "PARTIAL" in res.stdout and "run np-run" in _flat(res.stdout)


def test_dp_training_with_exact_releases_is_partial(tmp_path: Path) -> None:
    """The default `fedrg simulate`: DP-SGD rounds, metrics released exactly."""
    state = tmp_path / "hospital-1" / "state"
    _run(state, "sim", train_dp=True, release="exact")
    result = audit_path(state)
    (h,) = result.hospitals
    assert h.status == "PARTIAL" and result.exit_code == EXIT_NOT_PRIVATE
    assert "OK" not in h.verdict and "3 exact evaluation release(s) WITHOUT DP" in h.verdict


def test_all_dp_with_dp_releases_is_ok_exit_0(tmp_path: Path) -> None:
    """A real hospital's default (release = "dp"): everything DP, OK, exit 0."""
    state = tmp_path / "hospital-1" / "state"
    _run(state, "run", train_dp=True, release="dp")
    result = audit_path(state)
    (h,) = result.hospitals
    assert h.status == "OK" and h.ok and result.exit_code == EXIT_OK == 0
    assert "every entry is differentially private" in h.verdict
    res = _cli(str(state))
    assert res.exit_code == 0 and "audit passed" in res.stdout


def test_tampering_exits_1_not_3_even_when_not_private(tmp_path: Path) -> None:
    state = tmp_path / "hospital-1" / "state"
    _run(state, "np-run", train_dp=False, release="exact")
    path = state / LEDGER_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[1] + lines[0] + b"".join(lines[2:]))
    result = audit_path(state)
    (h,) = result.hospitals
    assert h.status == "TAMPERED" and result.status == "FAILED"
    assert result.exit_code == EXIT_FAILED == 1
    assert "NOT differentially private" in h.verdict  # still named
    res = _cli(str(state))
    assert res.exit_code == 1 and "audit FAILED" in res.stdout
    assert json.loads(_cli(str(state), "--json").stdout)["status"] == "FAILED"


def test_one_hospital_without_dp_makes_the_run_partial(tmp_path: Path) -> None:
    _run(tmp_path / "run" / "hospital-1" / "state", "r", train_dp=True, release="dp")
    _run(tmp_path / "run" / "hospital-2" / "state", "r", train_dp=False, release="exact",
         hospital="hospital-2")
    result = audit_path(tmp_path / "run")
    assert [h.status for h in result.hospitals] == ["OK", "NOT PRIVATE"]
    assert result.status == "PARTIAL" and result.exit_code == 3


# --------------------------------------------------------------------------- counts, table

def test_releases_are_not_rounds_or_steps_and_each_mechanism_is_one_row(tmp_path: Path
                                                                        ) -> None:
    """Issue: "rounds 6, steps 30" for 3 rounds of 9 steps, and a table "noise multiplier
    0-1.116, sample rate 0.2286-1, accountant none, rdp"."""
    state = tmp_path / "hospital-1" / "state"
    _run(state, "sim", train_dp=True, release="exact")
    (h,) = audit_path(state).hospitals
    assert (h.rounds, h.steps, h.evaluation_releases) == (3, 27, 3)
    rows = [(m.label, m.accountant, m.noise_multiplier, m.sample_rate, m.entries, m.steps)
            for m in h.coverage.mechanisms]
    assert rows == [("DP-SGD", "rdp", SIGMA, Q, 3, 27),
                    ("exact release", NON_PRIVATE, 0.0, 1.0, 3, 3)]
    res = _cli(str(state))
    out = _flat(res.stdout)
    assert "0-1.116" not in out and "0.2286-1" not in out and "none, rdp" not in out
    assert "DP-SGD (rdp) 3 27 1.116 0.2286 1.0e-05" in out
    assert "exact release 3 3 0 1 1.0e-05" in out
    assert re.search(r"hospital-1 3 3 \d\.\d{3} \d\.\d{3} \d\.\d{3} 100\.00 PARTIAL", out), out
    assert "evaluation release(s), their epsilon included above" not in out


def test_mechanism_key_separates_delta_and_kind() -> None:
    def entry(seq, kind, sigma, q, delta, acc="rdp", steps=5):
        return LedgerEntry(seq, "h", "r", seq, sigma, q, steps, 1.0, acc, delta, 0.0, 10.0,
                           "", "", "", "", "", "", kind=kind)

    cov = coverage_of([entry(0, "train", 1.0, 0.1, 1e-5), entry(1, "train", 1.0, 0.1, 1e-5),
                       entry(2, "train", 1.0, 0.1, 1e-6),
                       entry(3, "evaluation", 1.0, 1.0, 1e-5, steps=1),
                       entry(4, "reinit", 0.0, 1.0, 1e-5, acc=NON_PRIVATE, steps=0),
                       # claims an accountant but adds no noise: not DP either
                       entry(5, "train", 0.0, 0.1, 1e-5)])
    assert [(m.kind, m.delta, m.entries, m.steps, m.private) for m in cov.mechanisms] == [
        ("train", 1e-5, 2, 10, True), ("train", 1e-6, 1, 5, True),
        ("evaluation", 1e-5, 1, 1, True), ("train", 1e-5, 1, 5, False)]
    assert cov.privacy == "partial" and (cov.rounds, cov.releases) == (4, 1)
    assert any("noise multiplier 0" in t for t in cov.not_private)


# --------------------------------------------------------------------------- HTML

def test_html_never_says_protected_when_not_private(tmp_path: Path) -> None:
    np_state = tmp_path / "np" / "hospital-1" / "state"
    _run(np_state, "np-run", train_dp=False, release="exact")
    page = render_html(audit_path(np_state))
    text = _flat(html.unescape(re.sub(r"<[^>]+>", " ", page)))
    assert "protected by differential privacy with" not in text
    assert "NO hospital's data was protected by differential privacy" in text
    assert "NOT PRIVATE" in text and "no DP" in text and "0.000" not in text
    assert "data:image/png" not in page  # no epsilon curve for a hospital without epsilon

    mixed = tmp_path / "mixed" / "hospital-1" / "state"
    _run(mixed, "dp-run", train_dp=True, release="dp")
    _run(mixed, "np-run", train_dp=False, release="exact", rounds=2)
    (h,) = audit_path(mixed).hospitals
    words = html.unescape(plain_words(h))
    assert "every patient is protected" not in words
    assert "NOT everything done with this hospital's data was differentially private" in words
    assert "run np-run: rounds 1, 2" in words
    page = render_html(audit_path(mixed))
    assert "PARTIAL" in page and "verdict warn" in page
    assert "<td class='warn'>train, no DP</td>" in page
    assert "<td class='warn'>exact release</td>" in page


def test_html_all_dp_still_says_protected(tmp_path: Path) -> None:
    state = tmp_path / "hospital-1" / "state"
    _run(state, "run", train_dp=True, release="dp")
    (h,) = audit_path(state).hospitals
    words = plain_words(h)
    assert "every patient is protected by differential privacy" in words
    assert "3 release(s), each with Gaussian noise" in words
    assert "3 round(s) and 27 training steps" in words


def test_copy_of_a_non_private_ledger_keeps_its_verdict(tmp_path: Path) -> None:
    """The run directory's ledger copies (what `fedrg audit RUN` reads) say the same."""
    state = tmp_path / "site" / "hospital-1"
    _run(state, "np-run", train_dp=False, release="exact")
    copy = tmp_path / "run" / "ledgers" / "hospital-1"
    shutil.copytree(state, copy, ignore=shutil.ignore_patterns("*.pem", "*.lock"))
    (h,) = audit_path(tmp_path / "run").hospitals
    assert h.status == "NOT PRIVATE"


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_real_non_private_simulation_prints_no_dp_and_audits_not_private(tmp_path: Path
                                                                         ) -> None:
    """A real tiny `fedrg simulate --config configs/non-private.toml` (Ray, Flower, secure
    aggregation): the end-of-run lines say "no DP", never 0.000, and `fedrg audit` of the
    run says NOT PRIVATE with exit 3."""
    import subprocess
    import sys

    from test_simulation_e2e import _simulate

    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nrequire_dp = false\nmin_secagg_peers = 1\n")
    config = Path(__file__).resolve().parent.parent / "configs" / "non-private.toml"
    run = tmp_path / "run"
    proc = _simulate(tmp_path, "--config", str(config), "--hospitals", "2", "--rounds", "2",
                     "--site-policy", str(policy), "--out", str(run))
    out = _flat(proc.stdout)
    assert "epsilon spent this run: no DP at any hospital" in out, proc.stdout[-3000:]
    assert "0.000" not in out and "max eps 0.00" not in out and "DP-SGD steps" not in out
    assert "no DP" in out.split("epsilon spent this run")[0]  # the rows and the table
    audit = subprocess.run([sys.executable, "-m", "fedrg.cli", "audit", str(run), "--json"],
                           capture_output=True, text=True, timeout=300)
    assert audit.returncode == 3, audit.stdout[-3000:] + audit.stderr[-3000:]
    data = json.loads(audit.stdout)
    assert data["status"] == "NOT PRIVATE" and data["integrity_ok"] is True
    assert [h["status"] for h in data["hospitals"]] == ["NOT PRIVATE"] * 2
    # two rounds; releases of the start (round 0) and of each round
    assert all(h["rounds"] == 2 and h["evaluation_releases"] == 3 for h in data["hospitals"])
