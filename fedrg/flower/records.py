"""Payload <-> Flower RecordDict conversion (the only place that knows the record layout).

All arrays of a payload travel **packed** in one byte array (:func:`pack_arrays`), with
their names, dtypes and shapes in the ConfigRecord: Flower stores and transfers every
``Array`` as its own object (one request per object and hop in deployment), so the ~50
tensors of an adapter cost about a second per message on a 2-core machine, and one packed
array costs one object. Unpacking accepts plain numeric dtypes only, checks every offset
and size against the buffer, and copies each array out.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, RecordDict

from fedrg.errors import FedrgError
from fedrg.payload import Payload, meta_from_json, meta_to_json

ARRAYS_KEY = "arrays"
META_KEY = "meta"
PACKED_KEY = "packed"
LAYOUT_KEY = "packed_layout"
_PACKABLE_KINDS = "biuf"  # bool, signed/unsigned integers, floats: nothing else is unpacked


SCALARS_KEY = "scalar_arrays"


class RecordLayoutError(FedrgError):
    """A message's packed arrays do not match their layout (malformed or hostile)."""


def pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """All ``arrays`` in one ``uint8`` buffer, and the JSON layout to unpack them.

    Raises
    ------
    RecordLayoutError
        For a dtype that is not bool, integer or float.
    """
    layout = []
    parts = []
    offset = 0
    for name in sorted(arrays):
        a = np.asarray(arrays[name])  # (np.ascontiguousarray would make a 0-d array 1-d)
        a = a if a.flags.c_contiguous else a.copy(order="C")
        if a.dtype.kind not in _PACKABLE_KINDS:
            raise RecordLayoutError(f"array {name!r} has dtype {a.dtype}: only bool, integer "
                                    "and float arrays travel in messages")
        raw = a.reshape(-1).view(np.uint8) if a.size else np.empty(0, np.uint8)
        layout.append([name, a.dtype.str, list(a.shape), offset, int(raw.size)])
        parts.append(raw)
        offset += int(raw.size)
    buf = np.concatenate(parts) if parts else np.empty(0, np.uint8)
    return buf, json.dumps(layout, separators=(",", ":"))


def unpack_arrays(buf: np.ndarray, layout_json: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays`, validating the layout against the buffer.

    Raises
    ------
    RecordLayoutError
        When the layout is unreadable, names a non-numeric dtype, or an entry's shape,
        offset or size does not fit the buffer.
    """
    data = np.asarray(buf)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise RecordLayoutError("packed arrays must be a flat uint8 buffer")
    try:
        layout = json.loads(layout_json)
        if not isinstance(layout, list):
            raise ValueError("not a list")
        out: dict[str, np.ndarray] = {}
        for name, dtype_str, shape, offset, size in layout:
            dtype = np.dtype(str(dtype_str))
            if dtype.kind not in _PACKABLE_KINDS or dtype.hasobject:
                raise ValueError(f"dtype {dtype_str!r} of {name!r} is not allowed")
            shape = tuple(int(d) for d in shape)
            offset, size = int(offset), int(size)
            if any(d < 0 for d in shape) or offset < 0 or size < 0:
                raise ValueError(f"negative shape, offset or size for {name!r}")
            if size != math.prod(shape) * dtype.itemsize or offset + size > data.size:
                raise ValueError(f"{name!r}: shape {shape} x {dtype} does not fit "
                                 f"{size} bytes at {offset} of {data.size}")
            if not isinstance(name, str) or name in out:
                raise ValueError(f"array name {name!r} is not a new string")
            out[name] = data[offset:offset + size].view(dtype).reshape(shape).copy()
    except (TypeError, ValueError) as err:
        raise RecordLayoutError(f"malformed packed arrays in a message: {err}") from None
    return out


def payload_to_record(payload: Payload) -> RecordDict:
    """Convert a :class:`Payload` to a ``RecordDict`` (ArrayRecord + ConfigRecord).

    Flower's ``Array`` turns a 0-d array into shape ``(1,)``; the names of 0-d arrays
    travel in the ConfigRecord so :func:`record_to_payload` restores their shape.
    """
    config: dict[str, ConfigRecordValues] = {"json": meta_to_json(payload.meta)}
    if not payload.arrays:
        return RecordDict({ARRAYS_KEY: ArrayRecord(), META_KEY: ConfigRecord(config)})
    buf, layout = pack_arrays(payload.arrays)
    config[LAYOUT_KEY] = layout
    return RecordDict({ARRAYS_KEY: ArrayRecord(array_dict={PACKED_KEY: Array(buf)}),
                       META_KEY: ConfigRecord(config)})


def record_to_payload(content: RecordDict) -> Payload:
    """Inverse of :func:`payload_to_record` (also reads the unpacked layout of earlier versions).

    Raises
    ------
    RecordLayoutError
        When packed arrays do not match their layout.
    """
    meta: dict = {}
    arrays: dict[str, np.ndarray] = {}
    scalars: set[str] = set()
    layout = None
    if META_KEY in content:
        meta = meta_from_json(str(content[META_KEY]["json"]))
        if SCALARS_KEY in content[META_KEY]:
            scalars = set(meta_from_json(str(content[META_KEY][SCALARS_KEY]))["names"])
        if LAYOUT_KEY in content[META_KEY]:
            layout = str(content[META_KEY][LAYOUT_KEY])
    if ARRAYS_KEY in content:
        record = content[ARRAYS_KEY]
        if not isinstance(record, ArrayRecord):
            raise RecordLayoutError(f"a message's {ARRAYS_KEY!r} record is a {type(record).__name__}, "
                                    "not an ArrayRecord")
        for key, arr in record.items():
            a = arr.numpy()
            if layout is not None and key == PACKED_KEY:
                arrays.update(unpack_arrays(a, layout))
            else:
                arrays[key] = a.reshape(()) if key in scalars else a
    return Payload(meta=meta, arrays=arrays)
