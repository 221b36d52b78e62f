"""Speed of the within-bin permutation test on the audit workload, against what a user
would write without routeaudit.

Workload: N = 10,000 evaluation examples, 15 equal-mass confidence bins x 3 routing tertiles,
10,000 permutations, 5 routing summaries, i.e. 5 tests. Compared, in one run, on one thread:

* ours: ``routeaudit.stats.within_bin_permutation_test``, one call per summary;
* (a) ``scipy.stats.permutation_test`` per cell: SciPy has no strata argument, so a user runs
  one test per (summary, confidence bin), 10,000 resamples each, ``vectorized=True``, with
  the gap between stratum means as the statistic (75 calls; note these are per-cell
  hypotheses, not the aggregated weighted gap);
* (b) a per-permutation numpy loop: for each permutation, ``rng.permutation`` inside every
  bin, then the weighted gap from ``np.bincount``. It is timed on a subset of permutations
  and extrapolated linearly (it is linear in the number of permutations).

A reference row gives the cost of only drawing the random keys and sorting them, the floor
for any engine that draws uniform permutations by sorting random keys.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_permutation.py [--quick]``
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import torch  # noqa: E402
from scipy import stats as sps  # noqa: E402

from routeaudit.stats import (  # noqa: E402
    confidence_bins,
    quantile_strata,
    rng_for,
    within_bin_permutation_test,
)

torch.set_num_threads(1)

N_BINS = 15
N_STRATA = 3
MIN_COUNT = 5


def workload(n: int, n_summaries: int, seed: int = 0):
    """Confidence, correctness and routing summaries of a typical over-confident classifier."""
    gen = np.random.default_rng(seed)
    conf = 0.1 + 0.9 * gen.beta(5.0, 1.5, n)
    correct = (gen.random(n) < np.clip(conf - 0.05, 0, 1)).astype(float)
    bins = confidence_bins(conf, N_BINS, strategy="equal_mass")
    summaries = []
    for k in range(n_summaries):
        rho = 0.2 + 0.15 * k  # from weakly to strongly confidence-correlated summaries
        summaries.append(quantile_strata(rho * conf + (1 - rho) * gen.random(n), N_STRATA))
    return bins, correct - conf, summaries


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_ours(bins, residual, summaries, n_permutations):
    return [
        within_bin_permutation_test(
            bins,
            strata,
            residual,
            n_bins=N_BINS,
            n_strata=N_STRATA,
            min_count=MIN_COUNT,
            n_permutations=n_permutations,
            rng=rng_for("bench", k),
        )
        for k, strata in enumerate(summaries)
    ]


def _stratum_gap(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    means = np.stack([s.mean(axis=axis) for s in samples])
    return means.max(axis=0) - means.min(axis=0)


def run_scipy_per_cell(bins, residual, summaries, n_resamples):
    pvalues = []
    for k, strata in enumerate(summaries):
        gen = rng_for("bench-scipy", k)
        for b in range(N_BINS):
            cells = [residual[(bins == b) & (strata == t)] for t in range(N_STRATA)]
            cells = [c for c in cells if c.size >= MIN_COUNT]
            if len(cells) < 2:
                continue
            res = sps.permutation_test(
                tuple(cells),
                _stratum_gap,
                permutation_type="independent",
                vectorized=True,
                n_resamples=n_resamples,
                alternative="greater",
                rng=gen,
            )
            pvalues.append(res.pvalue)
    return pvalues


def _loop_weighted_gap(bins, strata, residual) -> float:
    cell = bins * N_STRATA + strata
    size = N_BINS * N_STRATA
    counts = np.bincount(cell, minlength=size).reshape(N_BINS, N_STRATA)
    sums = np.bincount(cell, weights=residual, minlength=size).reshape(N_BINS, N_STRATA)
    ok = counts >= MIN_COUNT
    with np.errstate(invalid="ignore", divide="ignore"):
        g = sums / counts
    used = ok.sum(axis=1) >= 2
    delta = np.where(ok, g, -np.inf).max(axis=1) - np.where(ok, g, np.inf).min(axis=1)
    n_b = counts.sum(axis=1)
    return float(np.sum(np.where(used, n_b * delta, 0.0)) / np.sum(np.where(used, n_b, 0)))


def run_numpy_loop(bins, residual, summaries, n_permutations):
    pvalues = []
    members = [np.flatnonzero(bins == b) for b in range(N_BINS)]
    for k, strata in enumerate(summaries):
        gen = rng_for("bench-loop", k)
        observed = _loop_weighted_gap(bins, strata, residual)
        exceed = 0
        for _ in range(n_permutations):
            perm = strata.copy()
            for idx in members:
                perm[idx] = strata[idx][gen.permutation(idx.size)]
            exceed += _loop_weighted_gap(bins, perm, residual) >= observed - 1e-12
        pvalues.append((1 + exceed) / (1 + n_permutations))
    return pvalues


def run_keys_and_sort_only(bins, n_tests, n_permutations, block=13):
    """Draw 32-bit keys for every example and sort them within bins; nothing else."""
    sizes = np.bincount(bins, minlength=N_BINS)
    width = int(sizes.max())
    gen = rng_for("bench-floor")
    for _ in range(n_tests):
        for start in range(0, n_permutations, block):
            rows = min(block, n_permutations - start)
            keys = gen.bit_generator.random_raw((rows, (N_BINS * width + 1) // 2))
            keys = keys.view(np.uint32)[:, : N_BINS * width].reshape(rows, N_BINS, width)
            np.sort(keys, axis=-1)


def machine_info() -> dict[str, object]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats

        simd = [f for f in ("AVX2", "AVX512F", "AVX512_SPR") if feats.get(f)]
    except ImportError:  # private numpy API; informative only
        simd = []
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "numpy_simd": ",".join(simd) or "n/a",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def run(
    n: int = 10_000,
    n_permutations: int = 10_000,
    n_summaries: int = 5,
    loop_permutations: int = 500,
    repeats: int = 3,
) -> list[dict[str, object]]:
    """Time every method on the workload; the ratio column is (method time) / (ours)."""
    bins, residual, summaries = workload(n, n_summaries)
    run_ours(bins, residual, summaries[:1], 10)  # warm-up: imports, allocator
    ours_times = []
    for _ in range(repeats):
        seconds, results = _timed(lambda: run_ours(bins, residual, summaries, n_permutations))
        ours_times.append(seconds)
    ours = float(np.median(ours_times))
    scipy_s, scipy_p = _timed(lambda: run_scipy_per_cell(bins, residual, summaries, n_permutations))
    loop_s, _ = _timed(lambda: run_numpy_loop(bins, residual, summaries, loop_permutations))
    loop_full = loop_s * n_permutations / loop_permutations
    floor_s, _ = _timed(lambda: run_keys_and_sort_only(bins, n_summaries, n_permutations))
    tests = f"{n_summaries} tests x {n_permutations} permutations, N = {n}"
    return [
        {
            "method": "routeaudit within_bin_permutation_test",
            "seconds": ours,
            "per_test_s": ours / n_summaries,
            "ratio_vs_ours": 1.0,
            "note": f"{tests}; median of {repeats} runs (min {min(ours_times):.3f} s); "
            f"p = {', '.join(f'{r.p_value:.4f}' for r in results)}",
        },
        {
            "method": "(a) scipy.stats.permutation_test per cell",
            "seconds": scipy_s,
            "per_test_s": scipy_s / n_summaries,
            "ratio_vs_ours": scipy_s / ours,
            "note": f"{len(scipy_p)} calls (summary x bin), {n_permutations} resamples each; "
            "per-cell hypotheses, not the weighted gap",
        },
        {
            "method": "(b) per-permutation numpy loop",
            "seconds": loop_full,
            "per_test_s": loop_full / n_summaries,
            "ratio_vs_ours": loop_full / ours,
            "note": f"EXTRAPOLATED linearly from {loop_permutations} permutations per summary "
            f"({loop_s:.2f} s measured)",
        },
        {
            "method": "reference: draw keys + sort only",
            "seconds": floor_s,
            "per_test_s": floor_s / n_summaries,
            "ratio_vs_ours": floor_s / ours,
            "note": "floor of any sort-based exact engine; scipy (a) / floor = "
            f"{scipy_s / floor_s:.1f}x",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 permutations, 1 repeat")
    args = parser.parse_args()
    kwargs = dict(n_permutations=2_000, loop_permutations=100, repeats=1) if args.quick else {}
    info = machine_info()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    print(
        f"workload: N = 10,000, {N_BINS} equal-mass bins x {N_STRATA} strata, "
        f"min_count {MIN_COUNT}, 5 routing summaries"
    )
    rows = run(**kwargs)
    width = max(len(r["method"]) for r in rows)
    print(f"\n{'method':<{width}}  {'total s':>9}  {'per test s':>10}  {'x ours':>7}")
    for r in rows:
        print(
            f"{r['method']:<{width}}  {r['seconds']:>9.3f}  {r['per_test_s']:>10.4f}  "
            f"{r['ratio_vs_ours']:>7.2f}   {r['note']}"
        )
    speedup = rows[1]["seconds"] / rows[0]["seconds"]
    print(
        f"\nours vs scipy per cell: {speedup:.1f}x faster (target >= 10x: "
        f"{'met' if speedup >= 10 else 'NOT met'}); vs numpy loop: "
        f"{rows[2]['seconds'] / rows[0]['seconds']:.1f}x"
    )


if __name__ == "__main__":
    main()
