"""Property and differential tests of the fast secure-aggregation maths (issue 16 item 4).

Each fast path is compared with the plain formula it replaces: blockwise encoding with the
one-shot float64 formula, blockwise mask application with full-length mask expansion,
cached batch-inverted Lagrange coefficients with textbook Lagrange interpolation, and the
ring chosen from the client count with the largest sum it must hold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedrg.errors import SecAggError
from fedrg.secagg import crypto, parallel, shamir
from fedrg.secagg.params import auto_neighbours, default_threshold, holders_count
from fedrg.secagg.quantize import (
    _BLOCK,
    decode_sum,
    encode,
    levels,
    quantise_weight,
    ring_bits,
    ring_dtype,
    weight_levels,
)
from fedrg.secagg.server import ring_sum


def reference_encode(x, weight, *, clip_range, bits, max_weight, n):
    """The textbook nearest-rounding encoding in float64, one array operation at a time."""
    ring = ring_bits(n, bits)
    L = levels(bits)
    W = weight_levels(n, ring)
    wq = quantise_weight(weight, max_weight, n, ring)
    step = 2.0 * clip_range / L
    v = (np.clip(np.asarray(x, np.float64), -clip_range, clip_range) * (wq / W) + clip_range) / step
    return np.clip(np.floor(v + 0.5), 0, L), wq, step


@settings(max_examples=60, deadline=None)
@given(
    length=st.sampled_from([1, 7, _BLOCK - 1, _BLOCK, _BLOCK + 3]),
    bits=st.integers(8, 30),
    n=st.sampled_from([2, 3, 100, 257, 1000, 5000]),
    clip=st.sampled_from([0.25, 1.0, 8.0]),
    weight=st.floats(0.0, 1000.0),
    seed=st.integers(0, 2**32 - 1),
    f32=st.booleans(),
)
def test_blockwise_encode_matches_the_formula_within_one_code(length, bits, n, clip, weight, seed, f32):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2 * clip, 2 * clip, size=length).astype(np.float32 if f32 else np.float64)
    out = encode(x, weight, clip_range=clip, quantization_bits=bits, max_weight=1000.0, num_clients=n)
    ref, wq, step = reference_encode(x, weight, clip_range=clip, bits=bits, max_weight=1000.0, n=n)
    assert out.dtype == ring_dtype(ring_bits(n, bits)) and out.size == length + 1
    assert int(out[-1]) == wq
    codes = out[:-1].astype(np.float64)
    # the two computations may round an exact .5 tie differently, never by more than one code
    assert np.max(np.abs(codes - ref)) <= 1
    # and every code is within half a step of the scaled, clipped value
    W = weight_levels(n, ring_bits(n, bits))
    exact = np.clip(x.astype(np.float64), -clip, clip) * (wq / W)
    assert np.max(np.abs(codes * step - clip - exact)) <= step / 2 * (1 + 1e-9) + 1e-12


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 3000), bits=st.integers(8, 30), seed=st.integers(0, 2**32 - 1))
def test_sum_of_n_extreme_encodings_never_wraps_and_decodes(n, bits, seed):
    """n clients all at +clip (or -clip) and max weight: the ring holds the sum exactly."""
    ring = ring_bits(n, bits)
    dtype = ring_dtype(ring)
    sign = 1.0 if seed % 2 else -1.0
    one = encode(np.full(3, sign * 5.0), 1000.0, clip_range=1.0, quantization_bits=bits,
                 max_weight=1000.0, num_clients=n)
    total = (one.astype(object) * n)  # exact integers
    assert max(int(v) for v in total) < 2**ring
    ring_total = np.array([int(v) % 2**ring for v in total], dtype=dtype)
    mean, total_weight = decode_sum(ring_total, n, clip_range=1.0, quantization_bits=bits,
                                    max_weight=1000.0, num_clients=n)
    assert np.allclose(mean, sign, atol=2.0 / levels(bits))
    assert math.isclose(total_weight, n * 1000.0, rel_tol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    length=st.integers(1, 3 * crypto.MASK_CHUNK_BYTES // 4 + 5),
    n_plus=st.integers(0, 4), n_minus=st.integers(0, 4),
    wide=st.booleans(), seed=st.integers(0, 2**32 - 1), threads=st.sampled_from([None, 1, 2, 3, 5]),
)
def test_blockwise_masks_equal_full_expansion(length, n_plus, n_minus, wide, seed, threads):
    """Any number of threads (each starting the keystream at its slice) gives the same sum."""
    rand = crypto.seeded_entropy(seed)
    dtype = np.uint64 if wide else np.uint32
    seeds = [rand(32) for _ in range(n_plus + n_minus)]
    base = np.frombuffer(rand(length * np.dtype(dtype).itemsize), dtype=dtype).copy()
    original = base.copy()
    expected = base.copy()
    for i, s in enumerate(seeds):
        m = crypto.expand_mask(s, length, dtype)
        if i < n_plus:
            expected += m
        else:
            expected -= m
    got = crypto.apply_masks(base, seeds[:n_plus], seeds[n_plus:], threads=threads)
    assert got is base and np.array_equal(got, expected)
    # and masks cancel: adding then subtracting the same seeds gives the input back
    crypto.apply_masks(got, seeds[n_plus:], seeds[:n_plus], threads=threads)
    assert np.array_equal(got, original)


def test_threaded_masks_on_a_large_vector_equal_full_expansion():
    rand = crypto.seeded_entropy(b"large")
    seeds = [rand(32) for _ in range(3)]
    length = (1 << 20) // 4 + 77  # over 1 MiB: the automatic setting uses threads
    target = np.zeros(length, np.uint32)
    crypto.apply_masks(target, seeds[:2], seeds[2:])
    expected = crypto.expand_mask(seeds[0], length) + crypto.expand_mask(seeds[1], length)
    expected -= crypto.expand_mask(seeds[2], length)
    assert np.array_equal(target, expected)


def naive_interpolate(points, at, prime):
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (at - xj) % prime
                den = den * (xi - xj) % prime
        total = (total + yi * num * pow(den, -1, prime)) % prime
    return total


@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(st.integers(1, 10_000), min_size=1, max_size=25, unique=True),
    at=st.integers(0, 10_001),
    seed=st.integers(0, 2**32 - 1),
)
def test_cached_lagrange_equals_textbook_interpolation(xs, at, seed):
    rand = crypto.seeded_entropy(seed)
    points = [(x, int.from_bytes(rand(66), "big") % shamir.P521) for x in xs]
    assert shamir.interpolate(points, at) == naive_interpolate(points, at, shamir.P521)
    # the cached coefficients are reused for another secret with the same holders
    other = [(x, (y * 7 + 3) % shamir.P521) for x, y in points]
    assert shamir.interpolate(other, at) == naive_interpolate(other, at, shamir.P521)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_any_threshold_subset_reconstructs_without_extra_checks(n, seed, data):
    t = data.draw(st.integers(1, n))
    rand = crypto.seeded_entropy(seed)
    secret = int.from_bytes(rand(32), "big")
    shares = shamir.split(secret, list(range(1, n + 1)), t, entropy=rand)
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n, unique=True))
    assert shamir.reconstruct({x: shares[x] for x in subset}, t, check=False) == secret
    assert shamir.reconstruct({x: shares[x] for x in subset}, t) == secret


@given(st.integers(2, 100_000))
def test_auto_graph_is_complete_when_small_and_logarithmic_when_large(n):
    k = auto_neighbours(n)
    if n <= 32:
        assert k == 0 and holders_count(n, k) == n
    else:
        assert k == 4 * math.ceil(math.log2(n)) and k % 2 == 0
        assert holders_count(n, k) == k + 1
    t = default_threshold(n, neighbours=-1)
    assert 2 * t > holders_count(n, k) >= t


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 5000), align=st.sampled_from([1, 4, 16, 1000]),
       threads=st.integers(1, 6))
def test_slices_cover_the_vector_once_on_aligned_bounds(n, align, threads):
    seen = np.zeros(n, np.int64)
    starts = []

    def mark(lo, hi):
        seen[lo:hi] += 1
        starts.append(lo)

    parallel.run_slices(n, mark, nbytes=n, align=align, threads=threads)
    assert (seen == 1).all()
    assert all(lo % align == 0 for lo in starts)


def test_threaded_encode_sum_and_decode_equal_single_threaded(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.normal(scale=0.5, size=300_001).astype(np.float32)  # over 1 MiB encoded
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(parallel, "THREADS", threads)
        enc = [encode(x * (i + 1), 10.0 * (i + 1), clip_range=8.0, quantization_bits=24,
                      max_weight=100.0, num_clients=5) for i in range(5)]
        total = ring_sum(enc, enc[0].dtype)
        mean, weight = decode_sum(total, 5, clip_range=8.0, quantization_bits=24,
                                  max_weight=100.0, num_clients=5)
        results.append((enc, total, mean, weight))
    (e1, t1, m1, w1), (e3, t3, m3, w3) = results
    assert all(np.array_equal(a, b) for a, b in zip(e1, e3, strict=True))
    assert np.array_equal(t1, t3) and np.array_equal(m1, m3) and w1 == w3
    # and the sum is the plain wrapping sum
    plain = np.zeros_like(t1)
    for e in e1:
        plain += e
    assert np.array_equal(t1, plain)


def _expanded(seeds_plus, seeds_minus, length, dtype):
    """The reference: full-length :func:`crypto.expand_mask` of each seed, added or subtracted."""
    total = np.zeros(length, dtype)
    for s in seeds_plus:
        total += crypto.expand_mask(s, length, dtype)
    for s in seeds_minus:
        total -= crypto.expand_mask(s, length, dtype)
    return total


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 3 * crypto.MASK_CHUNK_BYTES // 4), max_size=6),
    start_blocks=st.integers(0, 5), n_plus=st.integers(0, 3), n_minus=st.integers(0, 3),
    wide=st.booleans(), seed=st.integers(0, 2**32 - 1),
)
def test_mask_run_on_consecutive_blocks_equals_full_expansion(cuts, start_blocks, n_plus, n_minus,
                                                             wide, seed):
    """A MaskRun fed blocks of any sizes (odd, empty, over one chunk) from a cipher-block start
    adds exactly the slice of the full masks: its keystreams move on across the blocks."""
    rand = crypto.seeded_entropy(seed)
    dtype = np.dtype(np.uint64 if wide else np.uint32)
    seeds = [rand(32) for _ in range(n_plus + n_minus)]
    start = start_blocks * (16 // dtype.itemsize)
    length = start + sum(cuts) + 3
    base = np.frombuffer(rand(length * dtype.itemsize), dtype=dtype).copy()
    expected = base + _expanded(seeds[:n_plus], seeds[n_plus:], length, dtype)
    run = crypto.MaskRun(seeds[:n_plus], seeds[n_plus:], start=start, dtype=dtype)
    got = base.copy()
    pos = start
    for size in [*cuts, length - start - sum(cuts)]:
        run.apply(got[pos:pos + size])
        pos += size
    assert np.array_equal(got[start:], expected[start:])
    assert np.array_equal(got[:start], base[:start])  # nothing before the run is touched


def test_mask_run_refuses_a_start_inside_a_cipher_block_or_another_ring():
    with pytest.raises(SecAggError, match="cipher block"):
        crypto.MaskRun([bytes(32)], [], start=3, dtype=np.uint32)
    run = crypto.MaskRun([bytes(32)], [], dtype=np.uint32)
    with pytest.raises(SecAggError, match="uint32 mask run cannot mask a uint64"):
        run.apply(np.zeros(8, np.uint64))  # would wrap modulo 2**32 in silence


@settings(max_examples=25, deadline=None)
@given(
    length=st.sampled_from([0, 1, 5, _BLOCK - 1, _BLOCK, 2 * _BLOCK + 7]),
    n=st.sampled_from([3, 10, 300]), rounding=st.sampled_from(["nearest", "stochastic"]),
    n_plus=st.integers(0, 3), n_minus=st.integers(0, 3), seed=st.integers(0, 2**32 - 1),
    threads=st.sampled_from([1, 2, 3]),
)
@example(length=2 * _BLOCK + 7, n=10, rounding="nearest", n_plus=1, n_minus=1, seed=0, threads=3)
def test_encode_with_masks_equals_encode_then_full_masks(length, n, rounding, n_plus, n_minus,
                                                         seed, threads):
    """Masking each block as it is encoded gives bit for bit the encoding plus the full masks
    (weight word included), in either ring, for any thread count and either rounding."""
    saved = parallel.THREADS
    parallel.THREADS = threads
    try:
        _check_encode_with_masks(length, n, rounding, n_plus, n_minus, seed)
    finally:
        parallel.THREADS = saved


def _check_encode_with_masks(length, n, rounding, n_plus, n_minus, seed):
    rand = crypto.seeded_entropy(seed)
    seeds = [rand(32) for _ in range(n_plus + n_minus)]
    x = np.random.default_rng(seed).normal(scale=3.0, size=length)
    kw = dict(clip_range=8.0, quantization_bits=28, max_weight=100.0, num_clients=n,
              rounding=rounding)
    plain = encode(x, 42.0, rng=np.random.default_rng(seed), **kw)
    dtype = plain.dtype
    masked = encode(x, 42.0, rng=np.random.default_rng(seed), **kw,
                    mask=lambda lo: crypto.MaskRun(seeds[:n_plus], seeds[n_plus:], start=lo,
                                                   dtype=dtype).apply)
    assert masked.dtype == dtype and masked.size == length + 1
    assert np.array_equal(masked, plain + _expanded(seeds[:n_plus], seeds[n_plus:], length + 1, dtype))
