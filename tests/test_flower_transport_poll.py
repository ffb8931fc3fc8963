"""GridTransport polls Flower's Grid at sub-second intervals through push/pull_messages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedrg.flower import transport as transport_mod
from fedrg.flower.records import payload_to_record
from fedrg.flower.transport import GridTransport
from fedrg.payload import Payload


class ScriptedGrid:
    """Flower's Grid contract (push returns ids; pull returns replies naming them),
    with each node's reply becoming available after a given number of pulls."""

    def __init__(self, ready_after: dict[int, int]) -> None:
        self.ready_after = ready_after
        self.pulls = 0
        self.pushed: dict[str, int] = {}
        self.send_and_receive_called = False

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{m.metadata.dst_node_id}"
            self.pushed[mid] = m.metadata.dst_node_id
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in list(message_ids):
            node = self.pushed[mid]
            if self.pulls >= self.ready_after[node]:
                out.append(SimpleNamespace(
                    metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=mid),
                    has_error=lambda: False,
                    content=payload_to_record(Payload(meta={"node": node}))))
        return out

    def send_and_receive(self, *_a, **_k):  # Flower's 3 s loop must not be used
        self.send_and_receive_called = True
        raise AssertionError("send_and_receive used")


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch):
    """Flower's Message needs the run, node and task ids a ServerApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


@pytest.fixture
def sleeps(monkeypatch):
    seen: list[float] = []
    monkeypatch.setattr(transport_mod.time, "sleep", seen.append)
    return seen


def test_collects_replies_arriving_over_several_polls(sleeps):
    grid = ScriptedGrid({1: 1, 2: 4, 3: 9})
    t = GridTransport(grid)
    replies = t.send("train", {n: Payload(meta={"x": n}) for n in (1, 2, 3)}, round_=1)
    assert sorted(replies) == [1, 2, 3]
    assert all(r.ok and r.payload.meta["node"] == n for n, r in replies.items())
    assert grid.pulls == 9 and not grid.send_and_receive_called
    assert sleeps and max(sleeps) <= t.poll_max < 1.0  # sub-second, bounded back-off
    assert min(sleeps) == t.poll_min


def test_timeout_returns_what_arrived(monkeypatch, sleeps):
    clock = iter(range(0, 10_000))
    monkeypatch.setattr(transport_mod.time, "monotonic", lambda: float(next(clock)))
    grid = ScriptedGrid({1: 1, 2: 10_000})
    replies = GridTransport(grid).send("evaluate", {1: Payload(), 2: Payload()}, round_=2,
                                       timeout=5.0)
    assert sorted(replies) == [1]
    assert grid.pulls < 10
