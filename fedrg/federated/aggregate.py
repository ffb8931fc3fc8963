"""Server-side aggregation of adapter deltas and the server optimiser (pure numpy)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedrg.errors import FedrgError


def weighted_mean(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
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


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate arrays into one float32 vector."""
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([a.astype(np.float32).ravel() for a in arrays])


def unflatten(vector: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    """Split a flat vector back into arrays shaped like ``like``."""
    expected = sum(a.size for a in like)
    if vector.size != expected:
        raise FedrgError(f"flat vector has {vector.size} values, the adapter needs {expected}")
    out, pos = [], 0
    for a in like:
        out.append(vector[pos:pos + a.size].reshape(a.shape).astype(a.dtype))
        pos += a.size
    return out


@dataclass
class ServerOptimizer:
    """Applies the aggregated mean delta to the global adapter.

    ``fedavg``: ``x <- x + lr * delta``. ``fedadam`` (Reddi et al. 2021): Adam moments over
    the pseudo-gradient ``delta``.
    """

    kind: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: list[np.ndarray] | None = field(default=None, repr=False)
    v: list[np.ndarray] | None = field(default=None, repr=False)

    def apply(self, global_arrays: list[np.ndarray], delta: list[np.ndarray]) -> list[np.ndarray]:
        """Return the new global arrays."""
        if self.kind == "fedavg":
            return [(g + self.lr * d).astype(g.dtype) for g, d in zip(global_arrays, delta, strict=True)]
        if self.kind != "fedadam":
            raise FedrgError(f"federation.server_optimizer={self.kind!r}; use 'fedavg' or 'fedadam'")
        if self.m is None or self.v is None:
            self.m = [np.zeros_like(d) for d in delta]
            self.v = [np.full_like(d, self.tau**2) for d in delta]
        new = []
        for i, (g, d) in enumerate(zip(global_arrays, delta, strict=True)):
            self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * d
            self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * d * d
            new.append((g + self.lr * self.m[i] / (np.sqrt(self.v[i]) + self.tau)).astype(g.dtype))
        return new

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Optimiser state for checkpoints."""
        out: dict[str, np.ndarray] = {}
        for name, arrs in (("m", self.m), ("v", self.v)):
            for i, a in enumerate(arrs or []):
                out[f"{name}.{i}"] = a
        return out

    def load_state_arrays(self, state: dict[str, np.ndarray]) -> None:
        """Restore optimiser state saved by :meth:`state_arrays`."""
        ms = sorted((k for k in state if k.startswith("m.")), key=lambda k: int(k[2:]))
        vs = sorted((k for k in state if k.startswith("v.")), key=lambda k: int(k[2:]))
        self.m = [state[k] for k in ms] or None
        self.v = [state[k] for k in vs] or None
