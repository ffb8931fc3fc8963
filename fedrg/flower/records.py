"""Payload <-> Flower RecordDict conversion (the only place that knows the record layout)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedrg.federated.payload import Payload, meta_from_json, meta_to_json

ARRAYS_KEY = "arrays"
META_KEY = "meta"


def payload_to_record(payload: Payload) -> RecordDict:
    """Convert a :class:`Payload` to a ``RecordDict`` (ArrayRecord + ConfigRecord)."""
    arrays = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v))
                                     for k, v in sorted(payload.arrays.items())})
    return RecordDict({ARRAYS_KEY: arrays, META_KEY: ConfigRecord({"json": meta_to_json(payload.meta)})})


def record_to_payload(content: RecordDict) -> Payload:
    """Inverse of :func:`payload_to_record`."""
    meta: dict = {}
    arrays: dict[str, np.ndarray] = {}
    if META_KEY in content:
        meta = meta_from_json(str(content[META_KEY]["json"]))
    if ARRAYS_KEY in content:
        for key, arr in content[ARRAYS_KEY].items():
            arrays[key] = arr.numpy()
    return Payload(meta=meta, arrays=arrays)
