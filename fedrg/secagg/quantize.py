"""Fixed-point encoding of a weighted update into the ring Z_{2^32}.

A client with update ``x`` (clipped to ``[-c, c]``) and weight ``w`` first quantises its
*relative weight* ``s = w / max_weight`` (``0 <= s <= 1``) to ``s_q = round(s * W) / W`` with
``W = 2**(32 - ceil(log2 n)) - 1`` (all the headroom the ring leaves for ``n`` clients), then
encodes each coordinate of ``s_q * x`` (still in ``[-c, c]``) with ``L = 2**bits - 1`` as

    q = round((s_q * x + c) / step),    step = 2 c / L,    q in {0, ..., L}

and appends the integer ``s_q * W`` as the last word. Summing ``n`` such vectors in
Z_{2^32} cannot wrap when ``bits + ceil(log2 n) <= 32``: every sum is at most
``n * max(L, W) < 2**32``. The server decodes ``sum(s_q x) = step * sum(q) - n c`` and the
total relative weight ``S = sum(q_w) / W``; the weighted mean is their ratio.

Rounding is either ``"nearest"`` (deterministic, error <= step/2 per coordinate) or
``"stochastic"`` (unbiased: E[q] is exact; error < step).
"""

from __future__ import annotations

import math
import os
from typing import Literal

import numpy as np

from fedrg.errors import SecAggError

RING_BITS = 32
Rounding = Literal["nearest", "stochastic"]


def levels(quantization_bits: int) -> int:
    """``L = 2**bits - 1``, the largest code of one coordinate."""
    return (1 << quantization_bits) - 1


def weight_levels(num_clients: int) -> int:
    """``W = 2**(32 - ceil(log2 n)) - 1``, the largest code of the weight word."""
    return (1 << (RING_BITS - math.ceil(math.log2(max(num_clients, 1))))) - 1


def check_ring(num_clients: int, quantization_bits: int) -> None:
    """Refuse settings whose sum over ``num_clients`` could overflow Z_{2^32}.

    Raises
    ------
    SecAggError
        If ``quantization_bits + ceil(log2 num_clients) > 32`` or the bits are out of range.
    """
    if not 1 <= quantization_bits <= RING_BITS - 1:
        raise SecAggError(
            f"secagg.quantization_bits={quantization_bits} must lie in 1..{RING_BITS - 1}"
        )
    if num_clients < 1:
        raise SecAggError(f"secure aggregation needs at least one client, got {num_clients}")
    need = quantization_bits + math.ceil(math.log2(num_clients))
    if need > RING_BITS:
        raise SecAggError(
            f"secagg.quantization_bits={quantization_bits} with {num_clients} clients needs "
            f"{need} bits, more than the {RING_BITS}-bit ring: lower quantization_bits to "
            f"{RING_BITS - math.ceil(math.log2(num_clients))} or fewer, or use fewer clients"
        )


def quantise_weight(weight: float, max_weight: float, num_clients: int) -> int:
    """The weight word ``round(weight / max_weight * W)``.

    Raises
    ------
    SecAggError
        If the weight is negative, not finite or above ``max_weight``.
    """
    if not math.isfinite(weight) or weight < 0:
        raise SecAggError(f"client weight must be a finite number >= 0, got {weight}")
    if weight > max_weight:
        raise SecAggError(
            f"client weight {weight} exceeds secagg.max_weight={max_weight}; "
            "raise secagg.max_weight to at least the largest client weight"
        )
    return round(weight / max_weight * weight_levels(num_clients))


def encode(
    update: np.ndarray,
    weight: float,
    *,
    clip_range: float,
    quantization_bits: int,
    max_weight: float,
    num_clients: int,
    rounding: Rounding = "nearest",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Encode ``weight * update`` (relative to ``max_weight``) as uint32 words.

    Parameters
    ----------
    update : numpy.ndarray
        Float update of any shape (flattened); values are clipped to ``+-clip_range``.
    weight : float
        The client's weight (e.g. number of examples), ``0 <= weight <= max_weight``.
    clip_range : float
        Clipping range ``c``.
    quantization_bits : int
        Bits per coordinate.
    max_weight : float
        Public upper bound on weights.
    num_clients : int
        Clients in the round (sets the weight word's resolution).
    rounding : {"nearest", "stochastic"}
        Deterministic round-to-nearest, or unbiased stochastic rounding.
    rng : numpy.random.Generator, optional
        Randomness for stochastic rounding (default: seeded from the OS).

    Returns
    -------
    numpy.ndarray
        ``uint32`` array of length ``update.size + 1`` (the weight word last).

    Raises
    ------
    SecAggError
        On non-finite values or an invalid weight.
    """
    x = np.array(update, dtype=np.float64).ravel()  # a private copy, modified in place
    if not np.isfinite(x).all():
        raise SecAggError("update holds NaN or infinite values; secure aggregation refuses it")
    L = levels(quantization_bits)
    wq = quantise_weight(weight, max_weight, num_clients)
    step = 2.0 * clip_range / L
    np.clip(x, -clip_range, clip_range, out=x)
    x *= (wq / weight_levels(num_clients)) / step
    x += clip_range / step
    if rounding == "nearest":
        np.rint(x, out=x)
    elif rounding == "stochastic":
        gen = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
        x += gen.random(x.shape)
        np.floor(x, out=x)
    else:
        raise SecAggError(f"secagg rounding={rounding!r} must be 'nearest' or 'stochastic'")
    np.clip(x, 0, L, out=x)
    q = x
    out = np.empty(x.size + 1, dtype=np.uint32)
    out[:-1] = q
    out[-1] = wq
    return out


def decode_sum(
    total: np.ndarray, count: int, *, clip_range: float, quantization_bits: int,
    max_weight: float, num_clients: int,
) -> tuple[np.ndarray, float]:
    """Decode the unmasked sum of ``count`` encoded vectors.

    Parameters
    ----------
    total : numpy.ndarray
        ``uint32`` sum (weight word last).
    count : int
        How many clients' vectors are in the sum.
    clip_range, quantization_bits, max_weight, num_clients
        As given to :func:`encode`.

    Returns
    -------
    (mean, total_weight) : tuple
        ``mean`` (float64) is ``sum(w_i x_i) / sum(w_i)`` up to quantisation;
        ``total_weight`` is ``sum(w_i)`` (with weights rounded to ``max_weight / W``).

    Raises
    ------
    SecAggError
        If the total weight is zero.
    """
    L = levels(quantization_bits)
    step = 2.0 * clip_range / L
    weight_units = int(total[-1])
    if weight_units == 0:
        raise SecAggError("total weight of the surviving clients is zero; nothing to average")
    s = weight_units / weight_levels(num_clients)
    weighted_sum = total[:-1].astype(np.float64) * step - count * clip_range
    return weighted_sum / s, s * max_weight


def error_bound(
    weights: list[float],
    *,
    clip_range: float,
    quantization_bits: int,
    max_weight: float,
    num_clients: int | None = None,
    rounding: Rounding = "nearest",
) -> float:
    """Largest possible per-coordinate gap between the secure mean and plain weighted FedAvg.

    FedAvg here is ``sum(w_i x_i) / sum(w_i)`` over the clipped updates ``x_i``. Two terms:
    coordinate rounding (``n * step / 2``, or ``n * step`` stochastic) and weight rounding
    (each relative weight moves by at most ``1 / (2W)``, moving the mean by at most
    ``n * c / W``), both divided by the quantised total relative weight. ``num_clients``
    is the number invited to the round (default: ``len(weights)``).

    Returns
    -------
    float
        The bound (``inf`` if the quantised total weight is zero).
    """
    L = levels(quantization_bits)
    n = len(weights)
    W = weight_levels(num_clients or n)
    s_total = sum(quantise_weight(w, max_weight, num_clients or n) for w in weights) / W
    if s_total == 0:
        return math.inf
    step = 2.0 * clip_range / L
    per_coordinate = step / 2 if rounding == "nearest" else step
    return n * (per_coordinate + clip_range / W) / s_total
