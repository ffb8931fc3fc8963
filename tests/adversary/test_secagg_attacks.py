"""Attacks by a hostile server on secure aggregation, against the real hospital code.

Each hospital here is the code a hospital runs (:func:`fedrg.federated.secure.client_stage`
with its own :class:`~fedrg.config.SiteConfig`, its long-term key on disk and the roster it
pinned); the server is played by the test, which may invent peers, forge or replay keys, and
tell hospitals different stories (Bonawitz et al. 2017 §4: an active adversary). Where an
attack succeeds without the defence under test (a roster that lists the server's own
peers), the test shows that too, so it cannot pass by luck.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg_driver import simulated_trusts

from fedrg.config import SiteConfig
from fedrg.errors import SecAggError
from fedrg.federated.secure import provision_roster
from fedrg.hospital.secure import client_stage
from fedrg.payload import Payload
from fedrg.secagg import ClientSession, ServerAggregator
from fedrg.secagg.client import ClientTrust, key_message
from fedrg.secagg.crypto import generate_keypair, seeded_entropy
from fedrg.secagg.quantize import error_bound
from fedrg.secagg.roster import Roster, load_identity, load_roster
from fedrg.secagg.wire import from_payload, to_payload

LENGTH = 32
MAX_WEIGHT = 100.0


class Hospital:
    """A real hospital: site config, key and roster on disk, node state with a trained update."""

    def __init__(self, site: SiteConfig, update: np.ndarray, weight: float) -> None:
        self.site = site
        self.update, self.weight = update, weight
        self.state = Payload()
        self.state.put_array_list("pending", [update])
        self.state.meta["pending_weight"] = weight
        self.sent: list[dict] = []  # everything this hospital ever sent the server

    def __call__(self, action: str, request: dict) -> dict:
        reply = from_payload(client_stage(f"secagg_{action}", to_payload(request), self.state,
                                          site=self.site))
        self.sent.append(reply)
        return reply


def federation(tmp_path, n: int, seed: int = 0) -> list[Hospital]:
    rng = np.random.default_rng(seed)
    sites = provision_roster(
        [SiteConfig(name=f"hospital-{i}", cohort=str(tmp_path / "none"),
                    state_dir=str(tmp_path / f"hospital-{i}")) for i in range(n)],
        tmp_path / "roster.toml")
    return [Hospital(s, rng.uniform(-1, 1, LENGTH).astype(np.float32), float(rng.integers(10, 90)))
            for s in sites]


def server_for(n: int, tag: str = "hostile-round", **kw) -> ServerAggregator:
    return ServerAggregator(list(range(n)), vector_length=LENGTH, max_weight=MAX_WEIGHT,
                            round_id=seeded_entropy(tag.encode())(16), **kw)


def next_round(h: Hospital) -> None:
    """The hospital trained again: a new pending update, no session (round ids seen are kept)."""
    h.state.put_array_list("pending", [h.update])
    h.state.meta["pending_weight"] = h.weight
    h.state.meta.pop("secagg_session", None)


def run_stage(agg_receive, parties, requests, action, extra=None):
    replies = {}
    for cid, req in requests.items():
        replies[cid] = parties[cid](action, req) if extra is None else extra(cid, req)
    return agg_receive(replies)


def only_public_replies(h: Hospital) -> bool:
    """True when nothing the hospital sent carries its update (no ring vector, no shares)."""
    return all("masked" not in r and not r.get("seed_shares") and not r.get("key_shares")
               for r in h.sent)


# ---------------------------------------------------------------- invented peers

def _simulated_peer(name: str, key_seed: int):
    """A peer the server makes up: its own identity, a session, an update the server knows."""
    trust = simulated_trusts(1, seed=key_seed, prefix=name)[0]
    return trust


def _attack_with_invented_peers(real: Hospital, fakes: list[ClientTrust]):
    """The attack of issue 13: one real hospital and two peers the server simulated.

    Returns the server's estimate of the real hospital's update (or raises when refused).
    """
    n = 1 + len(fakes)
    agg = server_for(n)
    known = np.zeros(LENGTH, np.float32)  # the server chose the fake peers' updates
    sessions = {i: ClientSession(t, seeded_entropy(f"fake{i}".encode()))
                for i, t in enumerate(fakes, 1)}

    def party(cid, action, req):
        if cid == 0:
            return real(action, req)
        s = sessions[cid]
        return {"setup": s.setup, "share": s.share, "consistency": s.consistency,
                "unmask": s.unmask}.get(action, lambda r: s.masked_input(r, known, 0.0))(req)

    def stage(receive, requests, action):
        return receive({cid: party(cid, action, req) for cid, req in requests.items()})

    req = stage(agg.receive_setup, agg.setup_requests(), "setup")
    req = stage(agg.receive_shares, req, "share")
    req = stage(agg.receive_masked, req, "masked")
    req = stage(agg.receive_consistency, req, "consistency")
    result = stage(agg.receive_unmask, req, "unmask")
    # the fakes have weight 0: the "aggregate" is the real hospital's update alone
    return result.mean


def test_attack_simulated_peers(tmp_path):
    (real,) = federation(tmp_path, 1)
    # the operator's roster lists three real hospitals; the server only controls its own keys
    others = simulated_trusts(2, seed=5, prefix="elsewhere")
    roster = Roster([load_identity(real.site.name, tmp_path / "hospital-0" / "ledger_ed25519.pem")
                     .entry(), *(t.identity.entry() for t in others)])
    (tmp_path / "roster.toml").write_text(roster.to_toml())

    # (a) invented peers with names outside the roster: refused, nothing leaves
    fakes = [_simulated_peer(f"sim-{i}", 10 + i) for i in range(2)]
    fakes = [ClientTrust(t.identity, Roster([t.identity.entry(), *(f.identity.entry() for f in fakes
                                                                    if f is not t)]), min_peers=1)
             for t in fakes]
    with pytest.raises(SecAggError, match="not in the roster"):
        _attack_with_invented_peers(real, fakes)
    assert only_public_replies(real)

    # (b) invented peers that claim the names of real roster hospitals, with server-made keys
    real.state = Payload(meta={"pending_weight": real.weight})
    real.state.put_array_list("pending", [real.update])
    impostors = simulated_trusts(2, seed=6, prefix="elsewhere")  # same names, other keys
    fake_roster = Roster([t.identity.entry() for t in impostors]
                         + [load_roster(tmp_path / "roster.toml").entries[real.site.name]])
    impostors = [ClientTrust(t.identity, fake_roster, min_peers=1) for t in impostors]
    with pytest.raises(SecAggError, match="signature"):
        _attack_with_invented_peers(real, impostors)
    assert only_public_replies(real)
    # the hospital never reached the masked stage: any later request is refused too
    with pytest.raises(SecAggError):
        real("masked", {"senders": [], "ciphertexts": []})
    assert only_public_replies(real)

    # control: had the roster listed the server's peers, the attack recovers the update,
    # so it is the roster check that stops it
    (tmp_path / "roster.toml").write_text(fake_roster.to_toml())
    real.state = Payload(meta={"pending_weight": real.weight})
    real.state.put_array_list("pending", [real.update])
    real.sent.clear()
    recovered = _attack_with_invented_peers(real, impostors)
    bound = error_bound([real.weight, 0.0, 0.0], clip_range=8.0, quantization_bits=24,
                        max_weight=MAX_WEIGHT)
    assert np.max(np.abs(recovered - real.update)) <= bound


# ---------------------------------------------------------------- forged and replayed keys

def _keys_round(hospitals, agg):
    req = run_stage(agg.receive_setup, dict(enumerate(hospitals)), agg.setup_requests(), "setup")
    return req


def test_attack_forged_key(tmp_path):
    hospitals = federation(tmp_path, 3)
    a = hospitals[0]
    requests = _keys_round(hospitals, server_for(3, "r1"))
    honest = requests[0]
    i_b = honest["names"].index("hospital-1")
    _, enc_pk = generate_keypair(seeded_entropy(b"server-enc"))
    _, mask_pk = generate_keypair(seeded_entropy(b"server-mask"))

    def swapped(req, **replace):
        out = dict(req)
        for field in ("enc_pks", "mask_pks", "key_signatures", "names"):
            out[field] = list(req[field])
        for field, value in replace.items():
            out[field][i_b] = value
        return out

    # 1. the server swaps B's public keys for its own (man in the middle), keeping B's signature
    with pytest.raises(SecAggError, match="signature"):
        a("share", swapped(honest, enc_pks=enc_pk, mask_pks=mask_pk))

    # 2. ... and signs them with a key of its own
    for h in hospitals:
        next_round(h)
    agg = server_for(3, "r2")
    requests = _keys_round(hospitals, agg)
    server_id = simulated_trusts(1, seed=99)[0].identity
    sig = server_id.sign(key_message(agg.params.context(), requests[0]["indices"][i_b],
                                     "hospital-1", enc_pk, mask_pk))
    with pytest.raises(SecAggError, match="signature"):
        a("share", swapped(requests[0], enc_pks=enc_pk, mask_pks=mask_pk, key_signatures=sig))

    # 3. B's genuinely signed keys replayed from another round (another round id)
    for h in hospitals:
        next_round(h)
    current = _keys_round(hospitals, server_for(3, "r3"))
    old = requests[0]  # round r2's key list, signatures by B included
    with pytest.raises(SecAggError, match="signature"):
        a("share", swapped(current[0], enc_pks=old["enc_pks"][i_b], mask_pks=old["mask_pks"][i_b],
                           key_signatures=old["key_signatures"][i_b]))

    # 4. the same hospital twice (a duplicated identity) is refused
    for h in hospitals:
        next_round(h)
    current = _keys_round(hospitals, server_for(3, "r4"))
    i_c = next(i for i in range(3) if i not in (0, i_b) and current[0]["names"][i] != a.site.name)
    dup = dict(current[0])
    dup["names"] = list(dup["names"])
    dup["names"][i_c] = dup["names"][i_b]
    with pytest.raises(SecAggError, match="more than once"):
        a("share", dup)

    # 5. a round id the hospital has answered before is refused at setup (replay of a round)
    next_round(a)
    with pytest.raises(SecAggError, match="round id"):
        a("setup", server_for(3, "r1").setup_requests()[0])
    assert all(only_public_replies(h) for h in hospitals)


# ---------------------------------------------------------------- inconsistent survivors

def _to_masked(hospitals, agg):
    parties = dict(enumerate(hospitals))
    req = run_stage(agg.receive_setup, parties, agg.setup_requests(), "setup")
    req = run_stage(agg.receive_shares, parties, req, "share")
    return run_stage(agg.receive_masked, parties, req, "masked")


def test_attack_inconsistent_survivors(tmp_path):
    """The server tells A and B that D survived and C, D that D dropped, to obtain both D's
    self-mask seed shares and its mask-key shares (and so D's update alone)."""
    hospitals = federation(tmp_path, 4)
    agg = server_for(4)
    assert agg.threshold == 3
    consistency_req = _to_masked(hospitals, agg)
    everyone = consistency_req[0]["survivors"]
    d = everyone[-1]
    story = {0: everyone, 1: everyone, 2: everyone[:-1], 3: everyone[:-1]}
    # D is told it dropped: it refuses to sign at all
    with pytest.raises(SecAggError, match="dropped"):
        hospitals[3]("consistency", {"survivors": story[3]})
    sigs = {}
    for cid in (0, 1, 2):
        sigs[cid + 1] = hospitals[cid]("consistency", {"survivors": story[cid]})["consistency_signature"]

    def request(cid, signers):
        return {"survivors": story[cid], "signers": signers, "signatures": [sigs[s] for s in signers]}

    # A (told D survived) gets every signature the server has: C's is over another set
    with pytest.raises(SecAggError, match="did not sign this survivor set"):
        hospitals[0]("unmask", request(0, [1, 2, 3]))
    # ... or only the matching ones: fewer than the threshold
    with pytest.raises(SecAggError, match="fewer than threshold"):
        hospitals[0]("unmask", request(0, [1, 2]))
    # C (told D dropped) likewise cannot be made to reveal D's mask-key share
    with pytest.raises(SecAggError, match="did not sign this survivor set"):
        hospitals[2]("unmask", request(2, [1, 2, 3]))
    with pytest.raises(SecAggError, match="fewer than threshold"):
        hospitals[2]("unmask", request(2, [3]))
    # a signature relabelled as another signer's does not verify either
    forged = {"survivors": story[0], "signers": [1, 2, 3], "signatures": [sigs[1], sigs[2], sigs[1]]}
    with pytest.raises(SecAggError, match="did not sign"):
        hospitals[0]("unmask", forged)
    # nothing was revealed: no hospital sent a single share
    assert all(not r.get("seed_shares") and not r.get("key_shares") for h in hospitals for r in h.sent)
    assert d == 4

    # control: with one consistent story the same hospitals complete the round
    for h in hospitals:
        h.state = Payload(meta={"pending_weight": h.weight})
        h.state.put_array_list("pending", [h.update])
    agg = ServerAggregator(list(range(4)), vector_length=LENGTH, max_weight=MAX_WEIGHT)
    parties = dict(enumerate(hospitals))
    req = run_stage(agg.receive_consistency, parties, _to_masked(hospitals, agg), "consistency")
    result = run_stage(agg.receive_unmask, parties, req, "unmask")
    weights = [h.weight for h in hospitals]
    expected = sum(h.weight * h.update.astype(np.float64) for h in hospitals) / sum(weights)
    assert np.max(np.abs(result.mean - expected)) <= error_bound(
        weights, clip_range=8.0, quantization_bits=24, max_weight=MAX_WEIGHT)


# ---------------------------------------------------------------- unmasking outside the graph

def test_attack_unmask_outside_neighbours(tmp_path):
    n = 10
    hospitals = federation(tmp_path, n, seed=3)
    agg = server_for(n, neighbours=4)
    assert agg.params.neighbours == 4 and agg.threshold == 4  # 5 holders each
    parties = dict(enumerate(hospitals))
    req = run_stage(agg.receive_setup, parties, agg.setup_requests(), "setup")
    req = run_stage(agg.receive_shares, parties, req, "share")
    a = hospitals[0]
    me = 1
    nbrs = agg.graph[me]
    strangers = [u for u in agg.u1 if u != me and u not in nbrs]
    assert strangers, "the graph must leave A some non-neighbours"
    # the server withholds one neighbour's shares from A, then lists that neighbour as a survivor
    withheld = nbrs[0]
    mine = dict(req[0])
    keep = [i for i, u in enumerate(mine["senders"]) if u != withheld]
    mine = {"senders": [mine["senders"][i] for i in keep],
            "ciphertexts": [mine["ciphertexts"][i] for i in keep]}
    a("masked", mine)
    replies = {cid: parties[cid]("masked", r) for cid, r in req.items() if cid != 0}
    with pytest.raises(SecAggError, match="not within its partners"):
        a("consistency", {"survivors": sorted(agg.u1)})
    # survivors outside the round's key list are refused too
    with pytest.raises(SecAggError, match="never in this round"):
        a("consistency", {"survivors": sorted([*agg.u1, n + 5])})
    # a consistent story in which the withheld neighbour "dropped": A signs it
    survivors = sorted(u for u in agg.u1 if u != withheld)
    signed = a("consistency", {"survivors": survivors})["consistency_signature"]
    holders = sorted([me, *nbrs])
    sigs = {me: signed}
    # the other holders sign the same set (they are honest and were told the same)
    for u in holders:
        if u in (me, withheld):
            continue
        sigs[u] = hospitals[u - 1]("consistency", {"survivors": survivors})["consistency_signature"]
    assert replies  # the others uploaded their masked inputs
    # the server asks A to unmask with signatures from non-neighbours: refused
    outsider = strangers[0]
    sigs[outsider] = hospitals[outsider - 1]("consistency", {"survivors": survivors})[
        "consistency_signature"]
    with pytest.raises(SecAggError, match="not one of this client's shareholders"):
        a("unmask", {"survivors": survivors, "signers": [*sigs], "signatures": [*sigs.values()]})
    # with its own shareholders' signatures A unmasks, and only for its partners and itself
    signers = [u for u in holders if u in sigs]
    out = a("unmask", {"survivors": survivors, "signers": signers,
                       "signatures": [sigs[u] for u in signers]})
    owners = set(out["seed_owners"]) | set(out["key_owners"])
    assert owners <= set(nbrs) | {me}
    assert not owners & set(strangers)
    assert withheld not in owners  # it never sent A shares: A holds nothing of it
    # a replayed request naming non-neighbours as dropped changes nothing
    again = a("unmask", {"survivors": survivors, "signers": signers,
                         "signatures": [sigs[u] for u in signers]})
    assert again["seed_owners"] == out["seed_owners"] and again["key_owners"] == out["key_owners"]
