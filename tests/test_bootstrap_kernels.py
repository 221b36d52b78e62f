"""The bootstrap's resampling stream and kernels against independent references: the picks
re-derived by a plain Python loop from the documented stream (with forced rejections), exact
uniformity of a pick, the compiled kernel against its numpy and torch twins bit for bit
(chunk sizes, thread counts, the one-byte count fallback), and each bootstrap statistic
against the statistic of the resampled data written out explicitly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from stream_reference import GAMMA, MASK, splitmix

from routeaudit import metrics
from routeaudit.stats import (
    _backend,
    _kernels,
    bootstrap_gap,
    bootstrap_worst_tile_ece,
    cluster_bootstrap_mean,
    gap_statistics,
)
from routeaudit.stats import _bootstrap_kernels as _bk
from routeaudit.stats.bootstrap import Resampler, group_units, resampling_counts


def reference_pick(key: int, key2: int, rep: int, j: int, n: int, bits: int) -> int:
    """Pick j of replicate rep over n units, as the module docstring states it."""
    c = (rep * n + j) & MASK
    m = ((splitmix((key + c * GAMMA) & MASK) >> 32) >> (32 - bits)) * n
    threshold = ((1 << bits) - n) % n
    seed = splitmix((key2 + c * GAMMA) & MASK)
    attempt = 1
    while m & ((1 << bits) - 1) < threshold:
        m = ((splitmix((seed + attempt * GAMMA) & MASK) >> 32) >> (32 - bits)) * n
        attempt += 1
    return m >> bits


def keys(seed: int) -> tuple[int, int]:
    return tuple(int(w) for w in np.random.default_rng(seed).bit_generator.random_raw(2))


@pytest.mark.parametrize("bits", [32, 10])
def test_picks_are_the_documented_stream(monkeypatch, bits):
    """10-bit draws over 700 units reject ~30 % of first draws: the redraw path is exercised."""
    monkeypatch.setattr(_bk, "DRAW_BITS", bits)
    n, rows = 700, 6
    resampler = Resampler.draw(np.random.default_rng(3), n)
    key, key2 = keys(3)
    want = np.array([[reference_pick(key, key2, r, j, n, bits) for j in range(n)]
                     for r in range(rows)])
    assert np.array_equal(resampler.picks(0, rows), want)
    assert np.array_equal(resampler.picks(2, 3), want[2:5])  # a replicate depends on k alone
    counts = np.stack([np.bincount(row, minlength=n) for row in want])
    assert np.array_equal(resampler.counts(0, rows), counts)  # compiled kernel
    monkeypatch.setattr(_kernels, "USE_NUMBA", False)
    assert np.array_equal(resampler.counts(0, rows), counts)  # numpy twin


def test_a_pick_is_exactly_uniform():
    """With 4-bit draws over n = 3 units, 16 mod 3 = 1 raw value must be rejected: without
    the rejection one unit would get 6/16 of the picks instead of 1/3. 60,000 picks tell the
    two apart (χ² of 1/3 each, and the biased law rejected)."""
    n, rows = 3, 20_000
    picks = _bk.picks_numpy(*keys(8), 0, rows, n, bits=4).reshape(-1)
    freq = np.bincount(picks, minlength=n)
    assert sps.chisquare(freq).pvalue > 1e-3
    biased = np.array([6, 5, 5]) / 16  # Lemire without rejection: (u * 3) >> 4 for u < 16
    assert sps.chisquare(np.sort(freq)[::-1], biased * freq.sum()).pvalue < 1e-6


def cells(n, n_bins, seed):
    gen = np.random.default_rng(seed)
    c = gen.uniform(0.35, 1.0, n)
    strata = np.minimum((gen.random(n) * 3).astype(np.int64), 2)
    bins = np.minimum((c - 0.35) / 0.65 * n_bins, n_bins - 1).astype(np.int64)
    return bins, strata, (gen.random(n) < c) - c


@pytest.mark.parametrize("grouped", [False, True])
def test_gap_replicates_are_gaps_of_the_resampled_examples(grouped):
    bins, strata, res = cells(600, 5, seed=2)
    groups = np.repeat(np.arange(200) * 7, 3)[np.random.default_rng(1).permutation(600)] \
        if grouped else None
    kw = dict(n_bins=5, n_strata=3, min_count=4)
    lo, hi, reps = bootstrap_gap(bins, strata, res, **kw, n_boot=40, rng=9, groups=groups,
                                 level=0.8)
    unit, n_units = group_units(groups, 600)
    picks = Resampler.draw(np.random.default_rng(9), n_units).picks(0, 40)
    order = np.argsort(bins * 3 + strata, kind="stable")
    for k in range(40):
        # grouped: every member of every picked group, once per pick; else the units are the
        # examples in (bin, stratum) cell order
        take = (np.concatenate([np.flatnonzero(unit == u) for u in picks[k]]) if grouped
                else order[picks[k]])
        want = gap_statistics(bins[take], strata[take], res[take], **kw).weighted_gap
        assert reps[k] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.1, 0.9])), rel=1e-12)


@pytest.mark.parametrize("grouped", [False, True])
def test_compiled_numpy_torch_chunks_and_threads_give_the_same_bits(monkeypatch, grouped):
    bins, strata, res = cells(900, 6, seed=4)
    groups = np.repeat(np.arange(300), 3) if grouped else None
    kw = dict(n_bins=6, n_strata=3, n_boot=70, rng=5, groups=groups)
    base = bootstrap_gap(bins, strata, res, **kw)[2]
    for chunk in (1, 17):
        assert np.array_equal(bootstrap_gap(bins, strata, res, **kw, chunk_size=chunk)[2], base)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert np.array_equal(bootstrap_gap(bins, strata, res, **kw)[2], base)
    monkeypatch.setattr(_bk, "BYTE_CAP", 2)  # most replicates take the int64 fallback
    assert np.array_equal(bootstrap_gap(bins, strata, res, **kw)[2], base)
    monkeypatch.setattr(_kernels, "USE_NUMBA", False)
    assert np.array_equal(bootstrap_gap(bins, strata, res, **kw, chunk_size=13)[2], base)
    monkeypatch.setattr(_backend, "_TORCH_ON_CPU", True)
    assert np.array_equal(bootstrap_gap(bins, strata, res, **kw, chunk_size=29)[2], base)


def test_torch_twin_redraws_rejected_picks(monkeypatch):
    monkeypatch.setattr(_bk, "DRAW_BITS", 11)  # 1,500 units of 2,048 values: many rejections
    bins, strata, res = cells(1500, 4, seed=6)
    kw = dict(n_bins=4, n_strata=3, n_boot=20, rng=3)
    base = bootstrap_gap(bins, strata, res, **kw)[2]
    monkeypatch.setattr(_backend, "_TORCH_ON_CPU", True)
    assert np.array_equal(bootstrap_gap(bins, strata, res, **kw)[2], base)


def test_cluster_mean_replicates_and_twins(monkeypatch):
    gen = np.random.default_rng(0)
    values = gen.standard_normal(400) + 3.0
    groups = gen.integers(0, 90, 400) * 11  # unequal groups, arbitrary ids
    mean, (lo, hi), reps = cluster_bootstrap_mean(values, n_boot=25, groups=groups, rng=4,
                                                  level=0.8)
    unit, n_units = group_units(groups, 400)
    for k, pick in enumerate(Resampler.draw(np.random.default_rng(4), n_units).picks(0, 25)):
        chosen = np.concatenate([values[unit == u] for u in pick])
        assert reps[k] == pytest.approx(chosen.mean(), rel=1e-12)
    assert mean == pytest.approx(values.mean(), rel=1e-15) and lo < mean < hi
    plain = cluster_bootstrap_mean(values, n_boot=25, rng=4)[2]
    for k, pick in enumerate(Resampler.draw(np.random.default_rng(4), 400).picks(0, 25)):
        assert plain[k] == pytest.approx(values[pick].mean(), rel=1e-12)
    monkeypatch.setattr(_kernels, "USE_NUMBA", False)
    assert np.array_equal(cluster_bootstrap_mean(values, n_boot=25, groups=groups, rng=4)[2], reps)
    assert np.array_equal(cluster_bootstrap_mean(values, n_boot=25, rng=4)[2], plain)


def test_worst_tile_ece_uses_the_same_resamples():
    gen = np.random.default_rng(3)
    n = 500
    preds = np.clip(gen.uniform(0.3, 1.0, (2, n)), 0, 1)
    correct = gen.random(n) < preds[0]
    tiles = gen.integers(0, 3, n)
    observed, reps = bootstrap_worst_tile_ece(preds, correct, tiles, n_boot=8, rng=6)
    assert observed[0] == pytest.approx(max(metrics.ece(preds[0][tiles == t], correct[tiles == t])
                                            for t in range(3)), rel=1e-12)
    counts = resampling_counts(Resampler.draw(np.random.default_rng(6), n), 0, 8)
    for k in range(8):
        take = np.repeat(np.arange(n), counts[k])
        for j in range(2):
            want = max(metrics.ece(preds[j, take][tiles[take] == t], correct[take][tiles[take] == t])
                       for t in range(3))
            assert reps[k, j] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("grouped", [False, True])
def test_worst_tile_kernel_equals_the_numpy_path(monkeypatch, grouped):
    """The compiled cell sums give the numpy bincount path's bits: chunks, threads, groups,
    a tile left empty by some replicates (NaN-free max over the others)."""
    gen = np.random.default_rng(8)
    n = 600
    preds = gen.uniform(0.0, 1.0, (4, n))
    preds[1] = preds[0]  # two probes with identical predictions
    correct = gen.random(n) < preds[0]
    tiles = np.where(np.arange(n) < 3, 2, gen.integers(0, 2, n))  # tile 2: three examples
    groups = gen.integers(0, 150, n) if grouped else None
    kw = dict(n_boot=90, rng=2, groups=groups)
    observed, base = bootstrap_worst_tile_ece(preds, correct, tiles, **kw)
    assert np.isfinite(base).all()
    np.testing.assert_array_equal(base[:, 0], base[:, 1])
    assert np.array_equal(bootstrap_worst_tile_ece(preds, correct, tiles, **kw, chunk_size=7)[1],
                          base)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert np.array_equal(bootstrap_worst_tile_ece(preds, correct, tiles, **kw)[1], base)
    monkeypatch.setattr(_kernels, "USE_NUMBA", False)
    numpy_observed, numpy_reps = bootstrap_worst_tile_ece(preds, correct, tiles, **kw)
    assert np.array_equal(numpy_observed, observed) and np.array_equal(numpy_reps, base)


def test_resampler_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="units"):
        Resampler.draw(1, 0)
    with pytest.raises(ValueError, match="units"):
        Resampler.draw(1, (1 << 32) + 1)


def test_parallel_kernel_leaves_torch_threads_alone():
    """numba's OpenMP layer would resize torch's OpenMP pool when the parallel bootstrap
    starts (seen: 1 -> 2 threads under OMP_NUM_THREADS=1); the work-queue layer does not."""
    import os
    import subprocess
    import sys

    code = ("import torch, numpy as np\n"
            "from routeaudit.stats import bootstrap_gap\n"
            "before = torch.get_num_threads()\n"
            "bootstrap_gap(np.zeros(90, int), np.arange(90) % 3, np.arange(90) / 90.0, n_bins=1,"
            " n_strata=3, n_boot=40, rng=1)\n"
            "import numba\n"
            "print(before, torch.get_num_threads(), numba.threading_layer())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, check=True).stdout.split()
    assert out == ["1", "1", "workqueue"]
