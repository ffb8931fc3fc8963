"""The hospital worker: real socket, real key, the real dispatch; the ClientApp forwards."""

from __future__ import annotations

import socket
import stat
import threading
from multiprocessing.connection import Client

import numpy as np
import pytest

from fedrg.config import SiteConfig
from fedrg.errors import FedrgError
from fedrg.hospital.answer import answer
from fedrg.hospital.worker import (
    KEY_NAME,
    HospitalWorker,
    WorkerError,
    _pack,
    _unpack,
    forward,
    socket_path,
)
from fedrg.payload import Payload
from fedrg.policy import SitePolicy


@pytest.fixture
def site(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "ledger.jsonl").write_text('{"entry": 1}\n')
    return SiteConfig(name="h1", cohort=str(tmp_path / "cohort"), state_dir=str(state),
                      policy=SitePolicy(epsilon_budget=5.0, epsilon_per_run=5.0))


def _serve(worker: HospitalWorker, n: int) -> threading.Thread:
    t = threading.Thread(target=lambda: [worker.serve_one() for _ in range(n)], daemon=True)
    t.start()
    return t


def test_no_worker_means_in_process(site):
    assert forward(site, "ledger", Payload(), Payload()) is None


def test_pack_round_trip_keeps_arrays_bytes_and_nested_meta():
    p = Payload(meta={"a": 1, "b": b"\x00\xff", "c": {"d": [1.5, None]}},
                arrays={"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array([7], np.int64)})
    header, parts = _unpack(_pack({"k": "v"}, {"p": p, "q": Payload()}), ("p", "q"))
    assert header == {"k": "v"}
    assert parts["p"].meta == p.meta and parts["q"].meta == {} and parts["q"].arrays == {}
    for k in p.arrays:
        assert parts["p"].arrays[k].dtype == p.arrays[k].dtype
        np.testing.assert_array_equal(parts["p"].arrays[k], p.arrays[k])


def test_worker_answers_like_the_client_app_and_relays_state(site):
    worker = HospitalWorker(site)
    worker.open()
    try:
        assert stat.S_IMODE(socket_path(site.state_dir).stat().st_mode) == 0o600
        assert stat.S_IMODE((worker.state_dir / KEY_NAME).stat().st_mode) == 0o600
        t = _serve(worker, 1)
        state = Payload(meta={"kept": "yes"}, arrays={"pending": np.ones(3, np.float32)})
        reply = forward(site, "ledger", Payload(), state)
        t.join(10)
        assert reply is not None
        assert reply.meta == answer("ledger", site, Payload(), Payload()).meta
        assert state.meta == {"kept": "yes"} and state.arrays["pending"].tolist() == [1, 1, 1]
    finally:
        worker.close()
    assert not socket_path(site.state_dir).exists() and not (worker.state_dir / KEY_NAME).exists()


def test_worker_uses_its_own_site_config_not_the_forwarders(site, tmp_path):
    worker = HospitalWorker(site)
    worker.open()
    try:
        t = _serve(worker, 1)
        claimed = site.model_copy(update={"name": "someone-else"})
        reply = forward(claimed, "ledger", Payload(), Payload())
        t.join(10)
        assert reply is not None and reply.meta["site"] == "h1"
    finally:
        worker.close()


def test_refusal_is_relayed_with_its_public_message_only(site):
    worker = HospitalWorker(site)
    worker.open()
    try:
        t = _serve(worker, 1)
        with pytest.raises(WorkerError) as err:
            forward(site, "no_such_action", Payload(), Payload())
        t.join(10)
        assert "unknown action" in str(err.value)
        public = err.value.public_message()
        assert site.state_dir not in public and "no_such_action" not in public
    finally:
        worker.close()


def test_wrong_key_is_refused_and_the_worker_keeps_serving(site):
    worker = HospitalWorker(site)
    worker.open()
    try:
        t = _serve(worker, 2)
        with pytest.raises(Exception):  # noqa: B017 - AuthenticationError or a reset
            Client(str(socket_path(site.state_dir)), family="AF_UNIX", authkey=b"x" * 32)
        assert forward(site, "ledger", Payload(), Payload()) is not None
        t.join(10)
    finally:
        worker.close()


def test_second_worker_for_one_state_dir_is_refused_and_stale_socket_replaced(site):
    first = HospitalWorker(site)
    first.open()
    try:
        with pytest.raises(FedrgError, match="already listens"):
            HospitalWorker(site).open()
    finally:
        first.close()
    # a worker killed without cleaning up leaves its socket file behind
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(socket_path(site.state_dir)))
    dead.close()
    assert socket_path(site.state_dir).exists()
    second = HospitalWorker(site)
    second.open()  # replaces the stale socket
    try:
        t = _serve(second, 1)
        assert forward(site, "ledger", Payload(), Payload()) is not None
        t.join(10)
    finally:
        second.close()
