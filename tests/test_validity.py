"""A fast subset of benchmarks/validity.py: error rates must be right, not just the code paths."""

from __future__ import annotations

import numpy as np

from benchmarks.validity import naive_rejects, permutation_rejects, replicate_data


def test_null_false_positive_rate_near_alpha_and_naive_test_fooled():
    perm, naive = [], []
    for rep in range(100):
        conf, correct, r = replicate_data("null", 2000, 0.0, rep)
        perm.append(permutation_rejects(conf, correct, r, alpha=0.05, permutations=99, seed=rep))
        naive.append(naive_rejects(correct, r, alpha=0.05))
    # Binomial(100, 0.05): P(X > 12) < 0.001, so a correct test fails this rarely.
    assert np.sum(perm) <= 12
    assert np.mean(naive) >= 0.9


def test_planted_effect_is_detected():
    hits = []
    for rep in range(30):
        conf, correct, r = replicate_data("planted", 4000, 0.2, rep)
        hits.append(permutation_rejects(conf, correct, r, alpha=0.05, permutations=99, seed=rep))
    assert np.mean(hits) >= 0.8
