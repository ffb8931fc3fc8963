"""Federated evaluation folded into the next round's train message (issue 16 item 2).

After round ``r`` the server does not send a separate ``evaluate`` message: the train
request of round ``r + 1`` carries the new global adapter anyway (it *is* round ``r``'s
result), so the hospitals sampled for round ``r``'s evaluation that also train in round
``r + 1`` find ``meta["evaluate_round"] = r`` in it and answer the evaluation inside their
train reply (``meta["evaluation"]``, exactly what ``HospitalSite.evaluate`` returns). The
other evaluation hospitals of round ``r``, and every evaluation hospital of the last round,
still get a plain ``evaluate`` message.

The wire names and the hospital's check of the request field are in
:mod:`fedrg.hospital.protocol`; this module holds the server's :class:`PendingEvaluation` (round ``r``'s metrics row waiting for its evaluation;
it is part of the run checkpoint, so a resumed run still gets it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedrg.hospital.protocol import EVALUATE_FIELD, EVALUATION_FIELD
from fedrg.payload import meta_to_json

__all__ = ["EVALUATE_FIELD", "EVALUATION_FIELD", "PendingEvaluation", "request_bytes"]


def request_bytes(round_: int) -> int:
    """Bytes the evaluation request adds to one train message (its meta field)."""
    return len(meta_to_json({EVALUATE_FIELD: int(round_)})) - 1  # no braces, one comma


@dataclass
class PendingEvaluation:
    """Round ``round``'s metrics row, waiting for its evaluation.

    Parameters
    ----------
    round
        The evaluated round (its global adapter is the run's current one until the next
        round aggregates).
    nodes
        The hospitals sampled to evaluate it.
    row
        Its metrics row without the evaluation (bytes and seconds of the round so far).
    answers
        Evaluation replies collected so far (in memory only: not checkpointed).
    """

    round: int
    nodes: list[int]
    row: dict[str, Any]
    answers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """What the run checkpoint keeps (``state.json`` ``pending_evaluation``)."""
        return {"round": self.round, "nodes": list(self.nodes), "row": self.row}

    @classmethod
    def from_json(cls, obj: Any) -> PendingEvaluation:
        """Inverse of :meth:`to_json`.

        Raises
        ------
        ValueError
            When ``obj`` is not a checkpoint's pending evaluation.
        """
        if not isinstance(obj, dict) or not isinstance(obj.get("row"), dict):
            raise ValueError(f"not a pending evaluation: {obj!r:.200}")
        return cls(round=int(obj["round"]), nodes=[int(n) for n in obj["nodes"]],
                   row=dict(obj["row"]))
