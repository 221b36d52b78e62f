"""One implementation of every number: each quantity that several parts of the package use
comes from one function, and these tests pin that (a second copy that drifts fails here)."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from benchmarks.validity import naive_rejects, permutation_rejects, stratification_holds
from routeaudit import metrics
from routeaudit.audits import causal_ablation
from routeaudit.calibration.features import derived_feature
from routeaudit.cli import main
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.model.adapter import Adapter, supports_intervention
from routeaudit.stats import confidence_bins, quantile_strata
from routeaudit.summaries import default_registry

LOGITS = hnp.arrays(np.float64, st.tuples(st.integers(1, 40), st.integers(2, 6)),
                    elements=st.floats(-30, 30, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(LOGITS)
def test_one_softmax_behind_every_probability(logits):
    p = metrics.softmax(logits)
    # an independent reference: scipy's softmax
    from scipy.special import softmax as scipy_softmax

    np.testing.assert_allclose(p, scipy_softmax(logits, axis=1), rtol=1e-12, atol=1e-300)
    labels = np.zeros(len(logits), dtype=np.int64)
    conf, _ = metrics.confidence_and_correct(logits, labels)
    assert np.array_equal(conf, p.max(axis=1))
    entropy = metrics.predictive_entropy(logits)
    assert np.array_equal(derived_feature("predictive_entropy", logits), entropy)
    nll = metrics.per_example_nll(logits, labels)
    assert np.array_equal(causal_ablation.per_example_nll(logits, labels), nll)
    np.testing.assert_allclose(nll, -np.log(np.maximum(p[:, 0], 1e-300)), rtol=1e-9,
                               atol=1e-12)


def test_predictive_entropy_summary_is_the_metric():
    traces = make_traces("null", 300, seed=1)
    summary = default_registry().get("predictive_entropy").fn(traces)
    assert np.array_equal(summary, metrics.predictive_entropy(traces.logits))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(0, 1)),
       st.integers(1, 20))
def test_one_binning_rule_for_metrics_and_matching(conf, n_bins):
    # equal width: the (lo, hi] rule against a plain searchsorted on linspace edges
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    want = np.searchsorted(edges[1:-1], conf, side="left")
    assert np.array_equal(confidence_bins(conf, n_bins, strategy="equal_width"), want)
    assert np.array_equal(metrics.bin_indices(conf, n_bins), want)
    # equal mass: np.quantile edges, same closure
    q = np.quantile(conf, np.linspace(0.0, 1.0, n_bins + 1))
    want = np.searchsorted(q[1:-1], conf, side="left")
    assert np.array_equal(confidence_bins(conf, n_bins, strategy="equal_mass"), want)
    assert np.array_equal(metrics.bin_indices(conf, n_bins, strategy="equal_mass"), want)


def test_one_quantile_tile_rule():
    assert quantile_strata is metrics.quantile_tiles
    r = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0])
    assert quantile_strata(r, 3).tolist() == [0, 0, 0, 1, 2, 2]


def test_one_intervention_support_check():
    class Plain(Adapter):
        pass

    class Intervening(Adapter):
        def intervene(self, model, intervention):
            raise NotImplementedError

    class Vetoed(Intervening):
        @classmethod
        def supports_intervention(cls) -> bool:
            return False

    class DuckTyped:
        def intervene(self, model, intervention):
            return None

    assert not supports_intervention(Plain()) and not supports_intervention(Plain)
    assert supports_intervention(Intervening()) and supports_intervention(Intervening)
    assert not supports_intervention(Vetoed())
    assert supports_intervention(DuckTyped()) and not supports_intervention(object())
    assert not supports_intervention(None)


def test_validity_benchmark_runs_the_audit_that_routeaudit_run_runs(tmp_path):
    """benchmarks/validity.py decides exactly as `routeaudit run` on the same traces."""
    decided = []
    for kind, effect, seed in (("planted", 0.3, 3), ("null", 0.0, 4)):
        traces = make_traces(kind, 3000, seed=seed, effect=effect)
        path = tmp_path / f"{kind}.npz"
        traces.save_npz(path)
        out = tmp_path / f"{kind}.json"
        main(["run", str(path), "--seeds", str(seed), "--summary", "r_agg", "--permutations",
              "99", "--bootstrap", "200", "--audit", "permutation_null", "--audit",
              "stratification", "--json", str(out), "-q"])
        rows = {v["audit"]: v["status"] for v in json.loads(out.read_text())["verdicts"]}
        assert permutation_rejects(traces, seed=seed, permutations=99) == (
            rows["permutation_null"] == "pass")
        assert stratification_holds(traces, seed=seed, permutations=99, n_boot=200) == (
            rows["stratification"] == "pass")
        decided.append(rows["permutation_null"])
        assert isinstance(naive_rejects(traces, seed=seed, alpha=0.05), bool)
    assert decided[0] == "pass" and decided[1] != "pass"  # both sides are exercised
