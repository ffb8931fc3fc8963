"""A :class:`~fedrg.payload.Transport` over Flower's Message API ``Grid``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import Message
from flwr.serverapp import Grid

from fedrg.flower.records import payload_to_record, record_to_payload
from fedrg.payload import Payload, Reply
from fedrg.secagg.stages import SecAggStage

log = logging.getLogger("fedrg.flower")

ACTIONS = {
    "train": "train",
    "evaluate": "evaluate",
    **{stage.action: stage.message_type for stage in SecAggStage},
    "ledger": "evaluate.ledger",  # the hospital's public ledger copy, after the last round
}


class GridTransport:
    """Sends payloads as Flower messages and turns replies back into payloads."""

    def __init__(self, grid: Grid, *, min_nodes: int = 1, wait_for_nodes: float = 60.0,
                 on_send: Callable[[str, int, int], None] | None = None,
                 poll_min: float = 0.05, poll_max: float = 0.25) -> None:
        self.grid = grid
        self.poll_min = poll_min
        self.poll_max = poll_max
        self.min_nodes = min_nodes
        self.wait_for_nodes = wait_for_nodes
        self.on_send = on_send  # (action, round, number of nodes): progress display
        self.last_secagg_bytes = (0, 0)
        self._message_seconds: dict[str, float] = {}

    def pop_message_seconds(self) -> dict[str, float]:
        """Server wall time per action since the last call (push to last reply), then reset."""
        out, self._message_seconds = self._message_seconds, {}
        return {k: round(v, 3) for k, v in out.items()}

    def nodes(self) -> list[int]:
        """Connected node ids; waits (bounded) until ``min_nodes`` are connected."""
        deadline = time.monotonic() + self.wait_for_nodes
        ids = sorted(self.grid.get_node_ids())
        while len(ids) < self.min_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
            ids = sorted(self.grid.get_node_ids())
        return ids

    def _exchange(self, out: list[Message], timeout: float | None) -> list[Message]:
        """Push ``out`` and pull the replies, polling at sub-second intervals.

        Flower's deployed ``Grid.send_and_receive`` sleeps 3 s between pulls; this uses the
        public ``push_messages`` / ``pull_messages`` and polls every ``poll_min`` seconds,
        backing off to ``poll_max`` while nothing arrives. ``timeout=None`` waits for all.
        """
        pending = set(self.grid.push_messages(out))
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = self.poll_min
        got: list[Message] = []
        while pending:
            msgs = list(self.grid.pull_messages(pending))
            got.extend(msgs)
            pending.difference_update(m.metadata.reply_to_message_id for m in msgs)
            if not pending:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            interval = self.poll_min if msgs else min(self.poll_max, interval * 1.5)
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - now)))
        return got

    def send(self, action: str, messages: dict[int, Payload], *, round_: int,
             timeout: float | None = None) -> dict[int, Reply]:
        """Send ``action`` to each node and collect the replies that arrive."""
        message_type = ACTIONS[action]
        if self.on_send is not None:
            self.on_send(action, round_, len(messages))
        out = [Message(content=payload_to_record(p), dst_node_id=node, message_type=message_type,
                       group_id=str(round_)) for node, p in messages.items()]
        replies: dict[int, Reply] = {}
        t0 = time.perf_counter()
        got = self._exchange(out, timeout)
        self._message_seconds[action] = (self._message_seconds.get(action, 0.0)
                                         + time.perf_counter() - t0)
        for msg in got:
            node = msg.metadata.src_node_id
            if msg.has_error():
                replies[node] = Reply(node=node, error=str(msg.error.reason))
                log.warning("%s from node %s failed: %s", action, node, msg.error.reason)
            else:
                replies[node] = Reply(node=node, payload=record_to_payload(msg.content))
        return replies
