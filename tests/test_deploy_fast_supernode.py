"""The SuperNode wrapper shortens only Flower's SuperNode sleeps, only in the reviewed Flower code."""

from __future__ import annotations

import inspect
import time

import flwr.supernode.start_client_internal as sci
import pytest

from fedrg.deploy import fast_supernode as fs
from fedrg.deploy import processes as P
from fedrg.library_pins import LibraryChangedError, source_digest


@pytest.fixture
def slept(monkeypatch):
    seen: list[float] = []
    monkeypatch.setattr(fs, "_real_sleep", seen.append)
    monkeypatch.setattr(sci, "time", time)  # restored after the test
    return seen


def test_patch_replaces_the_idle_and_reply_sleeps_in_flowers_module_only(slept):
    fs.patch_supernode_poll(0.25)
    assert sci.time is not time and time.sleep is not sci.time.sleep
    sci.time.sleep(3)  # the idle pull sleep
    sci.time.sleep(0.5)  # the reply check
    sci.time.sleep(0.01)
    assert slept == [0.25, fs.REPLY_CHECK_S, 0.01]
    assert sci.time.monotonic is time.monotonic  # everything else is the real module


def test_poll_is_fast_only_while_replies_are_awaited(slept, monkeypatch):
    monkeypatch.setitem(fs._last_message, "at", -float("inf"))
    fs.patch_supernode_poll(0.5, 0.1)
    sci.time.sleep(3)  # idle: the idle poll
    sci.time.sleep(0.5)  # Flower waits for the ClientApp's reply to a message it pulled
    sci.time.sleep(3)  # a message just came: the active poll
    monkeypatch.setitem(fs._last_message, "at", time.monotonic() - fs.ACTIVE_WINDOW_S - 1)
    sci.time.sleep(3)  # nothing for longer than the window: idle again
    assert slept == [0.5, fs.REPLY_CHECK_S, 0.1, 0.5]


def test_patched_flower_module_is_the_reviewed_code():
    # fails loudly when the installed Flower's SuperNode loop changes: review
    # fedrg/deploy/fast_supernode.py against it, then update FLOWER_SOURCES
    assert fs.flower_module() is sci
    assert source_digest(sci) == fs.FLOWER_SOURCES[fs.FLOWER_MODULE]
    src = inspect.getsource(sci)
    # the three sleeps the shim replaces, and no other use of the time module
    assert src.count("time.sleep(3)") == 1 and src.count("time.sleep(0.5)") == 2
    assert [ln.strip() for ln in src.splitlines() if "time." in ln and "sleep" not in ln] == [
        "If set to None, there is no limit to the total time."]


def test_changed_flower_module_is_refused_loudly(slept, monkeypatch):
    monkeypatch.setitem(fs.FLOWER_SOURCES, fs.FLOWER_MODULE, "0" * 64)  # another release's
    with pytest.raises(LibraryChangedError, match=r"flwr 1\.42\.\d+: flwr\.supernode\."
                       r"start_client_internal is not the code fedrg\.deploy\.fast_supernode"):
        fs.patch_supernode_poll(0.25)
    assert sci.time is time  # nothing patched
    monkeypatch.setenv(fs.POLL_ENV, "")
    monkeypatch.setenv(fs.ACTIVE_POLL_ENV, "")
    with pytest.raises(SystemExit, match="fedrg SuperNode: flwr"):
        fs.main()  # the SuperNode does not start, half-patched or unpatched


def test_time_replaced_by_someone_else_is_refused_loudly(slept, monkeypatch):
    other = object()
    monkeypatch.setattr(sci, "time", other)
    with pytest.raises(LibraryChangedError, match="not the time module"):
        fs.patch_supernode_poll(0.25)
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
