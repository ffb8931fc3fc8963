"""The Aggregator seam: built-in FedAvg/FedAdam/FedYogi/FedAdagrad and the config choices."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedrg.config import FederationConfig
from fedrg.errors import FedrgError
from fedrg.federated.aggregate import (
    AGGREGATORS,
    Aggregator,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedYogi,
    make_aggregator,
)


def test_config_choices_are_the_registered_aggregators():
    choices = typing.get_args(FederationConfig.model_fields["server_optimizer"].annotation)
    assert list(choices) == list(AGGREGATORS)
    for name in AGGREGATORS:
        agg = make_aggregator(name, lr=0.5)
        assert isinstance(agg, Aggregator) and agg.name == name and agg.lr == 0.5
    with pytest.raises(FedrgError, match=r"server_optimizer='fedprox'.*fedyogi"):
        make_aggregator("fedprox")


def _reference(kind: str, deltas: list[np.ndarray], lr: float, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al. 2021, Algorithm 2, written out in float64 one scalar at a time."""
    x = np.zeros_like(deltas[0], dtype=np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for d in deltas:
        d = d.astype(np.float64)
        for i in range(d.size):
            m.flat[i] = b1 * m.flat[i] + (1 - b1) * d.flat[i]
            sq = d.flat[i] ** 2
            if kind == "fedadam":
                v.flat[i] = b2 * v.flat[i] + (1 - b2) * sq
            elif kind == "fedyogi":
                v.flat[i] = v.flat[i] - (1 - b2) * sq * np.sign(v.flat[i] - sq)
            else:
                v.flat[i] = v.flat[i] + sq
            x.flat[i] += lr * m.flat[i] / (np.sqrt(v.flat[i]) + tau)
    return x


deltas_st = st.lists(
    arrays(np.float64, 4, elements=st.floats(-2, 2, allow_nan=False, width=32)), min_size=1, max_size=5
)


@settings(max_examples=40, deadline=None)
@given(deltas=deltas_st, kind=st.sampled_from(["fedadam", "fedyogi", "fedadagrad"]),
       lr=st.floats(1e-3, 1.0))
def test_adaptive_rules_match_the_paper(deltas, kind, lr):
    agg = make_aggregator(kind, lr=lr)
    x = [np.zeros(4, np.float64)]
    for d in deltas:
        x = agg.apply(x, [d])
    np.testing.assert_allclose(x[0], _reference(kind, deltas, lr), rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(deltas=deltas_st, lr=st.floats(1e-3, 2.0))
def test_fedavg_adds_lr_times_the_mean_delta(deltas, lr):
    agg = FedAvg(lr=lr)
    x = [np.zeros(4, np.float64)]
    for d in deltas:
        x = agg.apply(x, [d])
    np.testing.assert_allclose(x[0], lr * np.sum(deltas, axis=0), rtol=1e-9, atol=1e-12)
    assert agg.state_arrays() == {}


def test_yogi_second_moment_grows_slower_than_adagrad_and_differs_from_adam():
    d = [np.array([1.0, -0.5], np.float32)]
    adam, yogi, ada = FedAdam(lr=0.1), FedYogi(lr=0.1), FedAdagrad(lr=0.1)
    for _ in range(5):
        for agg in (adam, yogi, ada):
            agg.apply([np.zeros(2, np.float32)], d)
    assert np.all(yogi.v[0] < ada.v[0]) and not np.allclose(yogi.v[0], adam.v[0])


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_state_roundtrip_resumes_identically(kind):
    a = make_aggregator(kind, lr=0.1)
    g = [np.zeros(3, np.float32), np.ones((2, 2), np.float32)]
    rng = np.random.default_rng(0)
    step = [rng.normal(size=(3,)).astype(np.float32), rng.normal(size=(2, 2)).astype(np.float32)]
    g = a.apply(g, step)
    b = make_aggregator(kind, lr=0.1)
    b.load_state_arrays(a.state_arrays())
    nxt = [s * 0.5 for s in step]
    for x, y in zip(a.apply(g, nxt), b.apply(g, nxt), strict=True):
        np.testing.assert_array_equal(x, y)
