"""Routing summaries against slow, obvious per-example loops (scipy's entropy as reference)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import entropy

from routeaudit import TraceSet, UsageError
from routeaudit.summaries import FeatureCache, default_registry


def ragged_traces(n=30, layers=4, seed=0, k=5):
    rng = np.random.default_rng(seed)
    mask = np.tril(np.ones((layers, layers), dtype=bool))
    raw = rng.random((n, layers, layers)) ** 3 * mask
    routing = raw / raw.sum(axis=2, keepdims=True)
    return TraceSet(rng.standard_normal((n, k)), rng.integers(0, k, n), routing, source_mask=mask)


def slow_summaries(ts: TraceSet):
    """Per example, per layer, with Python loops: the definitions of docs/methods.md §2.1."""
    out = {"r_agg": [], "r_agg_normalized": [], "depth_variance": [], "depth_variance_across": []}
    for i in range(ts.n_examples):
        hs, hns, variances, means = [], [], [], []
        for layer in range(ts.n_layers):
            valid = np.flatnonzero(ts.source_mask[layer])
            if len(valid) < 2:
                continue
            alpha = ts.routing[i, layer, valid].astype(float)
            h = entropy(alpha)
            hs.append(h)
            hns.append(h / np.log(len(valid)))
            depth = np.arange(len(valid)) / (len(valid) - 1)
            mu = sum(a * d for a, d in zip(alpha, depth, strict=True))
            variances.append(sum(a * (d - mu) ** 2 for a, d in zip(alpha, depth, strict=True)))
            means.append(mu)
        out["r_agg"].append(np.mean(hs))
        out["r_agg_normalized"].append(np.mean(hns))
        out["depth_variance"].append(np.mean(variances))
        out["depth_variance_across"].append(np.var(means))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scalar_summaries_match_slow_loop(seed):
    ts = ragged_traces(seed=seed)
    cache = FeatureCache(ts, default_registry())
    for name, expected in slow_summaries(ts).items():
        np.testing.assert_allclose(cache[name], expected, rtol=1e-6, atol=1e-9, err_msg=name)


def test_profile_and_layer_entropy():
    ts = ragged_traces()
    cache = FeatureCache(ts, default_registry())
    profile = cache["profile"]
    assert profile.shape == (ts.n_examples, ts.n_layers - 1)  # layer 0 has one source
    np.testing.assert_allclose(cache["H2"], [entropy(r[2, :3]) for r in ts.routing.astype(float)],
                               rtol=1e-6)
    np.testing.assert_allclose(cache["H2_norm"], cache["H2"] / np.log(3), rtol=1e-12)
    np.testing.assert_allclose(profile[:, 1], cache["H2"], rtol=1e-12)
    np.testing.assert_array_equal(cache["H0"], 0.0)


def test_confidence_and_predictive_entropy():
    ts = ragged_traces()
    cache = FeatureCache(ts, default_registry())
    p = np.exp(ts.logits.astype(float))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(cache["confidence"], p.max(axis=1), rtol=1e-12)
    np.testing.assert_allclose(cache["predictive_entropy"], entropy(p, axis=1), rtol=1e-10)


def test_unknown_summary_is_usage_error():
    with pytest.raises(UsageError, match="unknown summary"):
        default_registry().get("nope")


def test_default_cells_are_scalar_routing_summaries():
    cells = default_registry().default_cells(ragged_traces(n=8, seed=0))
    assert cells == ["r_agg", "r_agg_normalized", "depth_variance", "depth_variance_across"]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_uniform_routing_maximises_normalized_entropy(seed):
    ts = ragged_traces(n=8, seed=seed)
    cache = FeatureCache(ts, default_registry())
    assert np.all(cache["r_agg_normalized"] <= 1 + 1e-9)
    assert np.all(cache["depth_variance"] >= 0)
    uniform = np.where(ts.source_mask, 1.0, 0.0)
    uniform = np.broadcast_to(uniform / uniform.sum(1, keepdims=True), ts.routing.shape)
    flat = TraceSet(ts.logits, ts.labels, uniform, source_mask=ts.source_mask)
    np.testing.assert_allclose(FeatureCache(flat, default_registry())["r_agg_normalized"], 1.0)
