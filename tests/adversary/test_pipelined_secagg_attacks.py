"""Attacks on the pipelined secure-aggregation set-up, against the real hospital code.

With ``secagg.pipelined`` (the default) round r+1 is set up during round r's last two
messages: its stage-1 request rides on round r's consistency request, its key list on the
unmask request, and the train request of round r+1 carries the shares routed to each
hospital, whose reply carries the masked update (:mod:`fedrg.federated.secure`). The server
is played by the test. Every round keeps its own fresh keys and round id; the hospital runs
the same policy, replay and roster checks on a pipelined set-up as on a fresh one, a
refused next-round part never changes its answer for the current round, and a pipelined
session masks exactly one update, checked before training (a refusal costs no budget).
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from fedrg.config import SiteConfig
from fedrg.errors import SecAggError
from fedrg.federated.secure import provision_roster
from fedrg.hospital.secure import (
    PRECOMPUTED_MASKS_KEY,
    answer_masked_in_train,
    check_masked_in_train,
)
from fedrg.hospital.site import HospitalSite
from fedrg.payload import Payload
from fedrg.secagg.client import ClientSession
from fedrg.secagg.crypto import seeded_entropy
from fedrg.secagg.server import ServerAggregator
from fedrg.secagg.wire import (
    MASKED_FIELD,
    NEXT_ERROR_FIELD,
    NEXT_KEYS_FIELD,
    NEXT_SESSION_KEY,
    NEXT_SETUP_FIELD,
    NEXT_SHARE_FIELD,
    NEXT_SHARES_FIELD,
    SESSION_KEY,
    SETUP_FIELD,
    to_payload,
)

from .conftest import ledger_bytes
from .hostile import HONEST_RUN, honest_request
from .test_secagg_attacks import LENGTH, MAX_WEIGHT, Hospital, federation


def _agg(n: int, tag: str, *, length: int = LENGTH) -> ServerAggregator:
    return ServerAggregator(list(range(n)), vector_length=length, max_weight=MAX_WEIGHT,
                            round_id=seeded_entropy(tag.encode())(16))


def _to_consistency(hospitals: list[Hospital], agg: ServerAggregator) -> dict:
    """Round stages 1-3 (fresh set-up): the consistency requests."""
    req = agg.receive_setup({i: h("setup", r) for i, (h, r) in
                             enumerate(zip(hospitals, agg.setup_requests().values(), strict=True))})
    req = agg.receive_shares({i: hospitals[i]("share", r) for i, r in req.items()})
    return agg.receive_masked({i: hospitals[i]("masked", r) for i, r in req.items()})


def _pipeline(hospitals: list[Hospital], agg: ServerAggregator, nxt: ServerAggregator,
              *, next_setup=None):
    """Finish ``agg``'s round while setting ``nxt`` up; returns (result, replies per stage)."""
    setup = nxt.setup_requests()
    req = _to_consistency(hospitals, agg)
    replies = {i: hospitals[i]("consistency", {**r, NEXT_SETUP_FIELD: (next_setup or setup)[i]})
               for i, r in req.items()}
    keys = {i: r.pop(NEXT_KEYS_FIELD) for i, r in replies.items() if NEXT_KEYS_FIELD in r}
    errors = {i: r.pop(NEXT_ERROR_FIELD) for i, r in replies.items() if NEXT_ERROR_FIELD in r}
    req = agg.receive_consistency(replies)
    share = nxt.receive_setup(keys) if len(keys) >= nxt.threshold else {}
    unmask = {}
    for i, r in req.items():
        extra = share.get(i)
        unmask[i] = hospitals[i]("unmask", r if extra is None else {**r, NEXT_SHARE_FIELD: extra})
    shares = {i: r.pop(NEXT_SHARES_FIELD) for i, r in unmask.items() if NEXT_SHARES_FIELD in r}
    errors.update({i: r.pop(NEXT_ERROR_FIELD) for i, r in unmask.items() if NEXT_ERROR_FIELD in r})
    return agg.receive_unmask(unmask), keys, shares, errors


def _fedavg(hospitals):
    w = np.array([h.weight for h in hospitals])
    return sum(h.weight * h.update.astype(np.float64) for h in hospitals) / w.sum()


def test_pipelined_round_has_fresh_keys_and_sums_correctly(tmp_path, monkeypatch):
    """Honest run: round 2's keys and round id are new, and its sum is the FedAvg; each
    hospital's masks were expanded from the pre-training check on and used by the upload."""
    used = []
    masked_input = ClientSession.masked_input

    def spy(self, request, update, weight, *, masks=None):
        used.append(masks is not None and masks.index == self.index)
        return masked_input(self, request, update, weight, masks=masks)

    monkeypatch.setattr(ClientSession, "masked_input", spy)
    hospitals = federation(tmp_path, 4, seed=1)
    agg1, agg2 = _agg(4, "round-1"), _agg(4, "round-2")
    result, keys, shares, errors = _pipeline(hospitals, agg1, agg2)
    assert not errors and len(keys) == len(shares) == 4
    np.testing.assert_allclose(result.mean, _fedavg(hospitals), atol=1e-3)
    routed = agg2.receive_shares(shares)
    for i in range(1, 5):  # a pipelined round never reuses a key of the round before
        assert agg2.enc_pks[i] != agg1.enc_pks[i] and agg2.mask_pks[i] != agg1.mask_pks[i]
    assert agg2.transcript != agg1.transcript
    masked = {}
    for i, h in enumerate(hospitals):  # round 2: the masked update from the train reply's path
        h.update = h.update[::-1].copy()
        h.state.put_array_list("pending", [h.update])
        h.state.meta["pending_weight"] = h.weight
        request = check_masked_in_train({**routed[i], "round_id": agg2.params.round_id}, h.state,
                                        site=h.site)
        assert isinstance(request[PRECOMPUTED_MASKS_KEY], Future)  # expanding while it trains
        reply = Payload()
        answer_masked_in_train(request, reply, h.state, site=h.site)
        assert PRECOMPUTED_MASKS_KEY not in reply.meta and PRECOMPUTED_MASKS_KEY not in reply.arrays
        masked[i] = {**reply.meta[MASKED_FIELD], "masked": reply.arrays["sa.masked"]}
        assert NEXT_SESSION_KEY not in h.state.meta and not h.state.arrays
    assert used[-4:] == [True] * 4  # round 2's uploads added the precomputed masks
    req = agg2.receive_masked(masked)
    req = agg2.receive_consistency({i: hospitals[i]("consistency", r) for i, r in req.items()})
    result2 = agg2.receive_unmask({i: hospitals[i]("unmask", r) for i, r in req.items()})
    np.testing.assert_allclose(result2.mean, _fedavg(hospitals), atol=1e-3)


def test_attack_next_setup_replays_the_current_round_id(tmp_path):
    """The next round's set-up under a round id the hospital answered: refused as a replay;
    the current round still completes (the refusal touches only the next round)."""
    hospitals = federation(tmp_path, 4, seed=2)
    agg1 = _agg(4, "round-1")
    replayed = _agg(4, "round-1")  # the same round id again
    result, keys, shares, errors = _pipeline(hospitals, agg1, replayed)
    assert not keys and not shares and len(errors) == 4
    assert all("replay" in e for e in errors.values())
    np.testing.assert_allclose(result.mean, _fedavg(hospitals), atol=1e-3)
    assert all(NEXT_SESSION_KEY not in h.state.meta for h in hospitals)


def test_attack_next_setup_below_policy(tmp_path):
    """A two-client next round (one peer, the default policy wants two): refused by every
    hospital's own policy although the current round was acceptable."""
    hospitals = federation(tmp_path, 4, seed=3)
    agg1 = _agg(4, "round-1")
    small = _agg(2, "round-2")
    setup = small.setup_requests()
    result, keys, _, errors = _pipeline(hospitals, agg1, _agg(4, "round-2b"),
                                        next_setup={i: setup[i % 2] for i in range(4)})
    assert not keys and all("min_secagg_peers" in e for e in errors.values())
    np.testing.assert_allclose(result.mean, _fedavg(hospitals), atol=1e-3)


def test_attack_forged_key_in_the_next_key_list(tmp_path):
    """The next round's key list with one hospital's key swapped for the server's own: every
    hospital refuses to share (the signature does not verify against its roster), keeps no
    next session, and a train request for that round is then refused before training."""
    from fedrg.secagg.crypto import generate_keypair

    hospitals = federation(tmp_path, 4, seed=4)
    agg1, agg2 = _agg(4, "round-1"), _agg(4, "round-2")
    setup = agg2.setup_requests()
    req = _to_consistency(hospitals, agg1)
    replies = {i: hospitals[i]("consistency", {**r, NEXT_SETUP_FIELD: setup[i]}) for i, r in req.items()}
    keys = {i: r.pop(NEXT_KEYS_FIELD) for i, r in replies.items()}
    share = agg2.receive_setup(keys)
    forged = {i: {**r, "mask_pks": [generate_keypair(seeded_entropy(b"srv"))[1], *r["mask_pks"][1:]]}
              for i, r in share.items()}
    req = agg1.receive_consistency(replies)
    errors = []
    for i, r in req.items():
        reply = hospitals[i]("unmask", {**r, NEXT_SHARE_FIELD: forged[i]})
        assert NEXT_SHARES_FIELD not in reply
        errors.append(reply[NEXT_ERROR_FIELD])
    assert all("signature" in e or "own signed" in e for e in errors), errors
    for h in hospitals:
        assert NEXT_SESSION_KEY not in h.state.meta
        with pytest.raises(SecAggError, match="not set up"):
            check_masked_in_train({"round_id": agg2.params.round_id, "senders": [], "ciphertexts": []},
                                  h.state, site=h.site)


def test_attack_next_key_list_without_a_next_setup(tmp_path):
    """A next-round key list for a set-up the hospital never made: refused (nothing shared),
    and the current round still unmasks."""
    hospitals = federation(tmp_path, 4, seed=5)
    agg1, other = _agg(4, "round-1"), _agg(4, "other")
    others = federation(tmp_path / "other", 4, seed=5)
    share = other.receive_setup({i: h("setup", r) for i, (h, r) in
                                 enumerate(zip(others, other.setup_requests().values(), strict=True))})
    req = _to_consistency(hospitals, agg1)  # no next set-up rides on this consistency request
    req = agg1.receive_consistency({i: hospitals[i]("consistency", r) for i, r in req.items()})
    replies = {}
    for i, r in req.items():
        replies[i] = hospitals[i]("unmask", {**r, NEXT_SHARE_FIELD: share[i]})
        assert NEXT_SHARES_FIELD not in replies[i]
        assert "without a pipelined" in replies[i].pop(NEXT_ERROR_FIELD)
    np.testing.assert_allclose(agg1.receive_unmask(replies).mean, _fedavg(hospitals), atol=1e-3)


# ----------------------------------------------------------------- the real hospital site
@pytest.fixture
def pipelined_site(hospital, base_dir, tmp_path):
    """The veteran hospital (index 1) and two peers after round 1 of a pipelined run: each
    holds round 2's session; returns (site, its state, round 2's aggregator, routed shares)."""
    peers = [SiteConfig(name=f"p{i}", cohort=str(tmp_path / "none"), state_dir=str(tmp_path / f"p{i}"))
             for i in (2, 3)]
    sites = provision_roster([hospital.site, *peers], tmp_path / "roster.toml")
    n_params = sum(a.size for a in honest_request(base_dir).array_list("global"))
    rng = np.random.default_rng(0)
    parties = [Hospital(s, rng.uniform(-0.01, 0.01, n_params).astype(np.float32), 18.0) for s in sites]
    agg1, agg2 = _agg(3, "site-round-1", length=n_params), _agg(3, "site-round-2", length=n_params)
    _, _, shares, errors = _pipeline(parties, agg1, agg2)
    assert not errors, errors
    routed = agg2.receive_shares(shares)
    return HospitalSite(sites[0]), parties[0].state, agg2, routed


def _pipelined_train(agg2, routed, **kw):
    req = honest_request(kw.pop("base_dir"), round_=2, run_id=HONEST_RUN, hospitals_in_round=3)
    req.meta[MASKED_FIELD] = {**routed[0], "round_id": agg2.params.round_id}
    return req


def test_pipelined_train_reply_carries_only_the_masked_update(pipelined_site, base_dir):
    site, state, agg2, routed = pipelined_site
    before = ledger_bytes(site)
    reply = site.handle("train", _pipelined_train(agg2, routed, base_dir=base_dir), state)
    assert reply.meta["status"] == "ok", reply.meta
    assert set(reply.arrays) == {"sa.masked"} and reply.arrays["sa.masked"].dtype.kind == "u"
    assert reply.meta[MASKED_FIELD] == {"index": 1} and "weight" not in reply.meta
    assert len(ledger_bytes(site)) > len(before)  # the round was accounted before it left
    assert NEXT_SESSION_KEY not in state.meta and not state.arrays
    assert b'"stage":"masked"' in bytes(state.meta[SESSION_KEY])


def test_attack_replayed_pipelined_train(pipelined_site, base_dir):
    """The same pipelined train request twice: the second is refused before training (the
    session masked its one update), so a replay costs no budget and masks nothing."""
    site, state, agg2, routed = pipelined_site
    req = _pipelined_train(agg2, routed, base_dir=base_dir)
    assert site.handle("train", req, state).meta["status"] == "ok"
    before = ledger_bytes(site)
    with pytest.raises(SecAggError, match="not set up \\(or has used already\\)"):
        site.handle("train", req, state)
    assert ledger_bytes(site) == before


def test_attack_pipelined_train_names_another_round(pipelined_site, base_dir, no_patient_reads):
    site, state, agg2, routed = pipelined_site
    before = ledger_bytes(site)
    req = _pipelined_train(agg2, routed, base_dir=base_dir)
    req.meta[MASKED_FIELD]["round_id"] = bytes(16)
    with pytest.raises(SecAggError, match="another pipelined"):
        site.handle("train", req, state)
    assert ledger_bytes(site) == before and NEXT_SESSION_KEY in state.meta


def test_attack_refused_pipelined_train_burns_the_session(pipelined_site, base_dir):
    """A pipelined train request the hospital refuses after the secure-sum check (here NaN
    in the global adapter) uses the session up: the honest request that follows is
    refused too, so no pipelined session is ever left for a later round to reuse."""
    site, state, agg2, routed = pipelined_site
    bad = _pipelined_train(agg2, routed, base_dir=base_dir)
    arrays = bad.array_list("global")
    arrays[0] = np.full_like(arrays[0], np.nan)
    bad.put_array_list("global", arrays)
    assert site.handle("train", bad, state).meta["status"] == "declined"
    assert NEXT_SESSION_KEY not in state.meta
    before = ledger_bytes(site)
    with pytest.raises(SecAggError, match="not set up"):
        site.handle("train", _pipelined_train(agg2, routed, base_dir=base_dir), state)
    with pytest.raises(SecAggError, match="no trained update"):  # nor a standalone masked upload
        site.handle("secagg_masked", to_payload(routed[0]), state)
    assert ledger_bytes(site) == before


def test_attack_train_with_both_fresh_and_pipelined_sums(pipelined_site, base_dir, no_patient_reads):
    site, state, agg2, routed = pipelined_site
    before = ledger_bytes(site)
    req = _pipelined_train(agg2, routed, base_dir=base_dir)
    req.meta[SETUP_FIELD] = {**agg2.params.to_message(), "index": 1}
    with pytest.raises(SecAggError, match="both a fresh and a pipelined"):
        site.handle("train", req, state)
    assert ledger_bytes(site) == before


def test_attack_pipelined_train_without_a_set_up(hospital, base_dir, tmp_path, no_patient_reads):
    """A pipelined train request to a hospital that set nothing up: refused before training."""
    site = HospitalSite(provision_roster(
        [hospital.site, *[SiteConfig(name=f"p{i}", cohort=str(tmp_path / "none"),
                                     state_dir=str(tmp_path / f"p{i}")) for i in (2, 3)]],
        tmp_path / "roster.toml")[0])
    before = ledger_bytes(site)
    req = honest_request(base_dir, round_=2, run_id=HONEST_RUN, hospitals_in_round=3)
    req.meta[MASKED_FIELD] = {"round_id": bytes(16), "senders": [2, 3], "ciphertexts": [b"", b""]}
    with pytest.raises(SecAggError, match="not set up"):
        site.handle("train", req, Payload())
    assert ledger_bytes(site) == before


def test_attack_tampered_shares_in_the_pipelined_train(pipelined_site, base_dir):
    """Routed shares with one ciphertext flipped: refused before training (nothing spent),
    and the session is used up."""
    site, state, agg2, routed = pipelined_site
    before = ledger_bytes(site)
    req = _pipelined_train(agg2, routed, base_dir=base_dir)
    cts = list(req.meta[MASKED_FIELD]["ciphertexts"])
    cts[0] = bytes([cts[0][0] ^ 1]) + bytes(cts[0][1:])
    req.meta[MASKED_FIELD]["ciphertexts"] = cts
    with pytest.raises(SecAggError):
        site.handle("train", req, state)
    assert ledger_bytes(site) == before and NEXT_SESSION_KEY not in state.meta
