"""The CUDA paths give the CPU path's numbers: run where a GPU is present, skipped elsewhere.

On a machine without CUDA the same torch code is checked against the compiled kernels on the
CPU (tests/test_kernels_compiled.py, tests/test_bootstrap_kernels.py); these tests repeat the
comparison on the GPU itself, where the integer sums, the counter-based streams and the
reductions run on another device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routeaudit.calibrators.mlp import fit_many
from routeaudit.stats import (
    bootstrap_gap,
    confidence_bins,
    within_bin_permutation_test,
    within_bin_strata,
)
from routeaudit.stats.bootstrap import Resampler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _workload(n: int, seed: int = 0):
    gen = np.random.default_rng(seed)
    conf = 0.1 + 0.9 * gen.beta(5.0, 1.5, n)
    correct = (gen.random(n) < np.clip(conf - 0.05, 0.0, 1.0)).astype(np.float64)
    bins = confidence_bins(conf, 15, strategy="equal_mass")
    strata = within_bin_strata(bins, 0.5 * conf + 0.5 * gen.random(n), 3)
    return bins, strata, correct - conf


@pytest.mark.parametrize("sequential_h", [None, 20])
@pytest.mark.parametrize("statistic", ["weighted_gap", "max_gap"])
def test_permutation_null_on_cuda_equals_cpu(statistic, sequential_h):
    bins, strata, residual = _workload(20_000)
    kw = dict(n_bins=15, n_strata=3, n_permutations=999, min_count=5, statistic=statistic,
              sequential_h=sequential_h)
    cpu = within_bin_permutation_test(bins, strata, residual, rng=7, **kw)
    gpu = within_bin_permutation_test(bins, strata, residual, rng=7, device="cuda", **kw)
    assert gpu.p_value == cpu.p_value
    assert gpu.n_permutations == cpu.n_permutations
    np.testing.assert_array_equal(gpu.null, cpu.null)


def test_bootstrap_sums_on_cuda_equal_compiled():
    n, rows = 50_000, 64
    gen = np.random.default_rng(3)
    values = gen.integers(-(1 << 20), 1 << 20, n)
    weight = gen.integers(0, 4, n)
    starts = np.unique(np.r_[0, np.sort(gen.integers(1, n, 40)), n])
    unit = np.empty(0, dtype=np.int64)
    r = Resampler.draw(np.random.default_rng(11), n)
    cpu = r.segment_sums(5, rows, unit, values, weight, starts)
    gpu = r.segment_sums(5, rows, unit, values, weight, starts, device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bootstrap_gap_on_cuda_equals_cpu():
    bins, strata, residual = _workload(30_000, seed=2)
    kw = dict(n_bins=15, n_strata=3, min_count=5, n_boot=200)
    cpu = bootstrap_gap(bins, strata, residual, rng=5, **kw)
    gpu = bootstrap_gap(bins, strata, residual, rng=5, device="cuda", **kw)
    assert cpu[:2] == gpu[:2]
    np.testing.assert_array_equal(cpu[2], gpu[2])


@pytest.mark.parametrize("cpu_trainer", ["compiled", "torch"])
def test_mlp_on_cuda_predicts_as_on_cpu(monkeypatch, cpu_trainer):
    """Float reductions differ between devices, so the MLP agrees to rounding, not bit for
    bit, with either CPU trainer (compiled by default; batched torch, the code CUDA runs)."""
    gen = np.random.default_rng(0)
    X = gen.normal(size=(3000, 5))
    y = (gen.random(3000) < 1 / (1 + np.exp(-X[:, 0]))).astype(np.float64)
    params = dict(hidden_layer_sizes=(32, 32), max_epochs=5, patience=5, restarts=2)
    with monkeypatch.context() as mp:
        if cpu_trainer == "torch":
            mp.setattr("routeaudit.stats._kernels.USE_NUMBA", False)
        cpu = fit_many([X], [y], [1], **params)[0]
    gpu = fit_many([X], [y], [1], device="cuda", **params)[0]
    np.testing.assert_allclose(gpu.predict(X), cpu.predict(X), atol=1e-4)
