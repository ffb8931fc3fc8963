"""Transport-neutral messages between server and hospitals.

A :class:`Payload` is a set of named numpy arrays plus a JSON-able ``meta`` dict in which
``bytes`` values are allowed (encoded as base64 on the wire). The Flower glue maps arrays to
an ``ArrayRecord`` and ``meta`` to a ``ConfigRecord``; nothing else crosses the wire.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

_BYTES_TAG = "__b64__"


def _encode(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {_BYTES_TAG: base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_BYTES_TAG}:
            return base64.b64decode(obj[_BYTES_TAG])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def meta_to_json(meta: dict[str, Any]) -> str:
    """Serialise ``meta`` (bytes allowed) to a JSON string."""
    return json.dumps(_encode(meta), sort_keys=True, separators=(",", ":"))


def meta_from_json(text: str) -> dict[str, Any]:
    """Inverse of :func:`meta_to_json`."""
    return _decode(json.loads(text))


@dataclass
class Payload:
    """One message body: named arrays + metadata."""

    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes this payload occupies on the wire (arrays + JSON meta)."""
        return sum(int(a.nbytes) for a in self.arrays.values()) + len(meta_to_json(self.meta))

    def array_list(self, prefix: str) -> list[np.ndarray]:
        """Arrays named ``prefix.00000``, ``prefix.00001``, ... in order."""
        keys = sorted(k for k in self.arrays if k.startswith(prefix + "."))
        return [self.arrays[k] for k in keys]

    def put_array_list(self, prefix: str, arrays: list[np.ndarray]) -> None:
        """Store an ordered list of arrays under ``prefix``."""
        for i, a in enumerate(arrays):
            self.arrays[f"{prefix}.{i:05d}"] = a


@dataclass
class Reply:
    """A hospital's answer: a payload, or an error message (no data in it)."""

    node: int
    payload: Payload | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.payload is not None

    @property
    def body(self) -> Payload:
        """The payload of a reply that has one (check :attr:`ok` first).

        Raises
        ------
        FedrgError
            For an error reply (no payload), naming the node and its error.
        """
        if self.payload is None:
            from fedrg.errors import FedrgError

            raise FedrgError(f"node {self.node} sent no payload ({self.error or 'empty reply'})")
        return self.payload


class Transport(Protocol):
    """How the server loop talks to hospitals (Flower Grid in production, in-process in tests)."""

    def nodes(self) -> list[int]:
        """Ids of connected hospitals."""
        ...

    def send(self, action: str, messages: dict[int, Payload], *, round_: int,
             timeout: float | None = None) -> dict[int, Reply]:
        """Send one payload per node for ``action``; return the replies that arrived."""
        ...
