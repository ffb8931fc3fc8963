"""Shamir secret sharing: correctness, perfect hiding below the threshold, share checks."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrg.errors import SecAggError
from fedrg.secagg import shamir
from fedrg.secagg.crypto import seeded_entropy


@st.composite
def sharings(draw):
    n = draw(st.integers(1, 12))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 2**64), min_size=n, max_size=n, unique=True))
    secret = draw(st.integers(0, 2**256 - 1))
    seed = draw(st.integers(0, 2**32))
    return secret, xs, t, seed


@settings(max_examples=60, deadline=None)
@given(sharings(), st.data())
def test_any_threshold_subset_reconstructs(case, data):
    secret, xs, t, seed = case
    shares = shamir.split(secret, xs, t, entropy=seeded_entropy(seed))
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=len(xs), unique=True))
    assert shamir.reconstruct({x: shares[x] for x in subset}, t) == secret


@settings(max_examples=40, deadline=None)
@given(sharings())
def test_fewer_than_threshold_refused_and_uninformative(case):
    secret, xs, t, seed = case
    shares = shamir.split(secret, xs, t, entropy=seeded_entropy(seed))
    few = dict(list(shares.items())[: t - 1])
    with pytest.raises(SecAggError, match="need"):
        shamir.reconstruct(few, t)
    if t >= 2:
        # Interpolating t-1 shares gives a value unrelated to the secret.
        assert shamir.interpolate(few.items(), 0) != secret


def _coefficient_entropy(coefficients, prime):
    """Entropy that makes split() draw exactly the given coefficients."""
    nbytes = (prime.bit_length() + 7) // 8 + 16
    it = iter(coefficients)
    return lambda n: next(it).to_bytes(nbytes, "big") if n == nbytes else bytes(n)


@pytest.mark.parametrize(("prime", "t", "xs"), [(13, 3, [1, 5, 9]), (11, 2, [3, 7, 10]), (7, 4, [1, 2, 3, 6])])
def test_threshold_minus_one_shares_are_exactly_uniform(prime, t, xs):
    """Perfect hiding, checked exhaustively in a small field.

    For every secret, enumerating all random coefficient choices gives every tuple of
    t-1 share values exactly once, so the shares seen by t-1 colluders have the same
    (uniform) distribution whatever the secret.
    """
    colluders = xs[: t - 1]
    uniform = Counter(itertools.product(range(prime), repeat=t - 1))
    for secret in range(prime):
        seen = Counter()
        for coeffs in itertools.product(range(prime), repeat=t - 1):
            shares = shamir.split(secret, xs, t, prime=prime,
                                  entropy=_coefficient_entropy(coeffs, prime))
            seen[tuple(shares[x] for x in colluders)] += 1
        assert seen == uniform
        # ...while t shares always pin the secret down.
        assert shamir.reconstruct(shares, t, prime=prime) == secret


def test_t_minus_one_reconstruction_independent_of_secret_statistically():
    """Big field: over many random secrets the (t-1)-share guess matches no bit pattern."""
    entropy = seeded_entropy(b"hiding")
    t, xs = 3, [1, 2, 3, 4, 5]
    agree_low_bit = 0
    trials = 400
    for _ in range(trials):
        secret = int.from_bytes(entropy(32), "big")
        shares = shamir.split(secret, xs, t, entropy=entropy)
        guess = shamir.interpolate(list(shares.items())[: t - 1], 0)
        assert guess != secret
        agree_low_bit += (guess & 1) == (secret & 1)
    # Binomial(400, 1/2): mean 200, sd 10; a fixed seed, so this cannot flake.
    assert 150 < agree_low_bit < 250


def test_corrupted_extra_share_is_detected():
    shares = shamir.split(12345, [1, 2, 3, 4], 2, entropy=seeded_entropy(1))
    shares[4] = (shares[4] + 1) % shamir.P521
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.reconstruct(shares, 2)


@pytest.mark.parametrize(
    ("secret", "xs", "t", "match"),
    [
        (shamir.P521, [1, 2], 2, "secret"),
        (5, [0, 1], 2, "ids"),
        (5, [1, 1], 1, "distinct"),
        (5, [1, 2], 3, "threshold"),
        (5, [1, 2], 0, "threshold"),
    ],
)
def test_bad_arguments_raise(secret, xs, t, match):
    with pytest.raises(SecAggError, match=match):
        shamir.split(secret, xs, t)


@given(st.integers(0, shamir.P521 - 1))
def test_share_bytes_roundtrip(v):
    assert shamir.share_from_bytes(shamir.share_to_bytes(v)) == v


def test_share_bytes_rejects_bad_input():
    with pytest.raises(SecAggError):
        shamir.share_from_bytes(b"\x00" * 10)
    with pytest.raises(SecAggError, match="range"):
        shamir.share_from_bytes(b"\xff" * shamir.SHARE_BYTES)
