"""Shamir secret sharing over a prime field (pure Python integers, no I/O).

A secret ``s`` (an integer below the prime) is hidden as the constant term of a random
polynomial ``f`` of degree ``threshold - 1``; the share for holder ``x`` (a non-zero field
element) is ``f(x)``. Any ``threshold`` shares determine ``f(0) = s`` by Lagrange
interpolation; any ``threshold - 1`` shares are uniformly distributed whatever the secret,
so they carry no information about it (perfect hiding).

The default field is GF(2**521 - 1) (a Mersenne prime), large enough for 256-bit seeds and
X25519 secret keys.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence

from fedrg.errors import SecAggError

P521 = 2**521 - 1
"""The default prime: the Mersenne prime 2**521 - 1."""

SHARE_BYTES = 66
"""Bytes needed to encode one share value of GF(P521)."""


def _random_field_element(prime: int, entropy: Callable[[int], bytes]) -> int:
    # 128 extra bits make the modular bias negligible (< 2**-128).
    nbytes = (prime.bit_length() + 7) // 8 + 16
    return int.from_bytes(entropy(nbytes), "big") % prime


def evaluate(coefficients: Sequence[int], x: int, prime: int = P521) -> int:
    """Evaluate a polynomial (constant term first) at ``x`` in GF(prime) by Horner's rule.

    Parameters
    ----------
    coefficients : sequence of int
        ``[a0, a1, ..., a_{t-1}]``; ``a0`` is the secret.
    x : int
        The point (a share holder's id).
    prime : int
        Field modulus.

    Returns
    -------
    int
        ``f(x) mod prime``.
    """
    acc = 0
    for a in reversed(coefficients):
        acc = (acc * x + a) % prime
    return acc


def _check_xs(xs: Sequence[int], prime: int) -> None:
    if any(not 0 < x < prime for x in xs):
        raise SecAggError(f"Shamir share ids must lie in 1..prime-1, got {sorted(xs)}")
    if len(set(xs)) != len(xs):
        raise SecAggError(f"Shamir share ids must be distinct, got {sorted(xs)}")


def split(
    secret: int,
    xs: Sequence[int],
    threshold: int,
    *,
    prime: int = P521,
    entropy: Callable[[int], bytes] = os.urandom,
) -> dict[int, int]:
    """Split ``secret`` into one share per holder id in ``xs``; ``threshold`` recover it.

    Parameters
    ----------
    secret : int
        Value in ``[0, prime)``.
    xs : sequence of int
        Distinct non-zero holder ids.
    threshold : int
        Number of shares needed to reconstruct (``1 <= threshold <= len(xs)``).
    prime : int
        Field modulus (default ``2**521 - 1``).
    entropy : callable
        ``entropy(n) -> n random bytes`` (default :func:`os.urandom`).

    Returns
    -------
    dict
        ``{x: f(x)}``.

    Raises
    ------
    SecAggError
        On an out-of-range secret, bad ids or a threshold outside ``1..len(xs)``.
    """
    if not 0 <= secret < prime:
        raise SecAggError("Shamir secret must lie in [0, prime); use a larger prime")
    _check_xs(xs, prime)
    if not 1 <= threshold <= len(xs):
        raise SecAggError(
            f"Shamir threshold={threshold} must be between 1 and the number of holders {len(xs)}"
        )
    coefficients = [secret] + [_random_field_element(prime, entropy) for _ in range(threshold - 1)]
    return {x: evaluate(coefficients, x, prime) for x in xs}


@functools.lru_cache(maxsize=1024)
def lagrange_coefficients(xs: tuple[int, ...], at: int = 0, prime: int = P521) -> tuple[int, ...]:
    """Lagrange basis values ``l_i(at)`` for the holder ids ``xs`` (cached per holder set).

    ``f(at) = sum(l_i(at) * f(x_i))`` for every polynomial of degree ``< len(xs)``, so a
    server that reconstructs many secrets shared among the same holders computes these
    once and then needs ``len(xs)`` multiplications per secret. One modular inversion in
    all (batch inversion).

    Parameters
    ----------
    xs : tuple of int
        Distinct non-zero holder ids.
    at : int
        Where to evaluate (0 gives the secret).
    prime : int
        Field modulus.

    Returns
    -------
    tuple of int
        ``(l_1(at), ..., l_t(at))`` in the order of ``xs``.
    """
    _check_xs(xs, prime)
    t = len(xs)
    diffs = [(at - x) % prime for x in xs]
    if 0 in diffs:  # ``at`` is one of the ids: the basis is a unit vector
        return tuple(int(d == 0) for d in diffs)
    # numerators: prod_{j != i} (at - x_j) from prefix and suffix products
    prefix = [1] * (t + 1)
    for i, d in enumerate(diffs):
        prefix[i + 1] = prefix[i] * d % prime
    suffix = [1] * (t + 1)
    for i in range(t - 1, -1, -1):
        suffix[i] = suffix[i + 1] * diffs[i] % prime
    dens = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                den = den * (xi - xj) % prime
        dens.append(den)
    # batch inversion of all denominators
    acc = [1] * (t + 1)
    for i, d in enumerate(dens):
        acc[i + 1] = acc[i] * d % prime
    inv = pow(acc[t], -1, prime)
    inv_dens = [0] * t
    for i in range(t - 1, -1, -1):
        inv_dens[i] = inv * acc[i] % prime
        inv = inv * dens[i] % prime
    return tuple(prefix[i] * suffix[i + 1] % prime * inv_dens[i] % prime for i in range(t))


def interpolate(points: Iterable[tuple[int, int]], at: int = 0, *, prime: int = P521) -> int:
    """Lagrange-interpolate the polynomial through ``points`` and evaluate it at ``at``.

    Parameters
    ----------
    points : iterable of (x, y)
        Distinct x values.
    at : int
        Where to evaluate (0 gives the secret).
    prime : int
        Field modulus.

    Returns
    -------
    int
        The value of the unique polynomial of degree ``len(points) - 1`` at ``at``.
    """
    pts = list(points)
    coefficients = lagrange_coefficients(tuple(x for x, _ in pts), at, prime)
    return sum(c * y for c, (_, y) in zip(coefficients, pts, strict=True)) % prime


def reconstruct(shares: dict[int, int], threshold: int, *, prime: int = P521,
                check: bool = True) -> int:
    """Recover a secret from at least ``threshold`` shares, checking any extra shares.

    The polynomial is interpolated through the first ``threshold`` shares (by id); with
    ``check`` every further share must lie on it, so a corrupted or forged share is
    detected whenever more than ``threshold`` shares are given.

    Parameters
    ----------
    shares : dict
        ``{x: y}``.
    threshold : int
        The sharing threshold.
    prime : int
        Field modulus.
    check : bool
        Check the extra shares (``False``: ignore them, for callers that verify the
        secret otherwise, e.g. against a commitment or a public key).

    Returns
    -------
    int
        The secret.

    Raises
    ------
    SecAggError
        With fewer than ``threshold`` shares, or when extra shares are inconsistent.
    """
    if len(shares) < threshold:
        raise SecAggError(
            f"need {threshold} Shamir shares to reconstruct, got {len(shares)}"
        )
    ordered = sorted(shares.items())
    base, extra = ordered[:threshold], ordered[threshold:]
    if check:
        for x, y in extra:
            if interpolate(base, x, prime=prime) != y % prime:
                raise SecAggError("inconsistent Shamir shares: a share was corrupted or forged")
    return interpolate(base, 0, prime=prime)


def share_to_bytes(value: int) -> bytes:
    """Encode a GF(P521) share value in :data:`SHARE_BYTES` big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Decode a share value written by :func:`share_to_bytes` (checks the range)."""
    if len(data) != SHARE_BYTES:
        raise SecAggError(f"a share must be {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= P521:
        raise SecAggError("share value out of field range")
    return value
