"""Controls, the paired worst-tertile bootstrap and the decision rule of the calibrator audits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routeaudit import metrics
from routeaudit.calibration.controls import Variant, variant_input, within_bin_permutation
from routeaudit.calibration.features import DERIVED_FEATURES, derived_feature, feature_matrix
from routeaudit.calibration.scores import full_vector
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.stats import (
    bootstrap_worst_tile_ece,
    confidence_bins,
    paired_gain,
    rng_for,
)
from routeaudit.stats.bootstrap import Resampler
from routeaudit.summaries import FeatureCache, default_registry


@pytest.fixture(scope="module")
def traces():
    return make_traces("planted", 600, seed=3)


@pytest.fixture(scope="module")
def fm(traces):
    return feature_matrix(["confidence", "depth_variance", "profile"],
                          FeatureCache(traces, default_registry()))


def _conf(traces):
    return metrics.confidence_and_correct(traces.logits, traces.labels)[0]


def test_feature_matrix_columns_and_provenance(traces, fm):
    cache = FeatureCache(traces, default_registry())
    assert fm.routing_features == ("depth_variance", "profile")
    np.testing.assert_array_equal(fm.X[:, 0], cache["confidence"])
    np.testing.assert_array_equal(fm.X[:, 1], cache["depth_variance"])
    np.testing.assert_array_equal(fm.X[:, 2:], cache["profile"])
    assert fm.routing_columns().tolist() == list(range(1, fm.X.shape[1]))
    assert fm.routing_columns(["depth_variance"]).tolist() == [1]


def test_derived_features_match_direct_formulas(traces):
    z = traces.logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    s = np.sort(p, axis=1)[:, ::-1]
    want = {"predictive_entropy": -(p * np.log(p)).sum(1), "margin": s[:, 0] - s[:, 1],
            "logit_confidence": np.log(s[:, 0] / (1 - s[:, 0])), "second_probability": s[:, 1],
            "gini": 1 - (p**2).sum(1)}
    assert set(want) == set(DERIVED_FEATURES)
    for name, value in want.items():
        np.testing.assert_allclose(derived_feature(name, traces.logits), value, rtol=1e-9,
                                   atol=1e-12)


def test_capacity_twins_keep_width_and_carry_no_routing(traces, fm):
    conf = _conf(traces)
    rng = np.random.default_rng(0)
    zeros = variant_input(Variant("zeros", "capacity", "profile"), fm, traces.logits, conf, rng)
    assert zeros.shape == fm.X.shape
    cols = fm.routing_columns(["profile"])
    assert np.all(zeros[:, cols] == 0)
    np.testing.assert_array_equal(np.delete(zeros, cols, 1), np.delete(fm.X, cols, 1))
    derived = variant_input(Variant("derived", "capacity", "depth_variance"), fm, traces.logits,
                            conf, rng)
    np.testing.assert_allclose(derived[:, 1], derived_feature("predictive_entropy", traces.logits))
    np.testing.assert_array_equal(np.delete(derived, 1, 1), np.delete(fm.X, 1, 1))


def test_shuffles_permute_whole_routing_rows(traces, fm):
    conf = _conf(traces)
    cols = fm.routing_columns(["profile"])
    for kind in ("shuffled_global", "shuffled_within_bin"):
        out = variant_input(Variant(kind, "shuffle", "profile"), fm, traces.logits, conf,
                            np.random.default_rng(1))
        np.testing.assert_array_equal(np.delete(out, cols, 1), np.delete(fm.X, cols, 1))
        # every shuffled row is some original row, each used once
        order_out = np.lexsort(out[:, cols].T[::-1])
        order_in = np.lexsort(fm.X[:, cols].T[::-1])
        np.testing.assert_array_equal(out[order_out][:, cols], fm.X[order_in][:, cols])
        assert not np.array_equal(out[:, cols], fm.X[:, cols])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), n_bins=st.integers(1, 15))
def test_within_bin_permutation_stays_in_bin(seed, n, n_bins):
    rng = np.random.default_rng(seed)
    conf = rng.random(n).round(2)  # ties on purpose
    perm = within_bin_permutation(conf, np.random.default_rng(seed + 1), n_bins)
    assert sorted(perm.tolist()) == list(range(n))
    bins = confidence_bins(conf, n_bins, strategy="equal_mass")
    np.testing.assert_array_equal(bins[perm], bins)


def test_within_bin_permutation_is_uniform_inside_a_bin():
    conf = np.repeat([0.3, 0.9], 3)  # two bins of three: 6 equally likely arrangements each
    counts: dict[tuple, int] = {}
    for k in range(3000):
        perm = within_bin_permutation(conf, np.random.default_rng(k), 2)
        key = tuple(perm[:3].tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6
    assert min(counts.values()) > 400  # expected 500 each


def test_probes_drop_routing(traces, fm):
    conf = _conf(traces)
    rng = np.random.default_rng(0)
    only = variant_input(Variant("confidence_only", "probe"), fm, traces.logits, conf, rng)
    np.testing.assert_array_equal(only, fm.X[:, :1])
    pe = variant_input(Variant("predictive_entropy", "probe"), fm, traces.logits, conf, rng)
    np.testing.assert_allclose(pe[:, 1], derived_feature("predictive_entropy", traces.logits))
    assert pe.shape == (fm.X.shape[0], 2)


def test_bootstrap_kernel_observed_equals_metric_and_explicit_resampling():
    rng = np.random.default_rng(5)
    n = 400
    correct = rng.random(n) < 0.7
    summary = rng.random(n)
    preds = np.clip(np.stack([rng.random(n), 0.7 + 0.1 * rng.standard_normal(n)]), 0, 1)
    tiles = metrics.quantile_tiles(summary, 3)
    observed, reps = bootstrap_worst_tile_ece(preds, correct, tiles, n_boot=5, rng=rng_for("t", 1))
    for j in range(2):  # independent reference: routeaudit.metrics on the same data
        assert observed[j] == pytest.approx(metrics.worst_tile_ece(preds[j], correct, summary),
                                            abs=1e-12)
    # replicate k is the ECE of the k-th multinomial resample, shared by both probes
    for k, idx in enumerate(Resampler.draw(rng_for("t", 1), n).picks(0, 5)):
        for j in range(2):
            per_tile = []
            for t in range(3):
                sel = idx[tiles[idx] == t]
                per_tile.append(metrics.ece(preds[j][sel], correct[sel], 15) if sel.size else -1)
            assert reps[k, j] == pytest.approx(max(per_tile), abs=1e-12)


def test_paired_gain_ci_and_p_value():
    observed = np.array([0.05, 0.02])
    reps = np.column_stack([np.linspace(0.03, 0.07, 99), np.full(99, 0.02)])
    gain, (lo, hi), p = paired_gain(observed, reps, candidate=1, control=0, level=0.9)
    assert gain == pytest.approx(0.03)
    g = reps[:, 0] - reps[:, 1]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(g, [0.05, 0.95])))
    assert p == pytest.approx(2 * 1 / 100)  # no replicate ≤ 0


def test_full_vector_puts_calibrated_value_on_prediction():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0]])
    cal = np.array([0.5, 0.9, 0.7])
    out = full_vector(probs, cal)
    np.testing.assert_allclose(out.sum(1), 1.0)
    np.testing.assert_allclose(out[[0, 1, 2], [0, 2, 0]], cal)
    np.testing.assert_allclose(out[0, 1:], [0.375, 0.125])  # 0.5 shared 3:1
    np.testing.assert_allclose(out[2, 1:], [0.15, 0.15])  # all-zero rest shared equally


def test_derived_twin_of_a_label_has_the_labels_cardinality():
    """A label column (an expert index with 4 values) is replaced by 4 equal-mass cells of
    a confidence-derived feature, not by a continuous column (which a per-label calibrator
    would cut into many more cells than the candidate has)."""
    from routeaudit.calibration.controls import Variant, variant_input
    from routeaudit.calibration.features import DERIVED_FEATURES, FeatureMatrix, derived_feature
    from routeaudit.metrics import quantile_tiles

    rng = np.random.default_rng(0)
    n = 400
    logits = rng.standard_normal((n, 5))
    conf = np.exp(logits).max(1) / np.exp(logits).sum(1)
    expert = rng.integers(0, 4, n).astype(np.float64)
    other = rng.random(n)
    X = np.c_[conf, expert, other]
    fm = FeatureMatrix(X, ("confidence", "top1_expert", "r_agg"), ("top1_expert", "r_agg"),
                       labels=("top1_expert",))
    out = variant_input(Variant("derived", "capacity"), fm, logits, conf, rng)
    np.testing.assert_array_equal(out[:, 0], conf)
    first = derived_feature(DERIVED_FEATURES[0], logits)
    np.testing.assert_array_equal(out[:, 1], quantile_tiles(first, 4).astype(float))
    assert np.unique(out[:, 1]).size == 4 and np.bincount(out[:, 1].astype(int)).min() >= 99
    np.testing.assert_array_equal(out[:, 2], derived_feature(DERIVED_FEATURES[1], logits))
