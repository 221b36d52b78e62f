"""A fast subset of benchmarks/validity.py: error rates must be right, not just the code paths.

Both rates are of the shipped permutation_null audit, on the context `routeaudit run` builds."""

from __future__ import annotations

import numpy as np

from benchmarks.validity import naive_rejects, permutation_rejects, replicate_traces


def test_null_false_positive_rate_near_alpha_and_naive_test_fooled():
    perm, naive = [], []
    for rep in range(100):
        traces = replicate_traces("null", 2000, 0.0, rep)
        perm.append(permutation_rejects(traces, seed=rep, permutations=99))
        naive.append(naive_rejects(traces, seed=rep, alpha=0.05))
    # Binomial(100, 0.05): P(X > 12) < 0.001, so a correct test fails this rarely.
    assert np.sum(perm) <= 12
    assert np.mean(naive) >= 0.9


def test_planted_effect_is_detected():
    hits = [permutation_rejects(replicate_traces("planted", 4000, 0.2, rep), seed=rep,
                                permutations=99) for rep in range(30)]
    assert np.mean(hits) >= 0.8
