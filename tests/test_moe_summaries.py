"""MoE routing summaries against slow obvious loops, and which summaries apply to experts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import entropy

from routeaudit import TraceSet, UsageError
from routeaudit.audit import AuditContext
from routeaudit.summaries import FeatureCache, default_registry, expert_load_table


def moe_traces(n=40, layers=3, experts=5, seed=0, expert_layer=None, sharp=1.0):
    rng = np.random.default_rng(seed)
    z = sharp * rng.standard_normal((n, layers, experts))
    routing = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    logits = rng.standard_normal((n, 4))
    return TraceSet(logits, rng.integers(0, 4, n), routing,
                    meta={"name": "moe", "family": "moe", "source_kind": "experts",
                          "top_k": 2, "expert_layer": expert_layer})


def test_moe_summaries_match_slow_loops():
    ts = moe_traces(seed=1)
    cache = FeatureCache(ts, default_registry())
    r = ts.routing.astype(np.float64)
    n, layers, experts = r.shape
    top1 = [np.mean([sorted(r[i, j])[-1] for j in range(layers)]) for i in range(n)]
    margin = [np.mean([sorted(r[i, j])[-1] - sorted(r[i, j])[-2] for j in range(layers)])
              for i in range(n)]
    np.testing.assert_allclose(cache["top1_prob"], top1, rtol=1e-12)
    np.testing.assert_allclose(cache["top1_margin"], margin, rtol=1e-12)
    assert list(cache["top1_expert"]) == [float(np.argmax(r[i, -1])) for i in range(n)]
    # load: share of tokens whose top-1 at layer l is e
    load = np.zeros((layers, experts))
    for i in range(n):
        for layer in range(layers):
            load[layer, int(np.argmax(r[i, layer]))] += 1 / n
    table, h = expert_load_table(ts)
    np.testing.assert_allclose(table, load, atol=1e-12)
    np.testing.assert_allclose(h, [entropy(row) for row in load], rtol=1e-12)
    mine = [np.mean([load[layer, int(np.argmax(r[i, layer]))] for layer in range(layers)])
            for i in range(n)]
    np.testing.assert_allclose(cache["expert_load"], mine, rtol=1e-12)


def test_expert_layer_selects_the_routed_region():
    ts = moe_traces(seed=2, expert_layer=0)
    r = ts.routing
    assert list(FeatureCache(ts, default_registry())["top1_expert"]) == \
        [float(np.argmax(r[i, 0])) for i in range(len(ts))]
    negative = moe_traces(seed=2, expert_layer=-3)  # -3 is layer 0 of 3
    assert np.array_equal(FeatureCache(negative, default_registry())["top1_expert"],
                          FeatureCache(ts, default_registry())["top1_expert"])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 5.0))
def test_moe_summary_invariants(seed, sharp):
    ts = moe_traces(n=12, seed=seed, sharp=sharp)
    cache = FeatureCache(ts, default_registry())
    experts = ts.n_sources
    assert np.all(cache["top1_prob"] >= 1 / experts - 1e-12) and np.all(cache["top1_prob"] <= 1)
    assert np.all(cache["top1_margin"] >= 0) and np.all(cache["top1_margin"] <= 1)
    assert np.all(cache["expert_load"] > 0) and np.all(cache["expert_load"] <= 1)
    # relabelling the experts changes no summary that claims to ignore the order, when the
    # top-1 expert is unique (sharp ~ 0 gives exact ties, broken by index: order matters)
    top2 = np.sort(ts.routing, axis=-1)[..., -2:]
    assume(np.all(top2[..., 1] - top2[..., 0] > 1e-9))
    perm = np.random.default_rng(seed).permutation(experts)
    relabelled = TraceSet(ts.logits, ts.labels, ts.routing[:, :, perm], meta=ts.meta)
    other = FeatureCache(relabelled, default_registry())
    for name in ("top1_prob", "top1_margin", "expert_load", "r_agg", "r_agg_normalized"):
        np.testing.assert_allclose(other[name], cache[name], rtol=1e-10, atol=1e-12)


def test_depth_summaries_are_not_offered_on_experts():
    ts = moe_traces()
    registry = default_registry()
    assert registry.default_cells(ts) == ["r_agg", "r_agg_normalized", "top1_prob",
                                          "top1_margin", "expert_load"]
    with pytest.raises(UsageError, match="reads the source index as a depth"):
        registry.check("depth_variance", ts)
    ctx = AuditContext.for_traces(ts, seeds=(0,))
    assert [c["summary"] for c in ctx.summary_cells()] == registry.default_cells(ts)


def test_moe_summaries_are_not_offered_on_depth_sources():
    rng = np.random.default_rng(0)
    routing = np.full((10, 2, 3), 1 / 3)
    ts = TraceSet(rng.standard_normal((10, 3)), rng.integers(0, 3, 10), routing)
    with pytest.raises(UsageError, match="needs Mixture-of-Experts traces"):
        default_registry().check("top1_margin", ts)
    assert "top1_prob" not in default_registry().default_cells(ts)


def test_a_label_feature_is_never_a_matched_claim():
    """A calibrator on [confidence, top1_expert] claims nothing about strata of an expert
    index: the matched audits fall back to the summaries that apply."""
    from routeaudit.calibrators import routing_robust

    ts = moe_traces()
    ctx = AuditContext.for_traces(ts, seeds=(0,), calibrator=routing_robust)
    assert ctx.calibrator_summaries() == []
    assert [c["summary"] for c in ctx.summary_cells()] == default_registry().default_cells(ts)
