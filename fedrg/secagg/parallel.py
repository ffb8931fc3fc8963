"""Run work on slices of a long vector in a few threads (numpy and the ciphers free the GIL).

Used for the per-value passes of secure aggregation (mask expansion, encoding, the ring
sum, decoding). Each slice is independent and its bounds fall on a caller-given alignment,
so results do not depend on the number of threads.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

THREADS: int | None = None
"""Threads for vectors over :data:`MIN_BYTES` (``None``: one per CPU, at most 4)."""
MIN_BYTES = 1 << 20
"""Shorter vectors are processed in the calling thread."""
_POOL: ThreadPoolExecutor | None = None


def threads_for(nbytes: int) -> int:
    """How many threads a vector of ``nbytes`` bytes gets."""
    if THREADS is not None:
        return max(1, int(THREADS))
    if nbytes < MIN_BYTES:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def run_slices(n: int, fn: Callable[[int, int], None], *, nbytes: int, align: int = 1,
               threads: int | None = None) -> None:
    """Call ``fn(lo, hi)`` for contiguous slices covering ``range(n)``.

    Parameters
    ----------
    n : int
        Length of the vector.
    fn : callable
        Work on ``[lo, hi)``; must not touch other slices.
    nbytes : int
        Size of the data (chooses the thread count when ``threads`` is None).
    align : int
        Slice bounds are multiples of this (e.g. a cipher block in elements).
    threads : int, optional
        Threads to use (default :func:`threads_for`).
    """
    global _POOL
    workers = threads if threads is not None else threads_for(nbytes)
    bounds = sorted({min(n, (n * k // max(workers, 1)) // align * align) for k in range(workers)} | {0, n})
    slices = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
    if len(slices) <= 1:
        if n:
            fn(0, n)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fedrg-secagg")
    for future in [_POOL.submit(fn, lo, hi) for lo, hi in slices]:
        future.result()
