"""routeaudit.stats against slow obvious loops, scipy and statsmodels, plus validity by
simulation. Everything is seeded, so every test is deterministic; the Monte Carlo bands are
wide enough to hold for any seed and narrow enough to catch a wrong null."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from routeaudit.stats import (
    GapResult,
    PermutationResult,
    _backend,
    _kernels,
    benjamini_hochberg,
    bootstrap_ci,
    bootstrap_gap,
    confidence_bins,
    gap_statistics,
    holm,
    quantile_strata,
    rng_for,
    seed_summary,
    torch_generator_for,
    within_bin_permutation_test,
    within_bin_strata,
)
from routeaudit.stats.bootstrap import Resampler

# --------------------------------------------------------------------------- helpers


def make_cells(n, n_bins, seed, *, effect=0.0, corr=0.8, n_strata=3, strategy="equal_mass"):
    """Confidence bins, routing strata and residuals; routing correlated with confidence.

    effect = 0 is the conditional null (Y ⟂ R | C); effect > 0 lowers accuracy in the top
    routing stratum at fixed confidence.
    """
    gen = np.random.default_rng(seed)
    c = gen.uniform(0.35, 1.0, n)
    r = corr * c + (1 - corr) * gen.random(n)
    strata = quantile_strata(r, n_strata)
    p = np.clip(c - effect * (strata == n_strata - 1), 0.0, 1.0)
    y = (gen.random(n) < p).astype(float)
    return confidence_bins(c, n_bins, strategy=strategy), strata, y - c


def make_exact_null(n, n_bins, seed):
    """Y ⟂ R | C with exchangeable residuals inside each bin: confidence takes one value per
    bin, routing tracks confidence across bins (corr about 0.8) but not within them.

    (With continuous confidence inside a wide bin the residual variance c(1 - c) varies with
    routing too, and the within-bin null is only approximately exchangeable; that is a
    property of the method, measured by benchmarks/validity.py, not of this code.)
    """
    gen = np.random.default_rng(seed)
    bins = gen.integers(0, n_bins, n)
    c = np.linspace(0.45, 0.95, n_bins)[bins]
    strata = quantile_strata(c + 0.12 * gen.standard_normal(n), 3)
    y = (gen.random(n) < c).astype(float)
    return bins, strata, y - c


def slow_gaps(bins, strata, res, n_bins, n_strata, min_count):
    """docs/methods.md §2.4 written as the obvious loops."""
    deltas, weights = [], []
    bin_gaps = np.full(n_bins, np.nan)
    for b in range(n_bins):
        means = []
        for t in range(n_strata):
            member = (bins == b) & (strata == t)
            if member.sum() >= min_count:
                means.append(np.mean(res[member]))
        if len(means) >= 2:
            bin_gaps[b] = max(means) - min(means)
            deltas.append(bin_gaps[b])
            weights.append(np.sum(bins == b))
    if not deltas:
        return np.nan, np.nan, bin_gaps
    w = np.asarray(weights, float)
    return float(np.sum(w * deltas) / w.sum()), float(max(deltas)), bin_gaps


def slow_null(bins, strata, res, n_bins, n_strata, min_count, n_perm, seed, stat="weighted_gap"):
    """The within-bin null as the obvious loop: numpy permutations bin by bin."""
    gen = np.random.default_rng(seed)
    groups = [np.flatnonzero(bins == b) for b in range(n_bins)]
    out = np.empty(n_perm)
    for k in range(n_perm):
        perm = strata.copy()
        for idx in groups:
            perm[idx] = strata[idx][gen.permutation(idx.size)]
        g = gap_statistics(bins, perm, res, n_bins=n_bins, n_strata=n_strata, min_count=min_count)
        out[k] = getattr(g, stat)
    return out


def is_phipson_smyth(p, n):
    k = p * (n + 1) - 1
    return abs(k - round(k)) < 1e-9 and 0 <= round(k) <= n


# --------------------------------------------------------------------------- random streams


def test_rng_for_is_stable_and_keyed():
    a = rng_for("permutation_null", "depth_variance", 1).random(4)
    assert np.array_equal(a, rng_for("permutation_null", "depth_variance", 1).random(4))
    for other in [
        ("permutation_null", "depth_variance", 2),
        ("depth_variance", "permutation_null", 1),
        ("permutation_null", "depth_variance", "1"),
    ]:
        assert not np.array_equal(a, rng_for(*other).random(4))
    # pinned: sha256-keyed SeedSequence, the same in every process and on every machine
    raw = rng_for("a", 1).bit_generator.random_raw(2).tolist()
    assert raw == [17143247523218974535, 10164573726990422248]
    t1 = torch.rand(3, generator=torch_generator_for("x", 2))
    assert torch.equal(t1, torch.rand(3, generator=torch_generator_for("x", 2)))
    assert not torch.equal(t1, torch.rand(3, generator=torch_generator_for("x", 3)))
    with pytest.raises(TypeError):
        rng_for(1.5)
    with pytest.raises(ValueError):
        rng_for()


# --------------------------------------------------------------------------- partitions


def test_equal_width_bins_use_lower_open_upper_closed_rule():
    conf = np.array([0.0, 1 / 15, 1 / 15 + 1e-12, 2 / 15, 0.5, 14 / 15, 1.0])
    got = confidence_bins(conf, 15, strategy="equal_width")
    edges = np.linspace(0, 1, 16)
    want = [
        0 if c == 0 else int(np.flatnonzero((c > edges[:-1]) & (c <= edges[1:]))[0]) for c in conf
    ]
    assert got.tolist() == want == [0, 0, 1, 1, 7, 13, 14]
    with pytest.raises(ValueError):
        confidence_bins(np.array([1.2]), 15, strategy="equal_width")
    with pytest.raises(ValueError):
        confidence_bins(np.array([0.2]), 15, strategy="quantile")


def test_equal_mass_bins_balance_and_put_edge_ties_low():
    gen = np.random.default_rng(0)
    conf = gen.random(3000)
    bins = confidence_bins(conf, 15)
    assert np.bincount(bins, minlength=15).tolist() == [200] * 15
    edges = np.quantile(conf, np.linspace(0, 1, 16))
    for i in range(1, 15):  # an example sitting exactly on an inner edge goes to the lower bin
        on_edge = np.flatnonzero(conf == edges[i])
        assert (bins[on_edge] == i - 1).all()
    tied = np.r_[np.full(500, 0.99), gen.random(100)]
    b = confidence_bins(tied, 10)
    assert b.min() >= 0 and b.max() <= 9 and np.bincount(b, minlength=10).min() == 0


def test_quantile_strata_cut_ties_go_to_lower_stratum():
    r = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    cuts = np.quantile(r, [1 / 3, 2 / 3])
    want = [0 if v <= cuts[0] else 1 if v <= cuts[1] else 2 for v in r]
    assert quantile_strata(r).tolist() == want
    r = np.array([0.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # cut equals a value
    cuts = np.quantile(r, [1 / 3, 2 / 3])
    assert quantile_strata(r).tolist() == [
        0 if v <= cuts[0] else 1 if v <= cuts[1] else 2 for v in r
    ]


def _within_bin_strata_loop(bins, r, k):
    """Slow obvious reference: per bin, stratum = floor(k * #{members with smaller r} / n_b)."""
    out = np.empty(r.size, dtype=np.int64)
    for i in range(r.size):
        members = r[bins == bins[i]]
        out[i] = min(k - 1, (k * int(np.sum(members < r[i]))) // members.size)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 5), n=st.integers(1, 80),
       n_bins=st.integers(1, 6), n_values=st.integers(1, 10))
def test_within_bin_strata_matches_loop_and_is_permutation_equivariant(seed, k, n, n_bins,
                                                                       n_values):
    rng = np.random.default_rng(seed)
    bins = rng.integers(0, n_bins, n)
    r = rng.integers(0, n_values, n).astype(float)  # many ties on purpose
    got = within_bin_strata(bins, r, k)
    np.testing.assert_array_equal(got, _within_bin_strata_loop(bins, r, k))
    # permuting r inside a bin permutes the labels the same way (the null stays exact)
    perm = np.arange(n)
    for b in np.unique(bins):
        idx = np.flatnonzero(bins == b)
        perm[idx] = rng.permutation(idx)
    np.testing.assert_array_equal(within_bin_strata(bins, r[perm], k), got[perm])
    # tied values share a stratum within a bin
    for b in np.unique(bins):
        m = bins == b
        for v in np.unique(r[m]):
            assert np.unique(got[m & (r == v)]).size == 1


def test_within_bin_strata_balance_and_errors():
    bins = np.repeat(np.arange(4), 30)
    r = np.random.default_rng(0).random(120)
    counts = np.bincount(within_bin_strata(bins, r, 3) + 3 * bins, minlength=12)
    assert counts.tolist() == [10] * 12
    with pytest.raises(ValueError):
        within_bin_strata(bins, r[:-1])
    with pytest.raises(ValueError):
        within_bin_strata(bins, np.where(r > 0.5, np.nan, r))


# --------------------------------------------------------------------------- gap statistics


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("min_count", [1, 5, 24])
def test_gap_statistics_matches_slow_loop(seed, min_count):
    gen = np.random.default_rng(seed)
    n, n_bins = 500, 8  # about 24 examples per (bin, stratum) cell
    bins = gen.integers(0, n_bins - 1, n)  # the last bin stays empty
    strata = gen.integers(0, 3, n)
    strata[bins == 2] = 0  # a bin with a single stratum: never used
    strata[(bins == 3) & (strata == 2)] = 1  # a bin with an empty stratum
    res = gen.random(n) - 0.6
    got = gap_statistics(bins, strata, res, n_bins=n_bins, n_strata=3, min_count=min_count)
    wg, mg, bin_gaps = slow_gaps(bins, strata, res, n_bins, 3, min_count)
    assert isinstance(got, GapResult)
    assert got.weighted_gap == pytest.approx(wg, rel=1e-12, abs=1e-14, nan_ok=True)
    assert got.max_gap == pytest.approx(mg, rel=1e-12, abs=1e-14, nan_ok=True)
    np.testing.assert_allclose(got.bin_gaps, bin_gaps, rtol=1e-12, atol=1e-14)
    assert got.used_bins.tolist() == np.isfinite(bin_gaps).tolist()
    assert got.n_used == int(np.isfinite(bin_gaps).sum())
    assert not got.used_bins[2] and not got.used_bins[n_bins - 1]


def test_weights_count_every_example_of_the_bin():
    # bin 0: strata sizes 5, 5, 2 (stratum 2 unsupported) -> n_0 = 12, not 10
    bins = np.r_[np.zeros(12, int), np.ones(10, int)]
    strata = np.r_[[0] * 5, [1] * 5, [2] * 2, [0] * 5, [1] * 5]
    res = np.r_[np.zeros(5), np.ones(5), np.full(2, 9.0), np.zeros(5), np.full(5, 0.5)]
    got = gap_statistics(bins, strata, res, n_bins=2, n_strata=3, min_count=5)
    assert got.bin_gaps.tolist() == [1.0, 0.5]
    assert got.weighted_gap == pytest.approx((12 * 1.0 + 10 * 0.5) / 22)
    assert got.max_gap == 1.0


def test_no_used_bin_gives_nan():
    bins = np.zeros(8, int)
    strata = np.r_[[0] * 4, [1] * 4]
    got = gap_statistics(bins, strata, np.zeros(8), n_bins=1, n_strata=3, min_count=5)
    assert np.isnan(got.weighted_gap) and np.isnan(got.max_gap) and got.n_used == 0
    res = within_bin_permutation_test(
        bins, strata, np.zeros(8), n_bins=1, n_strata=3, n_permutations=9, rng=0
    )
    assert np.isnan(res.statistic) and np.isnan(res.p_value) and res.n_permutations == 0


def test_bad_inputs_are_rejected():
    kw = dict(n_bins=2, n_strata=3)
    with pytest.raises(ValueError):
        gap_statistics(np.array([0, 2]), np.array([0, 1]), np.zeros(2), **kw)
    with pytest.raises(ValueError):
        gap_statistics(np.array([0, 1]), np.array([0, 1]), np.array([0.0, np.nan]), **kw)
    with pytest.raises(ValueError):
        gap_statistics(np.array([0, 1]), np.array([0.0, 1.0]), np.zeros(2), **kw)
    with pytest.raises(ValueError):
        within_bin_permutation_test(
            np.array([0, 1]), np.array([0, 1]), np.zeros(2), **kw, n_permutations=0, rng=0
        )


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shift=st.floats(-3, 3), min_count=st.integers(1, 6))
def test_gap_statistics_invariances(seed, shift, min_count):
    gen = np.random.default_rng(seed)
    n = int(gen.integers(5, 120))
    bins, strata, res = gen.integers(0, 4, n), gen.integers(0, 3, n), gen.random(n) - 0.5
    base = gap_statistics(bins, strata, res, n_bins=4, n_strata=3, min_count=min_count)
    order = gen.permutation(n)
    shuffled = gap_statistics(
        bins[order], strata[order], res[order], n_bins=4, n_strata=3, min_count=min_count
    )
    shifted = gap_statistics(bins, strata, res + shift, n_bins=4, n_strata=3, min_count=min_count)
    relabel = gen.permutation(4)
    renamed = gap_statistics(relabel[bins], strata, res, n_bins=4, n_strata=3, min_count=min_count)
    for other in (shuffled, shifted, renamed):
        np.testing.assert_allclose(other.weighted_gap, base.weighted_gap, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(other.max_gap, base.max_gap, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(renamed.bin_gaps[relabel], base.bin_gaps, rtol=1e-9, atol=1e-12)


def test_bootstrap_numpy_kernel_equals_torch_kernel(monkeypatch):
    """The CPU bootstrap (compiled, or numpy without numba) and the torch kernel sum the same
    integers, so verdicts do not depend on the device."""
    bins, strata, res = make_cells(700, 6, seed=21)
    kw = dict(n_bins=6, n_strata=3, n_boot=150, min_count=5)
    lo, hi, on_cpu = bootstrap_gap(bins, strata, res, **kw, rng=5)
    monkeypatch.setattr(_backend, "_TORCH_ON_CPU", True)
    lo_t, hi_t, on_torch = bootstrap_gap(bins, strata, res, **kw, rng=5, chunk_size=37)
    assert np.array_equal(on_cpu, on_torch, equal_nan=True)
    assert (lo, hi) == (lo_t, hi_t)


# --------------------------------------------------------------------------- permutation null


@pytest.mark.parametrize(
    ("strategy", "stat"),
    [("equal_mass", "weighted_gap"), ("equal_width", "weighted_gap"), ("equal_mass", "max_gap")],
)
def test_permutation_null_matches_slow_reference(strategy, stat):
    # equal_width on c ~ U(0.35, 1) gives unequal bins, i.e. several width classes
    bins, strata, res = make_cells(360, 6, seed=11, strategy=strategy)
    kw = dict(n_bins=6, n_strata=3, min_count=5)
    ours = within_bin_permutation_test(
        bins, strata, res, **kw, n_permutations=3000, rng=1, statistic=stat
    )
    ref = slow_null(bins, strata, res, 6, 3, 5, 2000, seed=2, stat=stat)
    observed = getattr(gap_statistics(bins, strata, res, **kw), stat)
    assert ours.statistic == pytest.approx(observed, rel=1e-12, abs=1e-14)
    se = np.hypot(ours.null_sd / np.sqrt(3000), ref.std() / np.sqrt(2000))
    assert abs(ours.null_mean - ref.mean()) < 4 * se
    assert ours.null_sd == pytest.approx(ref.std(ddof=1), rel=0.08)
    assert sps.ks_2samp(ours.null, ref).pvalue > 1e-3
    p_ref = (1 + np.sum(ref >= observed - 1e-12)) / 2001
    assert (
        abs(ours.p_value - p_ref) < 4 * np.sqrt(p_ref * (1 - p_ref) * (1 / 3000 + 1 / 2000)) + 2e-3
    )


def test_global_permutation_is_not_what_we_compute():
    """Power check of the reference comparison: a null that ignores the bins is far off."""
    bins, strata, res = make_cells(360, 6, seed=11)
    ours = within_bin_permutation_test(
        bins, strata, res, n_bins=6, n_strata=3, n_permutations=1000, rng=1
    )
    gen = np.random.default_rng(0)
    wrong = np.array(
        [
            gap_statistics(bins, gen.permutation(strata), res, n_bins=6, n_strata=3).weighted_gap
            for _ in range(500)
        ]
    )
    assert abs(ours.null_mean - wrong.mean()) > 6 * wrong.std() / np.sqrt(500)


def test_single_bin_equals_ordinary_permutation_test():
    gen = np.random.default_rng(3)
    n = 90
    strata = np.repeat([0, 1, 2], 30)
    res = gen.random(n) - 0.5 + 0.12 * (strata == 2)
    bins = np.zeros(n, int)
    ours = within_bin_permutation_test(
        bins, strata, res, n_bins=1, n_strata=3, n_permutations=4000, rng=5
    )

    def gap(*samples, axis=-1):
        means = np.stack([s.mean(axis=axis) for s in samples])
        return means.max(axis=0) - means.min(axis=0)

    sp = sps.permutation_test(
        tuple(res[strata == t] for t in range(3)),
        gap,
        permutation_type="independent",
        vectorized=True,
        n_resamples=4000,
        alternative="greater",
        rng=6,
    )
    assert ours.statistic == pytest.approx(sp.statistic, rel=1e-12)
    se = np.sqrt(sp.pvalue * (1 - sp.pvalue) * 2 / 4000)
    assert 0.005 < sp.pvalue < 0.5  # an informative comparison, not two zeros
    assert abs(ours.p_value - sp.pvalue) < 4 * se + 1e-3


def test_p_value_form_and_identical_residuals():
    bins, strata, res = make_cells(300, 5, seed=4)
    for b in (1, 19, 200):
        r = within_bin_permutation_test(
            bins, strata, res, n_bins=5, n_strata=3, n_permutations=b, rng=b
        )
        assert isinstance(r, PermutationResult)
        assert 0 < r.p_value <= 1 and is_phipson_smyth(r.p_value, b)
        assert r.n_permutations == b == r.null.size and not r.stopped_early
        assert r.exceedances == int(np.sum(r.null >= r.statistic - 1e-12 * max(1, r.statistic)))
    flat = within_bin_permutation_test(
        bins, strata, np.full(300, 0.3), n_bins=5, n_strata=3, n_permutations=99, rng=0
    )
    assert flat.statistic == 0.0 and flat.p_value == 1.0 and flat.exceedances == 99
    planted = within_bin_permutation_test(
        *make_cells(2000, 5, seed=4, effect=0.3), n_bins=5, n_strata=3, n_permutations=99, rng=0
    )
    assert planted.p_value == 1 / 100  # the smallest possible value, never 0


def test_same_seed_same_result_for_any_chunk_size():
    bins, strata, res = make_cells(500, 7, seed=8, strategy="equal_width")
    kw = dict(n_bins=7, n_strata=3, n_permutations=257)
    base = within_bin_permutation_test(bins, strata, res, **kw, rng=42)
    for chunk in (1, 3, 64, 1000):
        other = within_bin_permutation_test(bins, strata, res, **kw, rng=42, chunk_size=chunk)
        assert np.array_equal(other.null, base.null) and other.p_value == base.p_value
    again = within_bin_permutation_test(bins, strata, res, **kw, rng=np.random.default_rng(42))
    assert np.array_equal(again.null, base.null)
    other_seed = within_bin_permutation_test(bins, strata, res, **kw, rng=43)
    assert not np.array_equal(other_seed.null, base.null)


def test_torch_kernel_equals_numpy_kernel(monkeypatch):
    bins, strata, res = make_cells(500, 7, seed=9, strategy="equal_width")
    kw = dict(n_bins=7, n_strata=3, n_permutations=200, rng=3)
    base = within_bin_permutation_test(bins, strata, res, **kw)
    monkeypatch.setattr(_backend, "_TORCH_ON_CPU", True)
    on_torch = within_bin_permutation_test(bins, strata, res, **kw, chunk_size=33)
    assert np.array_equal(on_torch.null, base.null) and on_torch.p_value == base.p_value


def test_draw_rejections_are_resolved_exactly(monkeypatch):
    """6-bit draws need a Lemire rejection in almost every (permutation, bin); the exact
    redraw path keeps the null. (Replaces the key-tie test of the earlier sort-based engine:
    the same rare-path check, for the rare path this engine has.)"""
    calls = []
    real = _kernels._fix_flagged

    def counting(le, flagged, *args):
        calls.append(int(flagged.sum()))
        return real(le, flagged, *args)

    monkeypatch.setattr(_kernels, "DRAW_BITS", 6)
    monkeypatch.setattr(_kernels, "_fix_flagged", counting)
    bins, strata, res = make_cells(240, 4, seed=12)  # bins of 60 <= 2**6 examples
    kw = dict(n_bins=4, n_strata=3, min_count=5)
    ours = within_bin_permutation_test(bins, strata, res, **kw, n_permutations=1500, rng=1)
    chunked = within_bin_permutation_test(
        bins, strata, res, **kw, n_permutations=1500, rng=1, chunk_size=7
    )
    assert np.array_equal(chunked.null, ours.null)
    monkeypatch.setattr(_kernels, "USE_NUMBA", False)  # the numpy twin counts its redraws
    twin = within_bin_permutation_test(bins, strata, res, **kw, n_permutations=1500, rng=1)
    assert sum(calls) > 1000
    assert np.array_equal(twin.null, ours.null)
    ref = slow_null(bins, strata, res, 4, 3, 5, 1500, seed=2)
    assert sps.ks_2samp(ours.null, ref).pvalue > 1e-3
    se = np.hypot(ours.null_sd, ref.std()) / np.sqrt(1500)
    assert abs(ours.null_mean - ref.mean()) < 4 * se


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), power=st.integers(-8, 8))
def test_permutation_test_exact_invariances(seed, power):
    """Exact properties: the engine only sees (bin, stratum, order within the cell)."""
    gen = np.random.default_rng(seed)
    n = int(gen.integers(30, 150))
    bins, strata, res = gen.integers(0, 3, n), gen.integers(0, 3, n), gen.random(n) - 0.5
    kw = dict(n_bins=3, n_strata=3, n_permutations=49, min_count=2)
    base = within_bin_permutation_test(bins, strata, res, **kw, rng=seed)
    # reorder examples, keeping the relative order of examples inside each (bin, stratum) cell
    cell = bins * 3 + strata
    key = gen.permutation(9)[cell]
    order = np.lexsort((np.arange(n), key))
    moved = within_bin_permutation_test(bins[order], strata[order], res[order], **kw, rng=seed)
    scaled = within_bin_permutation_test(bins, strata, np.ldexp(res, power), **kw, rng=seed)
    if np.isnan(base.statistic):
        assert np.isnan(moved.statistic) and np.isnan(scaled.statistic)
        return
    assert np.array_equal(moved.null, base.null) and moved.p_value == base.p_value
    assert np.array_equal(scaled.null, np.ldexp(base.null, power))
    assert scaled.p_value == base.p_value
    assert is_phipson_smyth(base.p_value, 49)


# --------------------------------------------------------------------------- validity


def test_null_rejection_rate_and_uniform_p_values():
    """Routing correlated with confidence, Y ⟂ R | C: size holds and p ~ U(0, 1)."""
    ps = np.array(
        [
            within_bin_permutation_test(
                *make_exact_null(400, 4, seed=1000 + rep),
                n_bins=4,
                n_strata=3,
                n_permutations=199,
                rng=rep,
            ).p_value
            for rep in range(200)
        ]
    )
    rejections = int(np.sum(ps <= 0.05))
    assert 1 <= rejections <= 22  # Binomial(200, 0.05): mean 10, 99.9% band about [2, 21]
    assert sps.kstest(ps, "uniform").pvalue > 1e-3


def test_planted_effect_is_detected():
    ps = [
        within_bin_permutation_test(
            *make_cells(1500, 5, seed=s, effect=0.15, corr=0.3),
            n_bins=5,
            n_strata=3,
            n_permutations=199,
            rng=s,
        ).p_value
        for s in range(5)
    ]
    assert max(ps) <= 0.01


def test_besag_clifford_stops_early_and_stays_valid():
    results = [
        within_bin_permutation_test(
            *make_exact_null(400, 4, seed=2000 + rep),
            n_bins=4,
            n_strata=3,
            n_permutations=999,
            rng=rep,
            sequential_h=10,
        )
        for rep in range(200)
    ]
    ps = np.array([r.p_value for r in results])
    early = np.array([r.stopped_early for r in results])
    assert early.mean() > 0.8
    assert np.mean([r.n_permutations for r in results]) < 300
    assert np.mean(ps <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 200)
    assert sps.kstest(ps, "uniform").pvalue > 1e-3
    for r in results:
        if r.stopped_early:
            assert r.exceedances == 10 and r.p_value == 10 / r.n_permutations
            assert r.null.size == r.n_permutations
            assert r.null[-1] >= r.statistic - 1e-12 * max(1, r.statistic)  # the h-th hit
        else:
            assert is_phipson_smyth(r.p_value, 999)


def test_besag_clifford_is_chunk_independent_and_exact_at_the_edges():
    bins, strata, res = make_cells(600, 6, seed=5)
    kw = dict(n_bins=6, n_strata=3, n_permutations=500, sequential_h=7)
    base = within_bin_permutation_test(bins, strata, res, **kw, rng=9)
    assert base.stopped_early
    for chunk in (1, 2, 13, 500):
        other = within_bin_permutation_test(bins, strata, res, **kw, rng=9, chunk_size=chunk)
        assert other.n_permutations == base.n_permutations and other.p_value == base.p_value
        assert np.array_equal(other.null, base.null)
    full = within_bin_permutation_test(bins, strata, res, **{**kw, "sequential_h": None}, rng=9)
    assert np.array_equal(full.null[: base.n_permutations], base.null)
    flat = np.full(600, 0.25)  # every T* ties T: the h-th exceedance is at draw h
    r = within_bin_permutation_test(bins, strata, flat, **{**kw, "sequential_h": 3}, rng=0)
    assert (r.n_permutations, r.p_value, r.stopped_early) == (3, 1.0, True)
    r = within_bin_permutation_test(bins, strata, flat, **{**kw, "sequential_h": 500}, rng=0)
    assert (r.n_permutations, r.p_value, r.stopped_early) == (500, 1.0, False)
    strong = make_cells(2000, 5, seed=4, effect=0.3)
    r = within_bin_permutation_test(
        *strong, n_bins=5, n_strata=3, n_permutations=99, rng=0, sequential_h=5
    )
    assert not r.stopped_early and r.p_value == 1 / 100


# --------------------------------------------------------------------------- multiple testing

p_values = st.lists(
    st.one_of(
        st.sampled_from([0.0, 0.001, 0.01, 0.04, 0.05, 0.2, 0.5, 1.0]),
        st.floats(0, 1),
        st.just(float("nan")),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(p=p_values)
def test_holm_and_bh_match_statsmodels(p):
    p = np.asarray(p, float)
    finite = ~np.isnan(p)
    for ours, method in ((holm(p), "holm"), (benjamini_hochberg(p), "fdr_bh")):
        assert np.array_equal(np.isnan(ours), ~finite)  # NaN passes through
        if finite.any():
            want = multipletests(p[finite], method=method)[1]
            np.testing.assert_allclose(ours[finite], want, rtol=1e-12, atol=1e-15)
            q, raw = ours[finite], p[finite]
            order = np.argsort(raw, kind="stable")
            assert np.all(np.diff(q[order]) >= -1e-15)  # monotone in the raw p
            assert np.all(q >= raw - 1e-15) and np.all(q <= 1.0)


def test_corrections_exclude_nan_from_m():
    p = np.array([0.01, np.nan, 0.04, np.nan])
    np.testing.assert_allclose(holm(p)[[0, 2]], [0.02, 0.04])
    np.testing.assert_allclose(benjamini_hochberg(p)[[0, 2]], [0.02, 0.04])
    assert holm([]).size == 0 and np.isnan(holm([np.nan])).all()
    with pytest.raises(ValueError):
        holm([0.5, 1.5])


# --------------------------------------------------------------------------- bootstrap, seeds


def test_bootstrap_ci_is_the_percentile_interval():
    v = np.arange(1001, dtype=float)
    assert bootstrap_ci(v, 0.9) == pytest.approx((50.0, 950.0), rel=1e-12)
    assert bootstrap_ci(np.r_[v, np.nan], 0.9) == bootstrap_ci(v, 0.9)
    assert all(np.isnan(bootstrap_ci(np.array([np.nan]))))


def test_bootstrap_gap_equals_explicit_resampling():
    bins, strata, res = make_cells(300, 4, seed=21)
    kw = dict(n_bins=4, n_strata=3, min_count=5)
    lo, hi, values = bootstrap_gap(bins, strata, res, **kw, n_boot=60, rng=4, level=0.9)
    # replicate k picks Resampler's units: the examples in (bin, stratum) cell order
    order = np.argsort(bins * 3 + strata, kind="stable")
    want = []
    for pick in order[Resampler.draw(np.random.default_rng(4), 300).picks(0, 60)]:
        want.append(gap_statistics(bins[pick], strata[pick], res[pick], **kw).weighted_gap)
    np.testing.assert_allclose(values, want, rtol=1e-12, atol=1e-14)
    assert (lo, hi) == bootstrap_ci(values, 0.9)
    _, _, chunked = bootstrap_gap(bins, strata, res, **kw, n_boot=60, rng=4, chunk_size=7)
    assert np.array_equal(chunked, values)


def test_seed_summary():
    s = seed_summary([0.1, 0.3, 0.2])
    assert s["mean"] == pytest.approx(0.2) and s["sd"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (0.1, 0.3, 3)
    one = seed_summary([0.5])
    assert np.isnan(one["sd"]) and one["mean"] == 0.5 and one["n"] == 1
