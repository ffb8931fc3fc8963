"""The SuperNode wrapper shortens only Flower's SuperNode sleeps, nothing else."""

from __future__ import annotations

import time

import flwr.supernode.start_client_internal as sci
import pytest

from fedrg.deploy import fast_supernode as fs
from fedrg.deploy import processes as P


@pytest.fixture
def slept(monkeypatch):
    seen: list[float] = []
    monkeypatch.setattr(fs, "_real_sleep", seen.append)
    monkeypatch.setattr(sci, "time", time)  # restored after the test
    return seen


def test_patch_replaces_the_idle_and_reply_sleeps_in_flowers_module_only(slept):
    assert fs.patch_supernode_poll(0.25)
    assert sci.time is not time and time.sleep is not sci.time.sleep
    sci.time.sleep(3)  # the idle pull sleep
    sci.time.sleep(0.5)  # the reply check
    sci.time.sleep(0.01)
    assert slept == [0.25, fs.REPLY_CHECK_S, 0.01]
    assert sci.time.monotonic is time.monotonic  # everything else is the real module


def test_poll_is_fast_only_while_messages_arrive(slept, monkeypatch):
    # Flower's pull loop calls _pull_and_store_message by its module name: run id or None
    answers = iter([None, 42, None])
    monkeypatch.setattr(sci, "_pull_and_store_message", lambda **_: next(answers))
    monkeypatch.setitem(fs._last_message, "at", -float("inf"))
    assert fs.patch_supernode_poll(0.5, 0.1)
    assert sci._pull_and_store_message() is None
    sci.time.sleep(3)  # idle: the idle poll
    assert sci._pull_and_store_message() == 42
    sci.time.sleep(3)  # a message just arrived: the active poll
    assert sci._pull_and_store_message() is None
    monkeypatch.setitem(fs._last_message, "at", time.monotonic() - fs.ACTIVE_WINDOW_S - 1)
    sci.time.sleep(3)  # nothing for longer than the window: idle again
    assert slept == [0.5, 0.1, 0.5]


def test_unexpected_flower_module_is_left_alone(slept, monkeypatch):
    other = object()
    monkeypatch.setattr(sci, "time", other)
    assert not fs.patch_supernode_poll(0.25)
    assert sci.time is other


@pytest.mark.parametrize("raw,ok", [("", 0.5), ("0.2", 0.2), ("abc", None), ("10", None),
                                    ("0", None)])
def test_poll_setting_is_checked(monkeypatch, raw, ok):
    monkeypatch.setenv(fs.POLL_ENV, raw)
    if ok is None:
        with pytest.raises(SystemExit, match=fs.POLL_ENV):
            fs.poll_interval()
    else:
        assert fs.poll_interval() == ok


def test_active_poll_setting_is_checked(monkeypatch):
    monkeypatch.setenv(fs.ACTIVE_POLL_ENV, "")
    assert fs.poll_interval(fs.ACTIVE_POLL_ENV, fs.DEFAULT_ACTIVE_POLL_S) == 0.1
    monkeypatch.setenv(fs.ACTIVE_POLL_ENV, "0.01")
    with pytest.raises(SystemExit, match=fs.ACTIVE_POLL_ENV):
        fs.poll_interval(fs.ACTIVE_POLL_ENV, fs.DEFAULT_ACTIVE_POLL_S)


def test_supernode_argv_runs_the_wrapper_with_flowers_arguments():
    argv = P.supernode_argv(superlink="127.0.0.1:9092", root_cert=None, auth_key=None,
                            node_config={}, port=9094)
    assert argv[1:3] == ["-m", "fedrg.deploy.fast_supernode"]
    assert argv[3:] == ["--superlink", "127.0.0.1:9092", "--host", "127.0.0.1", "--port", "9094",
                        "--insecure"]
