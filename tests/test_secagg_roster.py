"""The federation roster, a hospital's trust in secure aggregation, and their policy checks."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_driver import simulated_trusts
from typer.testing import CliRunner

from fedrg.cli import app
from fedrg.config import SiteConfig
from fedrg.deploy.keys import new_hospital_keys
from fedrg.errors import ConfigError, SecAggError
from fedrg.federated.secure import provision_roster
from fedrg.hospital.secure import client_stage, client_trust
from fedrg.payload import Payload
from fedrg.policy import SitePolicy
from fedrg.secagg import ClientSession, Roster, ServerAggregator
from fedrg.secagg.client import ClientTrust
from fedrg.secagg.roster import RosterEntry, load_roster, write_roster
from fedrg.secagg.wire import to_payload


def _sites(tmp_path, n=3):
    return provision_roster([SiteConfig(name=f"h{i}", cohort=str(tmp_path / "c"),
                                        state_dir=str(tmp_path / f"h{i}")) for i in range(n)],
                            tmp_path / "roster.toml")


def test_roster_file_roundtrip_and_digest(tmp_path):
    sites = _sites(tmp_path)
    roster = load_roster(sites[0].roster)
    assert roster.names == ["h0", "h1", "h2"] and all(s.roster == sites[0].roster for s in sites)
    again = Roster.from_toml(roster.to_toml())
    assert again.digest() == roster.digest()
    assert (tmp_path / "roster.toml").stat().st_mode & 0o777 == 0o644
    # provisioning again keeps each hospital's key (the roster does not change)
    assert load_roster(_sites(tmp_path)[0].roster).digest() == roster.digest()


@pytest.mark.parametrize(("edit", "match"), [
    (lambda t: t.replace("version = 1", "version = 7"), "version"),
    (lambda t: t.replace('name = "h1"', 'name = "h0"'), "listed twice"),
    (lambda t: t.replace('signing_key = "', 'signing_key = "zz', 1), "64 hex digits"),
    (lambda t: "extra = 1\n" + t, "unknown top-level"),
    (lambda t: t.replace('name = "h2"', 'name = "h 2"'), "may only hold"),
    (lambda t: "version = 1\n", "no \\[\\[hospital\\]\\]"),
    (lambda t: t.replace("[[hospital]]", "[[hospital]]\nrole = 1", 1), "needs name and signing_key"),
])
def test_bad_roster_files_are_refused_with_the_file_named(tmp_path, edit, match):
    path = tmp_path / "roster.toml"
    _sites(tmp_path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError, match=match) as info:
        load_roster(path)
    assert str(path) in str(info.value)


def test_shared_signing_key_is_refused():
    key = bytes(range(32))
    with pytest.raises(ConfigError, match="share one signing key"):
        Roster([RosterEntry("a", key), RosterEntry("b", key)])


def test_trust_needs_a_roster_that_lists_this_hospital_with_its_own_key(tmp_path):
    sites = _sites(tmp_path)
    with pytest.raises(ConfigError, match="no federation roster"):
        client_trust(sites[0].model_copy(update={"roster": ""}))
    with pytest.raises(ConfigError, match="cannot read the federation roster"):
        client_trust(sites[0].model_copy(update={"roster": str(tmp_path / "missing.toml")}))
    stranger = SiteConfig(name="h9", cohort="c", state_dir=str(tmp_path / "h9"), roster=sites[0].roster)
    provision_roster([stranger], tmp_path / "other.toml")  # creates h9's key
    with pytest.raises(ConfigError, match="not in the roster"):
        client_trust(stranger)
    # h0's roster entry replaced by another key: the hospital notices before any round
    roster = load_roster(sites[0].roster)
    other = load_roster(tmp_path / "other.toml").entries["h9"]
    entries = [e for e in roster.entries.values() if e.name != "h0"]
    write_roster(tmp_path / "swapped.toml", Roster([*entries, RosterEntry("h0", other.signing_key)]))
    with pytest.raises(ConfigError, match="another signing key"):
        client_trust(sites[0].model_copy(update={"roster": str(tmp_path / "swapped.toml")}))


def test_policy_minimums_come_from_the_site_policy_or_its_defaults(tmp_path):
    sites = _sites(tmp_path)
    trust = client_trust(sites[0])
    assert (trust.min_peers, trust.min_threshold_fraction) == (
        SitePolicy().min_secagg_peers, SitePolicy().min_threshold_fraction)

    strict = sites[0].model_copy(update={"policy": SitePolicy(min_secagg_peers=5,
                                                              min_threshold_fraction=0.9)})
    assert (client_trust(strict).min_peers, client_trust(strict).min_threshold_fraction) == (5, 0.9)
    assert client_trust(strict, min_peers=1).min_peers == 1


def _pending(update, weight):
    state = Payload(meta={"pending_weight": weight})
    state.put_array_list("pending", [update])
    return state


def test_hospital_refuses_rounds_below_its_policy(tmp_path):
    sites = _sites(tmp_path, 3)
    update = np.zeros(4, np.float32)
    # two peers invited, policy wants three
    agg = ServerAggregator(list(range(3)), vector_length=4, max_weight=10.0)
    with pytest.raises(SecAggError, match="min_secagg_peers"):
        client_stage("secagg_setup", to_payload(agg.setup_requests()[0]), _pending(update, 1.0),
                     site=sites[0], min_peers=3)
    # threshold 2 of 3 holders is below a 0.9 minimum fraction
    agg = ServerAggregator(list(range(3)), vector_length=4, max_weight=10.0, threshold=2)
    with pytest.raises(SecAggError, match="min_threshold_fraction"):
        client_stage("secagg_setup", to_payload(agg.setup_requests()[0]), _pending(update, 1.0),
                     site=sites[0], min_threshold_fraction=0.9)


def test_too_few_verified_peers_or_surviving_peers_are_refused():
    trusts = simulated_trusts(5, seed=1, min_peers=3)
    # the server invites 5 but only 3 finish setup: a client has 2 verified peers, wants 3
    agg = ServerAggregator(list(range(5)), vector_length=4, max_weight=10.0, threshold=3)
    clients = [ClientSession(t) for t in trusts]
    req = agg.receive_setup({i: clients[i].setup(r) for i, r in agg.setup_requests().items()
                             if i < 3})
    with pytest.raises(SecAggError, match="min_secagg_peers"):
        clients[0].share(req[0])
    # all five share, then only A and two peers "survive": A will not sign (unmasking would
    # hide its update among fewer hospitals than its policy asks)
    agg = ServerAggregator(list(range(5)), vector_length=4, max_weight=10.0, threshold=3)
    clients = [ClientSession(t) for t in trusts]
    req = agg.receive_setup({i: clients[i].setup(r) for i, r in agg.setup_requests().items()})
    req = agg.receive_shares({i: clients[i].share(r) for i, r in req.items()})
    replies = {i: clients[i].masked_input(r, np.zeros(4), 1.0) for i, r in req.items() if i < 3}
    req = agg.receive_masked(replies)
    with pytest.raises(SecAggError, match="min_secagg_peers"):
        clients[0].consistency(req[0])


def test_simulated_sites_get_keys_and_one_roster(tmp_path):
    from fedrg.commands.federation import simulated_sites

    cohorts = []
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.csv").write_text("patient_id\n")
        cohorts.append(tmp_path / name)
    sites = simulated_sites(cohorts, tmp_path / "state")
    roster = load_roster(tmp_path / "state" / "roster.toml")
    assert roster.names == ["alpha", "beta"]
    assert all(isinstance(client_trust(s), ClientTrust) for s in sites)


def test_roster_cli_make_and_show(tmp_path):
    for h in ("h-a", "h-b"):
        new_hospital_keys(tmp_path / h, name=h)
    out = tmp_path / "roster.toml"
    runner = CliRunner()
    res = runner.invoke(app, ["roster", "make", "--hospital", f"h-a={tmp_path / 'h-a'}",
                              "--hospital", f"h-b={tmp_path / 'h-b'}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    roster = load_roster(out)
    assert roster.names == ["h-a", "h-b"]
    assert roster.entries["h-a"].node_public_key.startswith("ecdsa-sha2-nistp384")
    res = runner.invoke(app, ["roster", "show", str(out)])
    assert res.exit_code == 0 and roster.digest() in res.output.replace("\n", "")
    res = runner.invoke(app, ["roster", "make", "--hospital", "h-c", "--out", str(out)])
    assert res.exit_code == 2 and "NAME=KEYDIR" in res.output
