"""The secure sum's wire format: field names and protocol-dict <-> payload conversion.

Shared by the server half (:mod:`fedrg.federated.secure`) and the hospital half
(:mod:`fedrg.hospital.secure`) so that each name is defined once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedrg.payload import Payload

SESSION_KEY = "secagg_session"
"""Node-state key of this round's session."""
SETUP_FIELD = "secagg_setup"
"""Train-request meta key holding this hospital's stage-1 secure-aggregation request."""
KEYS_FIELD = "secagg_keys"
"""Train-reply meta key holding the hospital's signed round keys (its stage-1 reply)."""
NEXT_SESSION_KEY = "secagg_next_session"
"""Node-state key of the next round's session, set up while this round finishes."""
NEXT_SETUP_FIELD = "secagg_next_setup"
"""Consistency-request key: the next round's stage-1 request (pipelined set-up)."""
NEXT_KEYS_FIELD = "secagg_next_keys"
"""Consistency-reply key: the hospital's signed keys for the next round."""
NEXT_SHARE_FIELD = "secagg_next_share"
"""Unmask-request key: the next round's signed key list (its stage-2 request)."""
NEXT_SHARES_FIELD = "secagg_next_shares"
"""Unmask-reply key: the hospital's encrypted shares for the next round."""
NEXT_ERROR_FIELD = "secagg_next_error"
"""Reply key: why the hospital refused the pipelined next-round part (public reason)."""
MASKED_FIELD = "secagg_masked"
"""Train-request key: the shares routed to this hospital in a pipelined round (plus its
round id); train-reply key: ``{"index"}`` of the masked update (array ``sa.masked``)."""
SEEN_ROUNDS_KEY = "secagg_seen_rounds"
"""Node-state key: the round ids this hospital has answered (replays are refused)."""
SEEN_ROUNDS_KEPT = 1000


def to_payload(message: dict[str, Any]) -> Payload:
    """Protocol dict -> payload (numpy arrays travel as arrays, the rest as metadata)."""
    p = Payload()
    for key, value in message.items():
        if isinstance(value, np.ndarray):
            p.arrays[f"sa.{key}"] = value
        else:
            p.meta[key] = value
    return p


def from_payload(payload: Payload) -> dict[str, Any]:
    """Inverse of :func:`to_payload`."""
    out = dict(payload.meta)
    for key, value in payload.arrays.items():
        if key.startswith("sa."):
            out[key[3:]] = value
    return out
