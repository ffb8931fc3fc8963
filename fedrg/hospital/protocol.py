"""What a hospital accepts on the wire beyond the secure sum: field names and their checks.

The server (:mod:`fedrg.federated`) imports these names; the hospital checks every field
itself (:mod:`fedrg.hospital.site`).
"""

from __future__ import annotations

from typing import Any

#: ``reason`` of a refusal because the ledger does not extend the head the server saw, or the
#: state directory no longer holds the ledger its anchors (roster key, genesis) pin.
LEDGER_NOT_EXTENDING = "ledger_not_extending"

#: Meta field of a train request: the round whose global adapter (the arrays it carries) to evaluate.
EVALUATE_FIELD = "evaluate_round"
#: Meta field of a train reply: the hospital's answer to that request (an ``evaluate`` reply's meta).
EVALUATION_FIELD = "evaluation"


def check_evaluate_round(meta: dict[str, Any]) -> tuple[int | None, str]:
    """The round a train request asks to evaluate, or why the request is refused.

    Only the round just before the train request's own round is valid: the arrays of a
    round ``r + 1`` train message are round ``r``'s result, nothing else (round 0: the
    starting adapter, which round 1's train message carries).

    Parameters
    ----------
    meta
        The train request's meta (``round`` and ``evaluate_round``).

    Returns
    -------
    tuple[int | None, str]
        ``(round, "")`` for a valid request, ``(None, message)`` otherwise.
    """
    raw = meta.get(EVALUATE_FIELD)
    train_round = meta.get("round")
    if isinstance(train_round, bool) or not isinstance(train_round, int):
        return None, (f"{EVALUATE_FIELD}={raw!r:.40} came with a train request whose round "
                      f"{train_round!r:.40} is not an integer; no evaluation is made for it")
    if isinstance(raw, bool) or not isinstance(raw, int):
        return None, (f"{EVALUATE_FIELD}={raw!r:.40} in the train request of round {train_round} "
                      f"is not a round number; it must be the integer {train_round - 1} (the "
                      "round whose result the request carries)")
    if raw != train_round - 1 or raw < 0:
        return None, (f"{EVALUATE_FIELD}={raw} in the train request of round {train_round}: a "
                      f"train message may ask only for the evaluation of round {train_round - 1}, "
                      "whose result it carries; send an `evaluate` message for any other round")
    return raw, ""
