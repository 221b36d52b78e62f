"""The compiled kernels (numba) against independent references: the permutation engine's
stream re-implemented as a plain Python loop, exact permutation p-values by enumeration, a
direct uniformity check of the relabelling, and the numpy twins (the fallback without numba)
bit for bit; the one-pass ECE kernel against the numpy path bit for bit and netcal."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from stream_reference import GAMMA, MASK, splitmix

from routeaudit import metrics
from routeaudit.stats import (
    _backend,
    _kernels,
    bootstrap_gap,
    confidence_bins,
    gap_statistics,
    quantile_strata,
    within_bin_permutation_test,
)
from routeaudit.stats.bootstrap import Resampler, group_units, resampling_counts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not _kernels.available(), reason="numba is not importable")

# --------------------------------------------------------------------------- the stream, by hand



def bounded(key: int, key2: int, word: int, odd: int, rem: int, bits: int) -> int:
    """Lemire's exact bounded integer in [0, rem) at one position, as documented."""
    z = splitmix((key + word * GAMMA) & MASK)
    half = (z & 0xFFFFFFFF) if odd else z >> 32
    m = (half >> (32 - bits)) * rem
    threshold = ((1 << bits) - rem) % rem
    seed = splitmix((key2 + ((2 * word + odd) & MASK) * GAMMA) & MASK)
    attempt = 1
    while m & ((1 << bits) - 1) < threshold:
        z = splitmix((seed + attempt * GAMMA) & MASK)
        m = ((z >> 32) >> (32 - bits)) * rem
        attempt += 1
    return m >> bits


def reference_relabel(bins, strata, n_bins, n_strata, min_count, key, key2, k, bits=32):
    """Permutation k's strata, computed position by position in plain Python."""
    counts = np.bincount(bins * n_strata + strata, minlength=n_bins * n_strata).reshape(n_bins, -1)
    used = [b for b in range(n_bins) if (counts[b] >= min_count).sum() >= 2]
    words = sum(int(counts[b].sum()) // 2 for b in used)
    new = strata.copy()
    offset = 0
    for b in used:
        members = np.flatnonzero(bins == b)
        canonical = members[np.lexsort((members, strata[members]))]  # by stratum, then position
        left = [int(v) for v in counts[b]]
        n = canonical.size
        for i, pos in enumerate(canonical):
            rem = n - i
            r = 0 if rem == 1 else bounded(key, key2, k * words + offset + i // 2, i % 2, rem, bits)
            below = 0
            for t in range(n_strata):  # the label: first t with r < (labels <= t still left)
                below += left[t]
                if r < below:
                    break
            left[t] -= 1
            new[pos] = t
        offset += n // 2
    return new


def cells(n, n_bins, seed, n_strata=3, strategy="equal_mass"):
    gen = np.random.default_rng(seed)
    c = gen.uniform(0.35, 1.0, n)
    strata = quantile_strata(0.8 * c + 0.2 * gen.random(n), n_strata)
    y = (gen.random(n) < c).astype(float)
    return confidence_bins(c, n_bins, strategy=strategy), strata, y - c


@pytest.mark.parametrize(("bits", "n_strata", "stat"), [(32, 3, "weighted_gap"), (6, 3, "max_gap"),
                                                       (32, 2, "weighted_gap"), (6, 4, "weighted_gap")])
def test_engine_is_the_documented_stream(monkeypatch, bits, n_strata, stat):
    """Every T* equals the gap of the relabelling a plain Python loop derives from the same two
    seed words; 6-bit draws send many positions through the rejection redraws."""
    monkeypatch.setattr(_kernels, "DRAW_BITS", bits)
    bins, strata, res = cells(150, 3, seed=3, n_strata=n_strata)  # bins of 50 <= 2**6 examples
    kw = dict(n_bins=3, n_strata=n_strata, min_count=4)
    ours = within_bin_permutation_test(bins, strata, res, **kw, n_permutations=60, rng=11,
                                       statistic=stat)
    key, key2 = (int(w) for w in np.random.default_rng(11).bit_generator.random_raw(2))
    ref = np.array([getattr(gap_statistics(bins, reference_relabel(bins, strata, 3, n_strata, 4, key,
                                                                   key2, k, bits), res, **kw), stat)
                    for k in range(60)])
    np.testing.assert_allclose(ours.null, ref, rtol=1e-12, atol=1e-15)
    observed = getattr(gap_statistics(bins, strata, res, **kw), stat)
    assert ours.exceedances == int(np.sum(ref >= observed - 1e-12 * max(1.0, observed)))


@pytest.mark.parametrize("bits", [32, 3])
def test_relabelling_is_uniform(bits):
    """One bin of 5 with strata (2, 2, 1): each of the 30 arrangements has probability 1/30.
    Residuals 1, 2, 4, 8, 16 make the sums below the boundaries spell out the arrangement;
    3-bit draws reject often (rem up to 5 of 8 values), so the redraw path is checked too."""
    x = np.array([1, 2, 4, 8, 16], dtype=np.int64)
    cum = np.array([[2, 4]], dtype=np.int64)
    rows = 24_000
    le = np.empty((rows, 1, 2), dtype=np.int64)
    args = (np.uint64(12345), np.uint64(678), np.uint64(2), np.zeros(1, np.uint64), 0, rows, bits)
    _kernels.perm_le(x, np.zeros(1, np.int64), np.array([5]), cum, *args, le)
    seen = Counter(zip(le[:, 0, 0].tolist(), le[:, 0, 1].tolist(), strict=True))
    arrangements = set(itertools.permutations([0, 0, 1, 1, 2]))
    expected = {(sum(x[i] for i in range(5) if a[i] == 0), sum(x[i] for i in range(5) if a[i] <= 1))
                for a in arrangements}
    assert set(seen) == expected and len(expected) == 30
    assert sps.chisquare(list(seen.values())).pvalue > 1e-3
    twin = _kernels.perm_le_numpy(x[None], np.array([5]), cum, 12345, 678, 2, np.zeros(1, np.uint64),
                                  0, rows, bits)
    assert np.array_equal(twin, le)


def test_p_value_matches_exact_enumeration():
    """Two bins small enough to enumerate every within-bin relabelling (90 x 30): the exact
    permutation p-value and the exact null law of T, against 20,000 draws of the engine."""
    bins = np.r_[np.zeros(6, int), np.ones(5, int)]
    strata = np.r_[[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2]]
    res = np.array([0.31, -0.52, 0.77, 0.05, -0.2, 0.48, 0.12, -0.61, 0.4, 0.9, -0.33])
    kw = dict(n_bins=2, n_strata=3, min_count=2)
    observed = gap_statistics(bins, strata, res, **kw).weighted_gap
    per_bin = [sorted(set(itertools.permutations(strata[bins == b]))) for b in (0, 1)]
    exact = np.array([gap_statistics(bins, np.r_[a, c], res, **kw).weighted_gap
                      for a in per_bin[0] for c in per_bin[1]])
    assert exact.size == 90 * 30
    p_exact = np.mean(exact >= observed - 1e-12)
    ours = within_bin_permutation_test(bins, strata, res, **kw, n_permutations=20_000, rng=7)
    assert 0.05 < p_exact < 0.95  # an informative comparison
    assert abs(ours.p_value - p_exact) < 4 * math.sqrt(p_exact * (1 - p_exact) / 20_000) + 1e-4
    values, law = np.unique(np.round(exact, 9), return_counts=True)
    drawn = Counter(np.round(ours.null, 9).tolist())
    assert set(drawn) <= set(values.tolist())
    observed_counts = np.array([drawn.get(v, 0) for v in values.tolist()])
    assert sps.chisquare(observed_counts, law / law.sum() * 20_000).pvalue > 1e-3


@pytest.mark.parametrize(("n_strata", "strategy"),
                         [(3, "equal_mass"), (2, "equal_width"), (4, "equal_width")])
def test_compiled_numpy_and_torch_give_the_same_bits(monkeypatch, n_strata, strategy):
    bins, strata, res = cells(700, 7, seed=5, n_strata=n_strata, strategy=strategy)
    kw = dict(n_bins=7, n_strata=n_strata, n_permutations=300, rng=21)
    base = within_bin_permutation_test(bins, strata, res, **kw)
    for chunk in (1, 63, 64, 65, 300):  # lanes of 64: partial and exact groups
        other = within_bin_permutation_test(bins, strata, res, **kw, chunk_size=chunk)
        assert np.array_equal(other.null, base.null) and other.p_value == base.p_value
    monkeypatch.setattr(_kernels, "USE_NUMBA", False)
    twin = within_bin_permutation_test(bins, strata, res, **kw, chunk_size=77)
    assert np.array_equal(twin.null, base.null) and twin.p_value == base.p_value
    assert twin.statistic == base.statistic
    monkeypatch.setattr(_backend, "_TORCH_ON_CPU", True)
    on_torch = within_bin_permutation_test(bins, strata, res, **kw, chunk_size=50)
    assert np.array_equal(on_torch.null, base.null) and on_torch.p_value == base.p_value


@pytest.mark.parametrize("grouped", [False, True])
def test_compiled_bootstrap_is_the_numpy_path_and_resamples_examples(monkeypatch, grouped):
    bins, strata, res = cells(900, 6, seed=9)
    groups = np.repeat(np.arange(300), 3)[np.random.default_rng(2).permutation(900)] if grouped else None
    kw = dict(n_bins=6, n_strata=3, n_boot=120, rng=4, groups=groups)
    lo, hi, reps = bootstrap_gap(bins, strata, res, **kw)
    for chunk in (1, 17):
        assert np.array_equal(bootstrap_gap(bins, strata, res, **kw, chunk_size=chunk)[2], reps,
                              equal_nan=True)
    monkeypatch.setattr(_kernels, "USE_NUMBA", False)
    lo_np, hi_np, reps_np = bootstrap_gap(bins, strata, res, **kw)
    assert np.array_equal(reps_np, reps, equal_nan=True) and (lo, hi) == (lo_np, hi_np)
    # the same draws: units are the groups, or the examples in (bin, stratum) cell order
    unit, n_units = group_units(groups, 900)
    if unit is None:
        unit = np.empty(900, dtype=np.int64)
        unit[np.argsort(bins * 3 + strata, kind="stable")] = np.arange(900)
    counts = resampling_counts(Resampler.draw(np.random.default_rng(4), n_units), 0, 120, unit)
    for k in (0, 57, 119):  # a replicate is the gap of the resampled examples
        take = np.repeat(np.arange(900), counts[k])
        want = gap_statistics(bins[take], strata[take], res[take], n_bins=6, n_strata=3).weighted_gap
        assert reps[k] == pytest.approx(want, rel=1e-12)


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


SAMPLE = """
    import numpy as np
    from routeaudit import metrics
    from routeaudit.stats import bootstrap_gap, within_bin_permutation_test
    gen = np.random.default_rng(0)
    bins, strata, res = gen.integers(0, 4, 400), gen.integers(0, 3, 400), gen.random(400) - 0.5
    r = within_bin_permutation_test(bins, strata, res, n_bins=4, n_strata=3, n_permutations=99, rng=3)
    c = gen.random(100_000).astype(np.float32)
    boot = bootstrap_gap(bins, strata, res, n_bins=4, n_strata=3, n_boot=50, rng=5)[2]
    print(repr(r.p_value), repr(float(r.null.sum())), repr(metrics.ece(c, c < gen.random(100_000))),
          repr(float(boot.sum())))
"""


def test_without_numba_the_numpy_path_gives_the_same_numbers():
    blocked = """
        import sys
        class NoNumba:
            def find_spec(self, name, path=None, target=None):
                if name == "numba" or name.startswith("numba."):
                    raise ImportError("numba is blocked")
        sys.meta_path.insert(0, NoNumba())
    """
    without = _run(textwrap.dedent(blocked) + textwrap.dedent(SAMPLE) + "assert 'numba' not in sys.modules\n")
    assert without == _run(SAMPLE)


def test_no_writable_cache_directory_compiles_per_process():
    """A read-only install with no NUMBA_CACHE_DIR: numba cannot cache, the kernels are
    compiled in the process (with a warning), and the numbers are the same."""
    deny = """
        import warnings
        import numba.core.caching as caching
        def deny(self):
            raise OSError("read-only")
        caching._CacheLocator.ensure_cache_path = deny
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
    """
    body = textwrap.indent(textwrap.dedent(SAMPLE), "    ")
    count = "\nprint(sum('cannot cache' in str(w.message) for w in caught))\n"
    out = _run(textwrap.dedent(deny) + body + count)
    lines = out.strip().splitlines()
    assert int(lines[-1]) == 2  # one warning for the engine's kernels, one for the ECE kernels
    assert lines[0] == _run(SAMPLE).strip()


def test_import_routeaudit_does_not_load_numba():
    out = _run("import sys, routeaudit, routeaudit.stats, routeaudit.metrics\nprint('numba' in sys.modules)")
    assert out.strip() == "False"


# --------------------------------------------------------------------------- ECE


def _sums_both(monkeypatch, conf, correct, **kw):
    monkeypatch.setattr(metrics, "_USE_NUMBA", True)
    fast = metrics._width_bin_sums(conf, correct, **kw)
    monkeypatch.setattr(metrics, "_USE_NUMBA", False)
    slow = metrics._width_bin_sums(conf, correct, **kw)
    monkeypatch.setattr(metrics, "_USE_NUMBA", True)
    return fast, slow


def _data(n, conf_dtype, outcome, seed=0, tiny=0):
    gen = np.random.default_rng(seed)
    c = gen.random(n)
    c[:2000] = np.linspace(0, 1, 16)[gen.integers(0, 16, 2000)]  # values on the edges, 0 and 1
    c[2000 : 2000 + tiny] = gen.random(tiny) * 1e-7  # residuals too fine for the exact fast sums
    c = c.astype(conf_dtype)
    y = gen.random(n) < c
    if outcome != "bool":
        y = y.astype(outcome)
        y[-100:] = gen.random(100)  # fractional outcomes
    return c, y


@pytest.mark.parametrize("conf_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("outcome", ["bool", np.float32, np.float64])
@pytest.mark.parametrize("tiny", [0, 30])
def test_compiled_bin_sums_are_the_numpy_path_bit_for_bit(monkeypatch, conf_dtype, outcome, tiny):
    n = metrics._KERNEL_MIN + 4321
    c, y = _data(n, conf_dtype, outcome, tiny=tiny)
    group = np.random.default_rng(1).integers(0, 3, n)
    for closed in ("right", "left"):
        for kw in (dict(counts=True), dict(counts=False, group=group, n_groups=3)):
            fast, slow = _sums_both(monkeypatch, c, y, n_bins=15, closed=closed, **kw)
            assert np.array_equal(fast[0], slow[0])
            assert (fast[1] is None and slow[1] is None) or np.array_equal(fast[1], slow[1])
    fast, slow = _sums_both(monkeypatch, c, y, n_bins=7, closed="right", counts=False)
    assert np.array_equal(fast[0], slow[0])


def test_compiled_ece_paths_are_taken(monkeypatch):
    """The exact one-pass sums for float32 data, the ordered recount for a few slots, the
    numpy path for float64 data and out-of-range input (which still raises the same error)."""
    n = metrics._KERNEL_MIN + 10
    fast, ordered = metrics._compiled_kernels()
    calls = []

    def counting(*args):
        calls.append(int(args[-1].sum()))
        return ordered(*args)

    monkeypatch.setattr(metrics, "_compiled_kernels", lambda: (fast, counting))
    c, y = _data(n, np.float32, "bool")
    c = np.maximum(c, np.float32(0.01))  # float32 above 2**-12: every sum exact at K = 35
    assert metrics._width_bin_sums_compiled(c, y, 15, "right", False, None, 1) is not None
    assert calls == []
    c, y = _data(n, np.float32, "bool", tiny=20)
    assert metrics._width_bin_sums_compiled(c, y, 15, "right", False, None, 1) is not None
    assert calls == [1]  # only the first bin holds the tiny values
    c64 = np.random.default_rng(2).random(n)
    assert metrics._width_bin_sums_compiled(c64, y, 15, "right", False, None, 1) is None
    bad = c64.copy()
    bad[n - 5] = 1.5
    with pytest.raises(ValueError, match=rf"conf\[{n - 5}\] = 1.5 is outside \[0, 1\]"):
        metrics.ece(bad, y)
    neg_zero = c.copy()
    neg_zero[7] = -0.0  # accepted as 0 by the numpy path
    assert metrics.ece(neg_zero, y) == metrics.ece(np.abs(neg_zero), y)


def test_public_metrics_agree_with_the_numpy_path(monkeypatch):
    n = metrics._KERNEL_MIN * 2
    gen = np.random.default_rng(4)
    c = (0.1 + 0.9 * gen.beta(5, 1.5, n)).astype(np.float32)
    y = gen.random(n) < c - 0.05
    probs = gen.dirichlet(np.ones(4), n // 4)
    labels = gen.integers(0, 4, n // 4)
    summary = gen.random(n)

    def everything():
        return (metrics.ece(c, y), metrics.ece(c, y, norm="l2"), metrics.ece(c, y, norm="max"),
                metrics.ece(c, y, closed="left"), metrics.mce(c, y),
                metrics.classwise_ece(probs, labels), metrics.tile_ece(c, y, summary).tolist())

    got = everything()
    monkeypatch.setattr(metrics, "_USE_NUMBA", False)
    assert got == everything()


def test_large_ece_matches_netcal():
    netcal = pytest.importorskip("netcal.metrics")
    n = metrics._KERNEL_MIN * 3
    gen = np.random.default_rng(8)
    c = np.minimum(0.1 + 0.9 * gen.beta(5, 1.5, n), np.nextafter(1.0, 0.0)).astype(np.float32)
    y = gen.random(n) < c - 0.05
    edges = np.linspace(0.0, 1.0, 16)
    on_edge = np.isin(c.astype(np.float64), edges)
    assert not on_edge.any()  # off the edges, netcal's [lo, hi) bins are ours
    want = float(netcal.ECE(15).measure(c.astype(np.float64), y.astype(np.int64)))
    assert metrics.ece(c, y) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_permutation_null_does_not_depend_on_the_thread_count(monkeypatch):
    """(lane group, bin) pairs run on OMP_NUM_THREADS threads; each is computed by one thread."""
    bins, strata, res = cells(3000, 9, seed=12)
    kw = dict(n_bins=9, n_strata=3, n_permutations=200, rng=8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = within_bin_permutation_test(bins, strata, res, **kw, chunk_size=130)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    two = within_bin_permutation_test(bins, strata, res, **kw, chunk_size=130)
    assert np.array_equal(one.null, two.null) and one.p_value == two.p_value
