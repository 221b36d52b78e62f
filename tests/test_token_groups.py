"""Token-level traces: sequences stay in one half of the split and are resampled whole."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from routeaudit import TraceSet
from routeaudit.audit import seeds_for
from routeaudit.stats import rng_for
from routeaudit.stats.bootstrap import Resampler, bootstrap_gap, group_units, resampling_counts
from routeaudit.stats.partitions import stratified_split
from routeaudit.summaries import default_registry


def reference_split(confidence, correct, seed, n_conf_groups=10):
    """The per-example split as it was before groups existed (a plain copy, looped)."""
    n = confidence.shape[0]
    order = np.argsort(confidence, kind="stable")
    decile = np.empty(n, dtype=np.int64)
    decile[order] = (np.arange(n) * n_conf_groups) // n
    stratum = decile * 2 + correct.astype(np.int64)
    rng = rng_for("split", seed)
    key = rng.random(n)
    order = np.lexsort((key, stratum))
    flip = rng.integers(0, 2, size=int(stratum.max()) + 1)
    seen: dict[int, int] = {}
    to_cal = np.zeros(n, dtype=bool)
    for i in order:
        k = seen.get(int(stratum[i]), 0)
        to_cal[i] = (k + flip[stratum[i]]) % 2 == 0
        seen[int(stratum[i])] = k + 1
    return np.flatnonzero(to_cal), np.flatnonzero(~to_cal)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(20, 300))
def test_split_without_groups_is_unchanged(seed, n):
    rng = np.random.default_rng(seed)
    conf, correct = rng.random(n), rng.random(n) < 0.6
    mine = stratified_split(conf, correct, seed)
    ref = reference_split(conf, correct, seed)
    assert np.array_equal(mine[0], ref[0]) and np.array_equal(mine[1], ref[1])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(4, 60), st.integers(1, 20))
def test_split_keeps_each_group_in_one_half(seed, n_groups, length):
    rng = np.random.default_rng(seed)
    groups = np.repeat(rng.permutation(n_groups) * 7 + 3, length)  # arbitrary ids
    n = groups.size
    cal, ev = stratified_split(rng.random(n), rng.random(n) < 0.5, seed, groups=groups)
    assert np.intersect1d(groups[cal], groups[ev]).size == 0
    assert np.union1d(cal, ev).size == n
    assert abs(np.unique(groups[cal]).size - np.unique(groups[ev]).size) <= 10  # ~half each


def _counts(seed, rows, n, groups=None):
    unit, n_units = group_units(groups, n)
    return resampling_counts(Resampler.draw(np.random.default_rng(seed), n_units), 0, rows, unit)


def test_groups_of_one_resample_like_examples():
    n = 500
    a = _counts(4, 30, n)
    b = _counts(4, 30, n, groups=np.arange(n)[::-1] + 10)
    assert np.array_equal(b, a[:, ::-1])  # group ids are sorted: example i is group n-1-i
    counts = _counts(1, 50, 12, groups=np.repeat([5, 1, 9], 4))
    assert np.all(counts.reshape(50, 3, 4).min(axis=2) == counts.reshape(50, 3, 4).max(axis=2))
    assert np.all(counts.sum(axis=1) == 12)  # 3 groups of 4 drawn 3 times


def test_sequence_bootstrap_widens_for_correlated_tokens():
    """Residuals shared within a sequence: the per-token bootstrap understates the spread
    of the weighted gap, the sequence bootstrap does not (checked against the spread over
    fresh simulated data sets)."""
    n_seq, length, n_bins, n_strata = 120, 25, 3, 3

    def draw(seed):
        rng = np.random.default_rng(seed)
        bins = rng.integers(0, n_bins, n_seq * length)
        strata = np.repeat(rng.integers(0, n_strata, n_seq), length)
        shared = np.repeat(rng.standard_normal(n_seq), length)
        return bins, strata, 0.3 * shared + 0.05 * rng.standard_normal(n_seq * length)

    from routeaudit.stats.gaps import gap_statistics

    truth = np.std([gap_statistics(*draw(s), n_bins=n_bins, n_strata=n_strata,
                                   min_count=5).weighted_gap for s in range(200)])
    bins, strata, resid = draw(1000)
    groups = np.repeat(np.arange(n_seq), length)
    kw = dict(n_bins=n_bins, n_strata=n_strata, n_boot=400, min_count=5)
    per_token = np.std(bootstrap_gap(bins, strata, resid, rng=1, **kw)[2])
    per_seq = np.std(bootstrap_gap(bins, strata, resid, rng=1, groups=groups, **kw)[2])
    assert per_token < 0.6 * truth
    assert 0.6 * truth < per_seq < 1.6 * truth


def test_seeds_of_token_traces_split_by_sequence():
    rng = np.random.default_rng(0)
    n = 600
    group = np.repeat(np.arange(60), 10)
    routing = rng.dirichlet(np.ones(3), size=(n, 2))
    ts = TraceSet(rng.standard_normal((n, 4)), rng.integers(0, 4, n), routing, group=group,
                  meta={"per_token": True})
    for seed in seeds_for([ts], (0, 1), default_registry()):
        assert np.intersect1d(group[seed.cal_index], group[seed.eval_index]).size == 0
        assert np.array_equal(seed.groups("eval"), group[seed.eval_index])
    flat = TraceSet(ts.logits, ts.labels, ts.routing, group=group)  # not per-token: no groups
    assert seeds_for([flat], (0,), default_registry())[0].groups("eval") is None
