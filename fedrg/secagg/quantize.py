"""Fixed-point encoding of a weighted update into the ring Z_{2^32} (or Z_{2^64}).

A client with update ``x`` (clipped to ``[-c, c]``) and weight ``w`` first quantises its
*relative weight* ``s = w / max_weight`` (``0 <= s <= 1``) to ``s_q = round(s * W) / W`` with
``W = 2**min(R - ceil(log2 n), 40) - 1`` (the headroom the R-bit ring leaves for ``n``
clients), then encodes each coordinate of ``s_q * x`` (still in ``[-c, c]``) with
``L = 2**bits - 1`` as

    q = round((s_q * x + c) / step),    step = 2 c / L,    q in {0, ..., L}

and appends the integer ``s_q * W`` as the last word. The ring is chosen from the count:
``R = 32`` when ``bits + ceil(log2 n) <= 32``, else ``R = 64`` (:func:`ring_bits`), so the
sum of ``n`` such vectors cannot wrap: every sum is at most ``n * max(L, W) < 2**R``. The
server decodes ``sum(s_q x) = step * sum(q) - n c`` and the total relative weight
``S = sum(q_w) / W``; the weighted mean is their ratio.

Rounding is either ``"nearest"`` (deterministic, error <= step/2 per coordinate) or
``"stochastic"`` (unbiased: E[q] is exact; error < step).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Literal

import numpy as np

from fedrg.errors import SecAggError
from fedrg.secagg import parallel

RING_BITS = 32
"""The narrow ring Z_{2^32}; :func:`ring_bits` widens it to Z_{2^64} when needed."""
WIDE_RING_BITS = 64
MAX_WEIGHT_BITS = 40
"""Resolution cap of the weight word (keeps every product exact in float64)."""
Rounding = Literal["nearest", "stochastic"]
_BLOCK = 1 << 15  # values encoded per block (the float64 scratch stays in the CPU cache)


def as_rounding(value: object) -> Rounding:
    """``value`` as a :data:`Rounding`.

    Raises
    ------
    SecAggError
        Naming the value, unless it is ``"nearest"`` or ``"stochastic"``.
    """
    if value == "nearest":
        return "nearest"
    if value == "stochastic":
        return "stochastic"
    raise SecAggError(f"secagg rounding={value!r} must be 'nearest' or 'stochastic'")


def levels(quantization_bits: int) -> int:
    """``L = 2**bits - 1``, the largest code of one coordinate."""
    return (1 << quantization_bits) - 1


def _log2_clients(num_clients: int) -> int:
    return math.ceil(math.log2(max(num_clients, 1)))


def ring_bits(num_clients: int, quantization_bits: int) -> int:
    """Bits of the ring the sum lives in: 32 when it suffices, else 64.

    The sum of ``n`` codes below ``2**bits`` cannot wrap when ``bits + ceil(log2 n)`` is at
    most the ring's bits.

    Raises
    ------
    SecAggError
        If even the 64-bit ring is too narrow (more than ``2**(64 - bits)`` clients).
    """
    check_ring(num_clients, quantization_bits)
    need = quantization_bits + _log2_clients(num_clients)
    return RING_BITS if need <= RING_BITS else WIDE_RING_BITS


def ring_dtype(bits: int) -> np.dtype:
    """``uint32`` for the 32-bit ring, ``uint64`` for the 64-bit one."""
    return np.dtype(np.uint32 if bits == RING_BITS else np.uint64)


def weight_levels(num_clients: int, ring: int = RING_BITS) -> int:
    """``W = 2**min(ring - ceil(log2 n), 40) - 1``, the largest code of the weight word."""
    return (1 << min(ring - _log2_clients(num_clients), MAX_WEIGHT_BITS)) - 1


def check_ring(num_clients: int, quantization_bits: int) -> None:
    """Refuse settings whose sum over ``num_clients`` would overflow even the 64-bit ring.

    Raises
    ------
    SecAggError
        If the bits are out of range or ``quantization_bits + ceil(log2 num_clients) > 64``.
    """
    if not 1 <= quantization_bits <= RING_BITS - 1:
        raise SecAggError(
            f"secagg.quantization_bits={quantization_bits} must lie in 1..{RING_BITS - 1}"
        )
    if num_clients < 1:
        raise SecAggError(f"secure aggregation needs at least one client, got {num_clients}")
    need = quantization_bits + _log2_clients(num_clients)
    if need > WIDE_RING_BITS:
        raise SecAggError(
            f"secagg.quantization_bits={quantization_bits} with {num_clients} clients needs "
            f"{need} bits, more than the {WIDE_RING_BITS}-bit ring: lower quantization_bits "
            f"to {WIDE_RING_BITS - _log2_clients(num_clients)} or fewer, or use fewer clients"
        )


def quantise_weight(weight: float, max_weight: float, num_clients: int,
                    ring: int = RING_BITS) -> int:
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
    return round(weight / max_weight * weight_levels(num_clients, ring))


def _all_finite(x: np.ndarray) -> bool:
    # one reduction pass, no temporary; a float64 sum of finite float32/64 values can only
    # overflow for values near 1e308, and then the exact (slower) check decides
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.add.reduce(x, dtype=np.float64))):
            return True
    return bool(np.isfinite(x).all())


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
    mask: Callable[[int], Callable[[np.ndarray], None]] | None = None,
) -> np.ndarray:
    """Encode ``weight * update`` (relative to ``max_weight``) as ring words.

    Works block by block (clip, scale, shift, round, cast while the block is in the CPU
    cache): float32 input is read as is, the arithmetic is float64 (float32 would add up to
    a whole quantisation unit at 24 bits), one pass over the input and one over the output;
    long vectors with nearest rounding are split between threads
    (:mod:`fedrg.secagg.parallel`).

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
        Clients in the round (sets the ring and the weight word's resolution).
    rounding : {"nearest", "stochastic"}
        Deterministic round-to-nearest, or unbiased stochastic rounding.
    rng : numpy.random.Generator, optional
        Randomness for stochastic rounding (default: seeded from the OS).
    mask : callable, optional
        ``mask(lo)`` is called once per slice of the output, with the slice's first index
        (a multiple of the block), and returns ``apply(block)``, which is then called on
        each consecutive encoded block of the slice (weight word included) in place, while
        the block is still in the CPU cache (e.g. a :class:`fedrg.secagg.crypto.MaskRun`'s
        ``apply``). The result equals encoding first and masking the whole vector after.

    Returns
    -------
    numpy.ndarray
        ``uint32`` (or ``uint64`` for the wide ring, see :func:`ring_bits`) array of length
        ``update.size + 1`` (the weight word last), masked when ``mask`` is given.

    Raises
    ------
    SecAggError
        On non-finite values or an invalid weight.
    """
    x = np.asarray(update).ravel()
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    if not _all_finite(x):
        raise SecAggError("update holds NaN or infinite values; secure aggregation refuses it")
    if rounding not in ("nearest", "stochastic"):
        raise SecAggError(f"secagg rounding={rounding!r} must be 'nearest' or 'stochastic'")
    ring = ring_bits(num_clients, quantization_bits)
    L = levels(quantization_bits)
    wq = quantise_weight(weight, max_weight, num_clients, ring)
    step = 2.0 * clip_range / L
    scale = (wq / weight_levels(num_clients, ring)) / step
    shift = clip_range / step  # = L / 2
    gen = None
    if rounding == "stochastic":
        gen = rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(16), "big"))
    else:
        shift += 0.5  # round half up: floor(v + 0.5)
    out = np.empty(x.size + 1, dtype=ring_dtype(ring))
    codes = x.size

    def encode_slice(lo: int, hi: int) -> None:
        apply = mask(lo) if mask is not None else None
        buf = np.empty(min(_BLOCK, hi - lo), dtype=np.float64)
        noise = np.empty_like(buf) if gen is not None else None
        for start in range(lo, hi, _BLOCK):
            stop = min(start + _BLOCK, hi)
            end = min(stop, codes)  # the weight word (index ``codes``) is not a code
            if end > start:
                v = buf[: end - start]
                np.clip(x[start:end], -clip_range, clip_range, out=v)
                v *= scale
                v += shift
                if gen is not None and noise is not None:
                    u = noise[: end - start]
                    gen.random(out=u)
                    v += u
                np.clip(v, 0, L, out=v)
                out[start:end] = v  # truncation = floor for v >= 0
            if stop > codes:
                out[codes] = wq
            if apply is not None:
                apply(out[start:stop])

    # stochastic rounding draws its randomness in order: one thread keeps it reproducible
    parallel.run_slices(out.size, encode_slice, nbytes=out.nbytes, align=_BLOCK,
                        threads=1 if gen is not None else None)
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
    ring = ring_bits(num_clients, quantization_bits)
    weight_units = int(total[-1])
    if weight_units == 0:
        raise SecAggError("total weight of the surviving clients is zero; nothing to average")
    s = weight_units / weight_levels(num_clients, ring)
    # mean = (step * sum(q) - n c) / s, block by block (the block stays in the CPU cache)
    scale, offset = step / s, count * clip_range / s
    codes = total[:-1]
    mean = np.empty(codes.size, dtype=np.float64)

    def decode_slice(lo: int, hi: int) -> None:
        for start in range(lo, hi, _BLOCK):
            out = mean[start:min(start + _BLOCK, hi)]
            np.multiply(codes[start:start + out.size], scale, out=out, dtype=np.float64)
            out -= offset

    parallel.run_slices(codes.size, decode_slice, nbytes=mean.nbytes, align=_BLOCK)
    return mean, s * max_weight


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
    ring = ring_bits(num_clients or n, quantization_bits)
    W = weight_levels(num_clients or n, ring)
    s_total = sum(quantise_weight(w, max_weight, num_clients or n, ring) for w in weights) / W
    if s_total == 0:
        return math.inf
    step = 2.0 * clip_range / L
    per_coordinate = step / 2 if rounding == "nearest" else step
    return n * (per_coordinate + clip_range / W) / s_total
