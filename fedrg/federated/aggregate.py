"""Server-side aggregation of adapter deltas and the server optimiser (pure numpy).

:class:`Aggregator` is the seam: the rule that turns the round's (securely aggregated) mean
delta into the next global adapter. FedAvg, FedAdam, FedYogi and FedAdagrad implement it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from fedrg.errors import FedrgError

Float32Array = NDArray[np.float32]
"""One adapter array as the server holds it (the federation exchanges float32)."""


def weighted_mean(updates: list[list[Float32Array]], weights: list[float]) -> list[Float32Array]:
    """Weighted FedAvg of per-client update lists.

    Parameters
    ----------
    updates
        One list of arrays per client, all with identical shapes.
    weights
        Non-negative weight per client (e.g. number of training patients).

    Returns
    -------
    list of numpy.ndarray
        ``sum_i w_i * u_i / sum_i w_i`` per array, float32.
    """
    if not updates or len(updates) != len(weights):
        raise FedrgError(f"weighted_mean needs one weight per update (got {len(updates)} updates, "
                         f"{len(weights)} weights)")
    total = float(sum(weights))
    if total <= 0:
        raise FedrgError(f"weighted_mean: total weight must be positive, got {total}")
    out = [np.zeros_like(a, dtype=np.float64) for a in updates[0]]
    for arrays, w in zip(updates, weights, strict=True):
        for acc, a in zip(out, arrays, strict=True):
            acc += (w / total) * a.astype(np.float64)
    return [a.astype(np.float32) for a in out]


def flatten(arrays: list[Float32Array]) -> Float32Array:
    """Concatenate arrays into one float32 vector."""
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([a.astype(np.float32).ravel() for a in arrays])


def unflatten(vector: Float32Array, like: list[Float32Array]) -> list[Float32Array]:
    """Split a flat vector back into arrays shaped like ``like``."""
    expected = sum(a.size for a in like)
    if vector.size != expected:
        raise FedrgError(f"flat vector has {vector.size} values, the adapter needs {expected}")
    out, pos = [], 0
    for a in like:
        out.append(vector[pos:pos + a.size].reshape(a.shape).astype(a.dtype))
        pos += a.size
    return out


@runtime_checkable
class Aggregator(Protocol):
    """The server-side update rule: how the aggregated mean delta moves the global adapter.

    An aggregator sees only the weighted mean of the hospitals' deltas, after secure
    aggregation unmasked it (never one hospital's update), and each delta is already
    DP-noised at its site: whatever is plugged in here cannot weaken either. Built-in users:
    :class:`FedAvg`, :class:`FedAdam`, :class:`FedYogi`, :class:`FedAdagrad`.
    """

    name: str

    def apply(self, global_arrays: list[Float32Array], delta: list[Float32Array]) -> list[Float32Array]:
        """Return the new global arrays given the round's mean ``delta``."""
        ...

    def state_arrays(self) -> dict[str, Float32Array]:
        """State to checkpoint (empty for stateless rules)."""
        ...

    def load_state_arrays(self, state: dict[str, Float32Array]) -> None:
        """Restore state written by :meth:`state_arrays`."""
        ...


@dataclass
class FedAvg:
    """``x <- x + lr * delta`` (McMahan et al. 2017; ``lr=1`` is plain averaging)."""

    lr: float = 1.0
    name: str = "fedavg"

    def apply(self, global_arrays: list[Float32Array], delta: list[Float32Array]) -> list[Float32Array]:
        """Return ``global + lr * delta`` per array."""
        return [(g + self.lr * d).astype(g.dtype) for g, d in zip(global_arrays, delta, strict=True)]

    def state_arrays(self) -> dict[str, Float32Array]:
        """FedAvg is stateless."""
        return {}

    def load_state_arrays(self, state: dict[str, Float32Array]) -> None:
        """Nothing to restore."""
        return None


@dataclass
class _Adaptive:
    """Adaptive server optimisers of Reddi et al. 2021 ("Adaptive Federated Optimization").

    The pseudo-gradient is the mean delta: ``m <- b1 m + (1 - b1) d``, a second moment ``v``
    per subclass (initialised to ``tau**2``), ``x <- x + lr * m / (sqrt(v) + tau)``.
    """

    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: list[Float32Array] | None = field(default=None, repr=False)
    v: list[Float32Array] | None = field(default=None, repr=False)
    name: str = "adaptive"

    def _second_moment(self, v: Float32Array, d: Float32Array) -> Float32Array:
        raise NotImplementedError

    def apply(self, global_arrays: list[Float32Array], delta: list[Float32Array]) -> list[Float32Array]:
        """Return the new global arrays (moments updated in place)."""
        if self.m is None or self.v is None:
            self.m = [np.zeros_like(d) for d in delta]
            self.v = [np.full_like(d, self.tau**2) for d in delta]
        new = []
        for i, (g, d) in enumerate(zip(global_arrays, delta, strict=True)):
            self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * d
            self.v[i] = self._second_moment(self.v[i], d)
            new.append((g + self.lr * self.m[i] / (np.sqrt(self.v[i]) + self.tau)).astype(g.dtype))
        return new

    def state_arrays(self) -> dict[str, Float32Array]:
        """Optimiser state for checkpoints (``m.i``, ``v.i``)."""
        out: dict[str, Float32Array] = {}
        for name, arrs in (("m", self.m), ("v", self.v)):
            for i, a in enumerate(arrs or []):
                out[f"{name}.{i}"] = a
        return out

    def load_state_arrays(self, state: dict[str, Float32Array]) -> None:
        """Restore optimiser state saved by :meth:`state_arrays`."""
        ms = sorted((k for k in state if k.startswith("m.")), key=lambda k: int(k[2:]))
        vs = sorted((k for k in state if k.startswith("v.")), key=lambda k: int(k[2:]))
        self.m = [state[k] for k in ms] or None
        self.v = [state[k] for k in vs] or None


@dataclass
class FedAdam(_Adaptive):
    """FedAdam: ``v <- b2 v + (1 - b2) d**2``."""

    name: str = "fedadam"

    def _second_moment(self, v: Float32Array, d: Float32Array) -> Float32Array:
        return self.beta2 * v + (1 - self.beta2) * d * d


@dataclass
class FedYogi(_Adaptive):
    """FedYogi: ``v <- v - (1 - b2) d**2 sign(v - d**2)`` (``v`` grows additively, slower than Adam's)."""

    name: str = "fedyogi"

    def _second_moment(self, v: Float32Array, d: Float32Array) -> Float32Array:
        d2 = d * d
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)


@dataclass
class FedAdagrad(_Adaptive):
    """FedAdagrad: ``v <- v + d**2``."""

    name: str = "fedadagrad"

    def _second_moment(self, v: Float32Array, d: Float32Array) -> Float32Array:
        return v + d * d


#: ``federation.server_optimizer`` name -> aggregator class (kept equal to the config's choices).
AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
}


def make_aggregator(kind: str, lr: float = 1.0) -> Aggregator:
    """The aggregator named by ``federation.server_optimizer`` with server learning rate ``lr``.

    Raises
    ------
    FedrgError
        If ``kind`` is not a known aggregator.
    """
    try:
        factory = AGGREGATORS[kind]
    except KeyError:
        raise FedrgError(
            f"federation.server_optimizer={kind!r}; use one of {', '.join(AGGREGATORS)}"
        ) from None
    return factory(lr=lr)


# The name the round loop (fedrg/federated/server.py) constructs: ServerOptimizer(kind, lr).
ServerOptimizer = make_aggregator

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedYogi",
    "Float32Array",
    "ServerOptimizer",
    "flatten",
    "make_aggregator",
    "unflatten",
    "weighted_mean",
]
