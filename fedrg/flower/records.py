"""Payload <-> Flower RecordDict conversion (the only place that knows the record layout)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedrg.federated.payload import Payload, meta_from_json, meta_to_json

ARRAYS_KEY = "arrays"
META_KEY = "meta"


SCALARS_KEY = "scalar_arrays"


def payload_to_record(payload: Payload) -> RecordDict:
    """Convert a :class:`Payload` to a ``RecordDict`` (ArrayRecord + ConfigRecord).

    Flower's ``Array`` turns a 0-d array into shape ``(1,)``; the names of 0-d arrays
    travel in the ConfigRecord so :func:`record_to_payload` restores their shape.
    """
    arrays = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v))
                                     for k, v in sorted(payload.arrays.items())})
    scalars = sorted(k for k, v in payload.arrays.items() if np.ndim(v) == 0)
    config = {"json": meta_to_json(payload.meta)}
    if scalars:
        config[SCALARS_KEY] = meta_to_json({"names": scalars})
    return RecordDict({ARRAYS_KEY: arrays, META_KEY: ConfigRecord(config)})


def record_to_payload(content: RecordDict) -> Payload:
    """Inverse of :func:`payload_to_record`."""
    meta: dict = {}
    arrays: dict[str, np.ndarray] = {}
    scalars: set[str] = set()
    if META_KEY in content:
        meta = meta_from_json(str(content[META_KEY]["json"]))
        if SCALARS_KEY in content[META_KEY]:
            scalars = set(meta_from_json(str(content[META_KEY][SCALARS_KEY]))["names"])
    if ARRAYS_KEY in content:
        for key, arr in content[ARRAYS_KEY].items():
            a = arr.numpy()
            arrays[key] = a.reshape(()) if key in scalars else a
    return Payload(meta=meta, arrays=arrays)
