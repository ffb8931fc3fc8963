"""A :class:`~fedrg.federated.payload.Transport` over Flower's Message API ``Grid``."""

from __future__ import annotations

import logging
import time

from flwr.app import Message
from flwr.serverapp import Grid

from fedrg.federated.payload import Payload, Reply
from fedrg.flower.records import payload_to_record, record_to_payload
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

    def __init__(self, grid: Grid, *, min_nodes: int = 1, wait_for_nodes: float = 60.0) -> None:
        self.grid = grid
        self.min_nodes = min_nodes
        self.wait_for_nodes = wait_for_nodes
        self.last_secagg_bytes = (0, 0)

    def nodes(self) -> list[int]:
        """Connected node ids; waits (bounded) until ``min_nodes`` are connected."""
        deadline = time.monotonic() + self.wait_for_nodes
        ids = sorted(self.grid.get_node_ids())
        while len(ids) < self.min_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
            ids = sorted(self.grid.get_node_ids())
        return ids

    def send(self, action: str, messages: dict[int, Payload], *, round_: int,
             timeout: float | None = None) -> dict[int, Reply]:
        """Send ``action`` to each node and collect the replies that arrive."""
        message_type = ACTIONS[action]
        out = [Message(content=payload_to_record(p), dst_node_id=node, message_type=message_type,
                       group_id=str(round_)) for node, p in messages.items()]
        replies: dict[int, Reply] = {}
        for msg in self.grid.send_and_receive(out, timeout=timeout):
            node = msg.metadata.src_node_id
            if msg.has_error():
                replies[node] = Reply(node=node, error=str(msg.error.reason))
                log.warning("%s from node %s failed: %s", action, node, msg.error.reason)
            else:
                replies[node] = Reply(node=node, payload=record_to_payload(msg.content))
        return replies
