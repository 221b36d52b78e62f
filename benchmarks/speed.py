"""routeaudit speed benchmarks: one entry point, every figure a median with a ratio to a named baseline.

Sections (all by default; ``--only`` picks some, ``--quick`` shrinks them):

* ``permutation``: the within-bin permutation audit (N = 10k, 15 equal-mass confidence bins x 3
  routing strata, 10,000 permutations, 5 routing summaries) with routeaudit's engine (compiled
  kernels, and their numpy twin that runs without numba), against (a)
  ``scipy.stats.permutation_test`` once per confidence bin and summary and (b) a plain
  per-permutation numpy loop, all at the same number of permutations; the kernels' JIT cost
  (first call with an empty cache, first call in a new process with the cache, warm call).
* ``ece``: ECE15 at N = 1e7 (float32 confidences, bool correctness) against reading the arrays
  once, with the floors of the compiled one-pass kernel; against netcal / relplot /
  torchmetrics (and from logits, and SmoothECE against relplot) at N = 1e6.
* ``nw``: 2-D Nadaraya-Watson, 5-fold CV-NLL over 10 bandwidths at n = 1e4 and 1e5: the default
  binned/FFT path against exact dense float64 evaluation, and the fast path's error.
* ``mlp``: ``fit_many`` (3 seeds x 4 control variants x 3 restarts) against scikit-learn
  ``MLPClassifier`` with the same architecture, trained one network at a time.
* ``bootstrap``: the bootstrap of the matched gap at N = 1e6 against the obvious loop on the
  same resamples, ``scipy.stats.bootstrap``, and the floor of drawing the picks alone.

Every timing is the median of repeated runs on a machine shared with other jobs (the minimum
is printed next to it); routeaudit and its baselines are run in alternating rounds, so a
change of load hits both; CPU-time ratios (``time.process_time``, less sensitive to the
load) are printed next to the wall-time ones that the targets use. Thread pools are pinned to
``OMP_NUM_THREADS`` (default 1) and the count is printed; the numba kernels use that many
threads (the bootstrap; the others are single-threaded).
Each section ends with its target, MET or MISSED.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/speed.py [--only NAME ...] [--quick] [--out FILE]``
(the results file of record is ``benchmarks/results/speed.txt``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import stats as sps

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._output import Tee
from routeaudit import metrics
from routeaudit.calibrators import NadarayaWatson, bandwidth, fit_many, kde
from routeaudit.metrics import ece, smooth_ece
from routeaudit.stats import (
    bootstrap_gap,
    confidence_bins,
    gap_statistics,
    rng_for,
    within_bin_permutation_test,
    within_bin_strata,
)

ROOT = Path(__file__).resolve().parents[1]
Size = Literal["full", "quick", "smoke"]
N_BINS = 15
N_STRATA = 3
MIN_COUNT = 5

# --------------------------------------------------------------------------- timing and reporting


@dataclass(frozen=True)
class Timing:
    """Seconds of repeated runs (wall, and this process's CPU time); ``scale`` turns a measured
    part into the whole (extrapolation)."""

    times: tuple[float, ...]
    scale: float = 1.0
    cpu: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return float(np.median(self.times)) * self.scale

    @property
    def best(self) -> float:
        return float(np.min(self.times)) * self.scale

    @property
    def cpu_median(self) -> float:
        return float(np.median(self.cpu)) * self.scale if self.cpu else float("nan")


def measure(fn: Callable[[], Any], repeats: int) -> tuple[Timing, Any]:
    """Run ``fn`` ``repeats`` times (no warm-up: callers warm up on a small input first)."""
    times, cpu, out = [], [], None
    for _ in range(max(1, repeats)):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return Timing(tuple(times), cpu=tuple(cpu)), out


def measure_interleaved(
    calls: dict[str, tuple[Callable[[], Any], int]],
) -> dict[str, tuple[Timing, Any]]:
    """Time several calls in alternating rounds, ``{label: (fn, repeats)}``.

    Round r runs every call that still has repeats left, so a change in the machine's load
    (it is shared) hits routeaudit and its baselines alike and the ratios stay meaningful.
    """
    times: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    outs: dict[str, Any] = {}
    for r in range(max(max(1, reps) for _, reps in calls.values())):
        for label, (fn, reps) in calls.items():
            if r < max(1, reps):
                start, start_cpu = time.perf_counter(), time.process_time()
                outs[label] = fn()
                times[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
    return {k: (Timing(tuple(times[k]), cpu=tuple(cpu[k])), outs[k]) for k in calls}


@dataclass(frozen=True)
class Row:
    """One timed method of a table."""

    label: str
    timing: Timing
    note: str = ""


@dataclass
class Table:
    """Rows timed on one workload; ``ratio`` is each row's median over the ``ref`` row's."""

    title: str
    ref: str
    rows: list[Row] = field(default_factory=list)

    def add(self, label: str, timing: Timing, note: str = "") -> Timing:
        self.rows.append(Row(label, timing, note))
        return timing

    def get(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def ratio(self, label: str) -> float:
        return self.get(label).timing.median / self.get(self.ref).timing.median

    def cpu_ratio(self, label: str) -> float:
        return self.get(label).timing.cpu_median / self.get(self.ref).timing.cpu_median


@dataclass(frozen=True)
class Target:
    """A speed target of the brief, judged on the measured ratio."""

    what: str
    value: float
    goal: float
    at_least: bool  # the value must be >= goal (a speed-up) or <= goal (a cost ratio)

    @property
    def met(self) -> bool:
        return self.value >= self.goal if self.at_least else self.value <= self.goal

    def __str__(self) -> str:
        sign = ">=" if self.at_least else "<="
        return (
            f"{self.what}: {self.value:.2f}x (target {sign} {self.goal:g}x) {'MET' if self.met else 'MISSED'}"
        )


@dataclass
class Section:
    """What a section measured: tables, targets, and numbers the smoke test checks."""

    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    facts: dict[str, float] = field(default_factory=dict)  # errors, p-values: read by the smoke test
    notes: list[str] = field(default_factory=list)

    def timings(self) -> list[Timing]:
        return [r.timing for t in self.tables for r in t.rows]


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f} ms" if seconds < 1.0 else f"{seconds:9.2f} s "


def print_section(sec: Section) -> None:
    print(f"\n== {sec.name} ({torch.get_num_threads()} thread(s)): {sec.title}")
    for table in sec.tables:
        print(f"\n  {table.title}")
        width = max(len(r.label) for r in table.rows)
        print(f"  {'':{width}}  {'median':>12}  {'min':>12}  {'runs':>4}  {'x ' + table.ref[:28]:>12}  "
              f"{'cpu x':>7}")
        for r in table.rows:
            ratio = table.ratio(r.label)
            print(
                f"  {r.label:<{width}}  {_fmt_s(r.timing.median)}  {_fmt_s(r.timing.best)}  "
                f"{len(r.timing.times):>4}  {ratio:>10.2f}x  {table.cpu_ratio(r.label):>6.2f}x  {r.note}"
            )
    for line in sec.notes:
        print(f"  - {line}")
    for target in sec.targets:
        print(f"  TARGET {target}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- 1. permutation audit

PERM_SIZES: dict[str, dict[str, int]] = {
    "full": dict(n=10_000, n_perm=10_000, n_summaries=5, repeats=3, base_repeats=3),
    "quick": dict(n=10_000, n_perm=1_000, n_summaries=2, repeats=3, base_repeats=1),
    "smoke": dict(n=600, n_perm=40, n_summaries=1, repeats=1, base_repeats=1),
}


def permutation_workload(
    n: int, n_summaries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Over-confident classifier; routing summaries from weakly to strongly confidence-coupled.

    Strata are tertiles of each summary inside each confidence bin (``within_bin_strata``), as
    the audit builds them.
    """
    gen = np.random.default_rng(seed)
    conf = 0.1 + 0.9 * gen.beta(5.0, 1.5, n)
    correct = (gen.random(n) < np.clip(conf - 0.05, 0.0, 1.0)).astype(np.float64)
    bins = confidence_bins(conf, N_BINS, strategy="equal_mass")
    strata = []
    for k in range(n_summaries):
        rho = 0.2 + 0.15 * k
        strata.append(within_bin_strata(bins, rho * conf + (1 - rho) * gen.random(n), N_STRATA))
    return bins, correct - conf, strata


def _ours_tests(bins: np.ndarray, residual: np.ndarray, strata: Sequence[np.ndarray], n_perm: int):
    return [
        within_bin_permutation_test(
            bins,
            s,
            residual,
            n_bins=N_BINS,
            n_strata=N_STRATA,
            min_count=MIN_COUNT,
            n_permutations=n_perm,
            rng=rng_for("speed", k),
        )
        for k, s in enumerate(strata)
    ]


def _stratum_gap(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Δ_b of one bin: the spread of the stratum means (vectorised over resamples)."""
    means = np.stack([s.mean(axis=axis) for s in samples])
    return means.max(axis=0) - means.min(axis=0)


def scipy_per_bin(
    bins: np.ndarray, residual: np.ndarray, strata: Sequence[np.ndarray], n_perm: int
) -> list[float]:
    """One ``scipy.stats.permutation_test`` per (summary, confidence bin): 75 calls at full size.

    SciPy has no strata argument, so a within-bin test is one call per bin, each testing that
    bin's own gap Δ_b (a per-cell hypothesis, not the aggregated weighted gap). The samples are
    the bin's residuals split by routing stratum, and ``permutation_type="independent"``
    reassigns observations to samples at random with the sample sizes kept: exactly the
    within-bin relabelling of strata. ("pairings" would shuffle observations *within* each
    sample, which leaves every stratum mean unchanged; "samples" swaps paired observations
    between samples: neither fits unpaired strata of different sizes.) ``vectorized=True`` with
    the default ``batch=None``, as a user would call it.
    """
    pvalues = []
    for k, s in enumerate(strata):
        gen = rng_for("speed-scipy", k)
        for b in range(N_BINS):
            cells = [residual[(bins == b) & (s == t)] for t in range(N_STRATA)]
            cells = [c for c in cells if c.size >= MIN_COUNT]
            if len(cells) < 2:
                continue
            res = sps.permutation_test(
                tuple(cells),
                _stratum_gap,
                permutation_type="independent",
                vectorized=True,
                n_resamples=n_perm,
                alternative="greater",
                rng=gen,
            )
            pvalues.append(float(res.pvalue))
    return pvalues


def loop_weighted_gap(bins: np.ndarray, strata: np.ndarray, residual: np.ndarray) -> float:
    """The weighted gap of docs/methods.md §2.4 written directly (the loop baseline's statistic)."""
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


def numpy_loop(
    bins: np.ndarray, residual: np.ndarray, strata: Sequence[np.ndarray], n_perm: int
) -> list[float]:
    """Per permutation: ``rng.permutation`` of the strata inside every bin, then the gap again."""
    members = [np.flatnonzero(bins == b) for b in range(N_BINS)]
    pvalues = []
    for k, s in enumerate(strata):
        gen = rng_for("speed-loop", k)
        observed = loop_weighted_gap(bins, s, residual)
        threshold = observed - 1e-12 * max(1.0, abs(observed))
        labels = [s[idx] for idx in members]
        perm = s.copy()
        exceed = 0
        for _ in range(n_perm):  # the baseline: one Python iteration per permutation
            for idx, lab in zip(members, labels, strict=True):
                perm[idx] = lab[gen.permutation(idx.size)]
            exceed += loop_weighted_gap(bins, perm, residual) >= threshold
        pvalues.append((1 + exceed) / (1 + n_perm))
    return pvalues


def keys_and_sort_only(bins: np.ndarray, n_tests: int, n_perm: int) -> None:
    """Draw one 32-bit key per example and sort them inside bins: the floor of a key-sort engine."""
    width = int(np.bincount(bins, minlength=N_BINS).max())
    block = max(1, (1 << 17) // (N_BINS * width))  # routeaudit sorts ~2**17 keys at a time
    gen = rng_for("speed-floor")
    for _ in range(n_tests):
        for start in range(0, n_perm, block):
            rows = min(block, n_perm - start)
            raw = gen.bit_generator.random_raw((rows, (N_BINS * width + 1) // 2))
            keys = raw.view(np.uint32)[:, : N_BINS * width].reshape(rows, N_BINS, width)
            np.sort(keys, axis=-1)


def _twin_tests(bins: np.ndarray, residual: np.ndarray, strata: Sequence[np.ndarray], n_perm: int):
    """The same tests on the numpy twin of the kernels (what runs where numba is missing)."""
    from routeaudit.stats import _kernels

    saved = _kernels.USE_NUMBA
    _kernels.USE_NUMBA = False
    try:
        return _ours_tests(bins, residual, strata, n_perm)
    finally:
        _kernels.USE_NUMBA = saved


def draws_only(bins: np.ndarray, n_tests: int, n_perm: int) -> int:
    """Only the engine's random stream: one SplitMix64 word per two examples and Lemire's
    multiply-shift, 64 permutations side by side, for every used example (the floor of any
    engine that draws one bounded integer per example from this stream)."""
    kernel = _draws_kernel()
    sizes = np.bincount(bins, minlength=N_BINS).astype(np.int64)
    total = 0
    for _ in range(n_tests):
        total += int(kernel(sizes, n_perm))
    return total


_DRAWS: list[Callable[..., Any]] = []


def _draws_kernel() -> Callable[..., Any]:
    if not _DRAWS:
        import numba

        from routeaudit.stats._kernels import _mix

        gamma = np.uint64(0x9E3779B97F4A7C15)

        @numba.njit(cache=False)
        def kernel(sizes: np.ndarray, rows: int) -> np.uint64:
            lanes = 64
            out = np.zeros(lanes, np.uint64)
            words = np.uint64(sizes.sum() // 2)
            for g0 in range(0, rows, lanes):
                off = np.uint64(0)
                for u in range(sizes.size):
                    n = sizes[u]
                    for h in range(n // 2):
                        step = np.uint64(h) * gamma
                        rem0 = np.uint64(n - 2 * h)
                        for lane in range(lanes):
                            z = _mix((np.uint64(g0 + lane) * words + off) * gamma + step)
                            out[lane] += (((z >> np.uint64(32)) * rem0) >> np.uint64(32)) + (
                                ((z & np.uint64(0xFFFFFFFF)) * (rem0 - np.uint64(1))) >> np.uint64(32))
                    off += np.uint64(n // 2)
            return out.sum()

        _DRAWS.append(kernel)
    return _DRAWS[0]


JIT_PROBE = """
import time
t0 = time.perf_counter()
import numba
t1 = time.perf_counter()
import numpy as np
from routeaudit import metrics
from routeaudit.stats import within_bin_permutation_test
gen = np.random.default_rng(0)
b, s, x = gen.integers(0, 4, 400), gen.integers(0, 3, 400), gen.random(400) - 0.5
c = gen.random(1 << 17).astype(np.float32)
y = gen.random(1 << 17) < c
t2 = time.perf_counter()
within_bin_permutation_test(b, s, x, n_bins=4, n_strata=3, n_permutations=64, rng=0)
t3 = time.perf_counter()
within_bin_permutation_test(b, s, x, n_bins=4, n_strata=3, n_permutations=64, rng=0)
t4 = time.perf_counter()
metrics.ece(c, y)
t5 = time.perf_counter()
metrics.ece(c, y)
t6 = time.perf_counter()
print(t1 - t0, t3 - t2, t4 - t3, t5 - t4, t6 - t5)
"""


def jit_costs() -> dict[str, float]:
    """First call of the compiled kernels with an empty cache (compiling, then writing the
    cache), in a new process that finds the cache (loading it), and warm; seconds."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        runs = []
        for _ in range(2):  # empty cache, then a new process with the cache written by the first
            done = subprocess.run([sys.executable, "-c", JIT_PROBE], capture_output=True, text=True,
                                  env=env, cwd=ROOT, timeout=600, check=True)
            runs.append([float(v) for v in done.stdout.split()])
    (imp, perm_cold, perm_warm, ece_cold, ece_warm), cached = runs
    return {"import_numba": imp, "perm_compile": perm_cold, "perm_cached": cached[1], "perm_warm": perm_warm,
            "ece_compile": ece_cold, "ece_cached": cached[3], "ece_warm": ece_warm}


def bench_permutation(size: Size = "full") -> Section:
    cfg = PERM_SIZES[size]
    n, n_perm, n_sum = cfg["n"], cfg["n_perm"], cfg["n_summaries"]
    bins, residual, strata = permutation_workload(n, n_sum)
    sec = Section(
        "permutation",
        f"within-bin permutation audit, N = {n:,}, {N_BINS} equal-mass bins x {N_STRATA} "
        f"within-bin tertiles, B = {n_perm:,} permutations, {n_sum} routing summaries",
    )
    jit = jit_costs() if size != "smoke" else None  # before anything is compiled here
    # warm-up: imports, allocator, scipy's code paths, the kernels (from numba's cache)
    _ours_tests(bins, residual, strata[:1], 20)
    _twin_tests(bins, residual, strata[:1], 20)
    scipy_per_bin(bins, residual, strata[:1], 20)
    draws_only(bins, 1, 64)
    table = Table(f"{n_sum} tests, each at B = {n_perm:,} (times are for all {n_sum})", "routeaudit")
    timed = measure_interleaved(
        {
            "ours": (lambda: _ours_tests(bins, residual, strata, n_perm), cfg["repeats"]),
            "twin": (lambda: _twin_tests(bins, residual, strata, n_perm), cfg["base_repeats"]),
            "scipy": (lambda: scipy_per_bin(bins, residual, strata, n_perm), cfg["base_repeats"]),
            "loop": (lambda: numpy_loop(bins, residual, strata, n_perm), cfg["base_repeats"]),
            "draws": (lambda: draws_only(bins, n_sum, n_perm), cfg["repeats"]),
            "sort": (lambda: keys_and_sort_only(bins, n_sum, n_perm), cfg["base_repeats"]),
        }
    )
    (t_ours, results), (t_twin, twin) = timed["ours"], timed["twin"]
    (t_sc, sc_p), (t_loop, loop_p) = timed["scipy"], timed["loop"]
    table.add("routeaudit", t_ours, "within_bin_permutation_test, one call per summary (numba kernels)")
    table.add("routeaudit, numpy twin", t_twin, "the same numbers without numba (the fallback)")
    table.add("(a) scipy per bin", t_sc, f"{len(sc_p)} permutation_test calls (summary x bin)")
    table.add("(b) numpy loop", t_loop, "measured at the same B, not extrapolated")
    table.add("floor: the draws alone", timed["draws"][0],
              "one bounded integer per example from the engine's stream, nothing else")
    table.add("earlier engine's floor", timed["sort"][0],
              "one 32-bit key per example, sorted inside bins (what the key-sort engine could not beat)")
    batch_gain = _scipy_batch_gain(bins, residual, strata[0], n_perm)
    sec.tables.append(table)

    wg = [gap_statistics(bins, s, residual, n_bins=N_BINS, n_strata=N_STRATA).weighted_gap for s in strata]
    loop_wg = [loop_weighted_gap(bins, s, residual) for s in strata]
    sec.facts["max_wg_diff_loop"] = float(np.max(np.abs(np.subtract(wg, loop_wg))))
    sec.facts["max_p_diff_loop"] = float(np.max(np.abs([r.p_value for r in results] - np.asarray(loop_p))))
    sec.facts["twin_identical"] = float(all(np.array_equal(a.null, b.null) and a.p_value == b.p_value
                                            for a, b in zip(results, twin, strict=True)))
    per_test = t_ours.median / n_sum
    sec.notes += [
        f"per test: routeaudit {per_test:.3f} s = {per_test / n_perm * 1e6:.1f} us per permutation = "
        f"{per_test / n_perm / n * 1e9:.2f} ns per example and permutation; numpy twin "
        f"{t_twin.median / n_sum:.3f} s; scipy {t_sc.median / n_sum:.3f} s; "
        f"loop {t_loop.median / n_sum:.3f} s",
        "p (routeaudit) = "
        + ", ".join(f"{r.p_value:.4f}" for r in results)
        + "; p (loop, same statistic, own stream) = "
        + ", ".join(f"{p:.4f}" for p in loop_p),
        "numpy twin: null distributions and p-values "
        + ("bit-identical to the compiled kernels'" if sec.facts["twin_identical"] else "DIFFER (a bug)"),
        f"observed WG equal in routeaudit and the loop to {sec.facts['max_wg_diff_loop']:.1e}; "
        "scipy's per-bin p-values test per-cell hypotheses, so they are not comparable",
        f"the draws alone take {table.ratio('floor: the draws alone'):.2f} of routeaudit's time: the rest is "
        "the branch-free label assignment (S - 1 compares and adds per example) and the statistic",
    ]
    if jit is not None:
        sec.notes.append(
            f"JIT (numba, cache=True): importing numba {jit['import_numba']:.2f} s; first call compiling "
            f"with an empty cache {jit['perm_compile']:.2f} s (permutation kernels), "
            f"{jit['ece_compile']:.2f} s (ECE kernels, one dtype pair); first call in a new process with "
            f"the cache {jit['perm_cached']:.2f} s / {jit['ece_cached']:.2f} s; warm call "
            f"{jit['perm_warm'] * 1e3:.1f} ms / {jit['ece_warm'] * 1e3:.1f} ms (small inputs). Paid once "
            "per machine and version: the cache lives next to the modules (__pycache__) or in "
            "NUMBA_CACHE_DIR"
        )
    sec.notes.append(
        f"scipy with batch=500 instead of the default batch=None is {batch_gain:.2f}x as fast on one "
        f"bin (cache-sized resample blocks); the default is what is timed above"
    )
    sec.targets.append(Target("scipy per bin / routeaudit", table.ratio("(a) scipy per bin"), 20.0, True))
    return sec


def _scipy_batch_gain(bins: np.ndarray, residual: np.ndarray, strata: np.ndarray, n_perm: int) -> float:
    """Time of one bin's scipy test with the default batch over that with batch=500 (medians of 3)."""
    b = int(np.bincount(bins).argmax())
    cells = tuple(residual[(bins == b) & (strata == t)] for t in range(N_STRATA))

    def call(batch: int | None) -> Callable[[], Any]:
        return lambda: sps.permutation_test(
            cells,
            _stratum_gap,
            permutation_type="independent",
            vectorized=True,
            n_resamples=n_perm,
            alternative="greater",
            rng=np.random.default_rng(0),
            batch=batch,
        )

    timed = measure_interleaved({"default": (call(None), 3), "500": (call(500), 3)})
    return timed["default"][0].median / timed["500"][0].median


# --------------------------------------------------------------------------- 2. ECE15

ECE_SIZES: dict[str, dict[str, int]] = {
    "full": dict(n=10_000_000, n_lib=1_000_000, repeats=7, lib_repeats=3),
    "quick": dict(n=10_000_000, n_lib=1_000_000, repeats=3, lib_repeats=1),
    "smoke": dict(n=20_000, n_lib=5_000, repeats=1, lib_repeats=1),
}


def ece_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 confidences of an over-confident classifier (never exactly 1.0) and bool correctness.

    No value equals a bin edge or 1.0, so every library bins them alike and the values agree.
    """
    gen = np.random.default_rng(seed)
    conf = (0.1 + 0.9 * gen.beta(5.0, 1.5, n)).astype(np.float32)
    conf = np.minimum(conf, np.nextafter(np.float32(1.0), np.float32(0.0)))
    return conf, gen.random(n) < conf - 0.05


def _library_ece_rows(conf: np.ndarray, correct: np.ndarray) -> list[tuple[str, Callable[[], float]]]:
    """(label, call) of every installed library's ECE15 on the same (conf, correct)."""
    rows: list[tuple[str, Callable[[], float]]] = []
    conf64, y_int, y_f = conf.astype(np.float64), correct.astype(np.int64), correct.astype(np.float64)
    try:
        from netcal.metrics import ECE

        rows.append(("netcal ECE(15).measure", lambda: float(ECE(N_BINS).measure(conf64, y_int))))
    except ImportError:
        pass
    try:
        from relplot.metrics import binnedECE

        rows.append(("relplot binnedECE(15)", lambda: float(binnedECE(conf64, y_f, N_BINS))))
    except ImportError:
        pass
    try:
        from torchmetrics.functional.classification import binary_calibration_error

        tc, ty = torch.from_numpy(conf), torch.from_numpy(y_int)
        rows.append(
            ("torchmetrics binary_calibration_error", lambda: float(binary_calibration_error(tc, ty, N_BINS)))
        )
    except ImportError:
        pass
    return rows


_ECE_FLOORS: list[Callable[..., Any]] = []


def _ece_floor_kernels() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The two halves of ``metrics._fast_width_sums`` on their own (same loops): the
    vectorised per-example pass (bin, residual, exactness test; no accumulation) and the
    8-copy scatter of (slot, residual) pairs, run here on one L1-resident block."""
    if not _ECE_FLOORS:
        import math

        import numba

        block = metrics._BLOCK

        @numba.njit(cache=False)
        def pass_only(conf, correct, scale, step, two_k):
            slot = np.empty(block, np.int64)
            rr = np.empty(block)
            n_inexact = 0
            for start in range(0, conf.size, block):
                m = min(block, conf.size - start)
                c = conf[start : start + m]
                y = correct[start : start + m]
                for j in range(m):
                    cv = np.float64(c[j])
                    fx = math.floor(cv * scale)
                    slot[j] = max(np.int64(fx) - np.int64(cv <= fx * step), 0)
                    r = cv - np.float64(y[j])
                    rr[j] = r
                    t = r * two_k
                    n_inexact += t != math.floor(t)
            return n_inexact + slot[0] + rr[0]

        @numba.njit(cache=False)
        def scatter_only(slot, rr, reps, size):
            acc = np.zeros(8 * size)
            for _ in range(reps):
                for j in range(0, slot.size, 8):
                    acc[slot[j]] += rr[j]
                    acc[size + slot[j + 1]] += rr[j + 1]
                    acc[2 * size + slot[j + 2]] += rr[j + 2]
                    acc[3 * size + slot[j + 3]] += rr[j + 3]
                    acc[4 * size + slot[j + 4]] += rr[j + 4]
                    acc[5 * size + slot[j + 5]] += rr[j + 5]
                    acc[6 * size + slot[j + 6]] += rr[j + 6]
                    acc[7 * size + slot[j + 7]] += rr[j + 7]
            return acc

        _ECE_FLOORS.extend([pass_only, scatter_only])
    return _ECE_FLOORS[0], _ECE_FLOORS[1]


def _numpy_path_ece(conf: np.ndarray, correct: np.ndarray) -> float:
    saved = metrics._USE_NUMBA
    metrics._USE_NUMBA = False
    try:
        return ece(conf, correct)
    finally:
        metrics._USE_NUMBA = saved


def bench_ece(size: Size = "full") -> Section:
    cfg = ECE_SIZES[size]
    n, reps = cfg["n"], cfg["repeats"]
    conf, correct = ece_data(n)
    conf64 = conf.astype(np.float64)
    # the same confidences with full float64 mantissas (sums no longer exact in any order)
    noise = np.random.default_rng(3).uniform(-1.0, 1.0, n) * 2.0**-40
    full64 = np.clip(conf64 + noise, 0.0, 1.0)
    sec = Section("ece", f"ECE15 ((lo, hi] bins), N = {n:.0e} float32 confidences + bool correctness")
    warm = min(n, 1 << 17)  # warm-up: loads (or compiles) each dtype's kernels
    for c in (conf, conf64, full64):
        ece(c[:warm], correct[:warm])
    main = Table(f"N = {n:.0e}", "read once")
    buf_c, buf_y = np.empty_like(conf), np.empty_like(correct)
    idx = np.minimum((conf64 * N_BINS).astype(np.intp), N_BINS - 1)
    resid = conf64 - correct
    pass_only, scatter_only = _ece_floor_kernels()
    scale, step, _ = metrics._width_plan(N_BINS)
    two_k = 2.0 ** (52 - n.bit_length())
    block = metrics._BLOCK
    slot_block = np.minimum((conf64[:block] * N_BINS).astype(np.int64), N_BINS - 1)
    resid_block = resid[:block].copy()
    reps_block = max(1, n // block)
    pass_only(conf[:block], correct[:block], scale, step, two_k)
    scatter_only(slot_block, resid_block, 1, N_BINS + 1)
    timed = measure_interleaved(
        {
            "read": (lambda: (conf.sum(), correct.sum()), reps),
            "copy": (lambda: (np.copyto(buf_c, conf), np.copyto(buf_y, correct)), reps),
            "f32": (lambda: ece(conf, correct), reps),
            "f64": (lambda: ece(conf64, correct), reps),
            "full64": (lambda: ece(full64, correct), reps),
            "numpy": (lambda: _numpy_path_ece(conf, correct), reps),
            "pass": (lambda: pass_only(conf, correct, scale, step, two_k), reps),
            "scatter": (lambda: scatter_only(slot_block, resid_block, reps_block, N_BINS + 1), reps),
            "bincount": (lambda: np.bincount(idx, resid, N_BINS), reps),
        }
    )
    value, value64, value_np = timed["f32"][1], timed["f64"][1], timed["numpy"][1]
    main.add("read once", timed["read"][0], "conf.sum() + correct.sum()")
    main.add(
        "copy once", timed["copy"][0], "np.copyto of both arrays into preallocated buffers (read + write)"
    )
    main.add("routeaudit ece (float32 conf)", timed["f32"][0], f"value {value:.10f} (compiled, one pass)")
    main.add("routeaudit ece (float64 conf)", timed["f64"][0],
             f"value {value64:.10f} (the float32 values as float64: one pass too)")
    main.add("routeaudit ece (full float64)", timed["full64"][0],
             f"value {timed['full64'][1]:.10f} (conf + 2**-40 noise: the numpy path's order is needed)")
    main.add("routeaudit ece, numpy path", timed["numpy"][0],
             f"value {value_np:.10f} (float32; what runs without numba)")
    main.add("floor: the kernel's pass alone", timed["pass"][0],
             "bin, residual and exactness test per example, no accumulation")
    main.add("floor: the kernel's scatter alone", timed["scatter"][0],
             f"{reps_block * block:.1e} adds into 8 copies of the bin sums, data in L1")
    main.add(
        "floor: np.bincount alone",
        timed["bincount"][0],
        "the weighted scatter-add on precomputed int64 bins and float64 residuals",
    )
    sec.tables.append(main)
    sec.facts["ece_value"] = value
    sec.facts["ece_compiled_equals_numpy"] = float(value == value_np and value == value64)

    n_lib = cfg["n_lib"]
    c_lib, y_lib = conf[:n_lib], correct[:n_lib]
    libs = Table(f"N = {n_lib:.0e}, against the libraries", "routeaudit ece")
    t, ours = measure(lambda: ece(c_lib, y_lib), reps)
    libs.add("routeaudit ece", t, f"value {ours:.10f}")
    for label, call in _library_ece_rows(c_lib, y_lib):
        call()  # warm-up (imports, torch dispatch)
        t, v = measure(call, cfg["lib_repeats"])
        libs.add(label, t, f"value {v:.10f} (diff {v - ours:+.1e})")
        sec.facts["max_lib_diff"] = max(sec.facts.get("max_lib_diff", 0.0), abs(v - ours))
    sec.tables.append(libs)

    # from logits: the softmax over K classes dominates, so it is timed at n_lib, not at N
    k = 10
    gen = np.random.default_rng(1)
    logits = (gen.normal(size=(n_lib, k)) * 2.0).astype(np.float32)
    labels = gen.integers(0, k, n_lib)
    from routeaudit.metrics import confidence_and_correct

    logit_tab = Table(f"N = {n_lib:.0e} x K = {k} float32 logits", "routeaudit")
    ece(*confidence_and_correct(logits[:warm], labels[:warm]))  # warm-up: float64 pair's kernels
    t, v_log = measure(lambda: ece(*confidence_and_correct(logits, labels)), cfg["lib_repeats"])
    logit_tab.add("routeaudit", t, f"confidence_and_correct + ece, value {v_log:.10f}")
    try:
        from torchmetrics.functional.classification import multiclass_calibration_error

        tl, tlab = torch.from_numpy(logits), torch.from_numpy(labels)

        def tm_logits() -> float:
            return float(multiclass_calibration_error(tl, tlab, num_classes=k, n_bins=N_BINS))

        tm_logits()
        t, v = measure(tm_logits, cfg["lib_repeats"])
        logit_tab.add(
            "torchmetrics multiclass_calibration_error", t, f"value {v:.10f} (float32 accumulation)"
        )
    except ImportError:
        pass
    sec.tables.append(logit_tab)

    smooth = Table(f"SmoothECE, N = {n_lib:.0e}", "routeaudit smooth_ece")
    t, v_s = measure(lambda: smooth_ece(c_lib, y_lib), cfg["lib_repeats"])
    smooth.add("routeaudit smooth_ece", t, f"value {v_s:.10f}")
    try:
        import relplot

        yf = y_lib.astype(np.float64)
        t, v = measure(lambda: float(relplot.smECE(c_lib.astype(np.float64), yf)), cfg["lib_repeats"])
        smooth.add("relplot smECE", t, f"value {v:.10f}")
    except ImportError:
        pass
    sec.tables.append(smooth)

    ratio = main.ratio("routeaudit ece (float32 conf)")
    t32 = main.get("routeaudit ece (float32 conf)").timing.median
    vs_copy = t32 / main.get("copy once").timing.median
    sec.notes.append(f"float32 ECE / copy once = {vs_copy:.2f}; {n / t32 / 1e6:.0f} M values/s; CPU-time "
                     f"ratio to read once {main.cpu_ratio('routeaudit ece (float32 conf)'):.2f}")
    sec.notes.append(
        "compiled and numpy paths give the same bits: "
        + ("yes" if sec.facts["ece_compiled_equals_numpy"] else "NO (a bug)")
        + "; the one-pass kernel sums in any order only where every partial sum is exact "
        "(residuals multiples of 2**-K, n * 2**(K+1) <= 2**53), else it follows the numpy order"
    )
    f_pass = main.ratio("floor: the kernel's pass alone")
    scatter = main.get("floor: the kernel's scatter alone").timing
    read = main.get("read once").timing
    sec.notes.append(
        f"floors of the one-pass kernel: its per-example pass alone (read, bin, residual, exactness "
        f"test) {f_pass:.2f}x read once; its histogram scatter alone (data already in L1, "
        f"{scatter.median / n * 1e9:.2f} ns per example) {scatter.median / read.median:.2f}x (min/min "
        f"{scatter.best / read.best:.2f}x). The kernel overlaps the two; the scatter (a dependent "
        "load-add-store into 16 bin sums per example) is what no one-pass ECE avoids"
    )
    sec.targets.append(Target("ECE15 float32 / read once", ratio, 2.0, False))
    return sec


# --------------------------------------------------------------------------- 3. Nadaraya-Watson CV

NW_GRID = tuple(float(k) for k in np.geomspace(0.25, 4.0, 10))
# above ``exact_max`` points the exact evaluation is extrapolated from ``sub`` held-out points
NW_SIZES: dict[str, dict[str, Any]] = {
    "full": dict(
        sizes=(10_000, 100_000), grid=NW_GRID, repeats=5, exact_repeats=2, sub=500, exact_max=20_000
    ),
    "quick": dict(sizes=(10_000,), grid=NW_GRID, repeats=3, exact_repeats=1, sub=500, exact_max=20_000),
    "smoke": dict(
        sizes=(400, 1_500), grid=NW_GRID[::4], repeats=1, exact_repeats=1, sub=100, exact_max=1_000
    ),
}


def nw_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Skewed confidence and a bounded depth-variance-like feature with a mild routing signal."""
    rng = np.random.default_rng(seed)
    c = rng.beta(5.0, 1.5, n) * 0.9 + 0.1
    v = 0.05 + 0.1 * rng.random(n) ** 2 + 0.05 * (1 - c) * rng.random(n)
    p = np.clip(c - 0.3 * (v - 0.1), 0.0, 1.0)
    return np.column_stack([c, v]), (rng.random(n) < p).astype(np.float64)


def _cv_folds(n: int) -> list[np.ndarray]:
    """The folds ``cv_nll_scores`` draws (random_state 0)."""
    perm = np.random.default_rng(0).permutation(n)
    return [np.sort(f) for f in np.array_split(perm, 5)]


def per_fold_predictions(X: np.ndarray, y: np.ndarray, grid: Sequence[float], method: str) -> np.ndarray:
    """Held-out predictions [len(grid), n] of ``NadarayaWatson(bandwidth=κ, method=...)`` per fold.

    With ``method="exact"`` this is the naive exact CV: one dense evaluation per (fold, κ).
    """
    preds = np.empty((len(grid), len(y)))
    for f in _cv_folds(len(y)):
        tr = np.setdiff1d(np.arange(len(y)), f)
        for k, kappa in enumerate(grid):
            est = NadarayaWatson(bandwidth=kappa, method=method).fit(X[tr], y[tr])
            preds[k, f] = est.predict(X[f])
    return preds


def _exact_fold_subsample(X: np.ndarray, y: np.ndarray, grid: Sequence[float], m: int):
    """Exact predictions of fold 0's held-out points [:m] for every κ, as ``cv_nll_scores`` does."""
    folds = _cv_folds(len(y))
    tr = np.setdiff1d(np.arange(len(y)), folds[0])
    model = bandwidth._fallback_model(X[tr], y[tr], X.shape[1], True, "cpu")
    q = X[folds[0][:m]]
    return tr, q, kde._exact_predict(model, q, list(grid))


def bench_nw(size: Size = "full") -> Section:
    cfg = NW_SIZES[size]
    grid = cfg["grid"]
    sec = Section(
        "nw",
        f"NW 2-D (confidence, depth variance), 5-fold CV-NLL over {len(grid)} Scott multipliers "
        f"({grid[0]:g}..{grid[-1]:g}); fast = cv_nll_scores(method='binned'), the default",
    )
    warm_X, warm_y = nw_data(300, seed=9)
    bandwidth.cv_nll_scores(warm_X, warm_y, grid)
    bandwidth.cv_nll_scores(warm_X, warm_y, grid, method="exact")
    for n in cfg["sizes"]:
        X, y = nw_data(n)
        table = Table(f"n = {n:,}", "routeaudit fast")
        m = min(cfg["sub"], n // 5)
        full_exact = n <= cfg["exact_max"]
        calls: dict[str, tuple[Callable[[], Any], int]] = {
            "fast": (lambda X=X, y=y: bandwidth.cv_nll_scores(X, y, grid), cfg["repeats"]),
            "sub": (lambda X=X, y=y, m=m: _exact_fold_subsample(X, y, grid, m), cfg["exact_repeats"] + 1),
        }
        if full_exact:
            calls["exact"] = (
                lambda X=X, y=y: bandwidth.cv_nll_scores(X, y, grid, method="exact"),
                cfg["exact_repeats"],
            )
            calls["naive"] = (lambda X=X, y=y: per_fold_predictions(X, y, grid, "exact"), 1)
        timed = measure_interleaved(calls)
        t_fast, fast = timed["fast"]
        table.add("routeaudit fast", t_fast, "binned grid + FFT, exact re-evaluation where flagged")
        t_sub, (tr, q, p_sub) = timed["sub"]
        predicted = Timing(t_sub.times, scale=n / m, cpu=t_sub.cpu)
        if full_exact:
            t_exact, exact = timed["exact"]
            table.add(
                "(a) exact per fold",
                t_exact,
                "cv_nll_scores(method='exact'): dense float64, one distance matrix per fold for all κ",
            )
            t_naive, naive = timed["naive"]
            table.add("(b) exact per (fold, κ)", t_naive, "NadarayaWatson(method='exact') refit for each")
            binned = per_fold_predictions(X, y, grid, "binned")
            sec.facts[f"max_abs_dp_{n}"] = float(np.max(np.abs(binned - naive)))
            sec.facts[f"mean_abs_dp_{n}"] = float(np.mean(np.abs(binned - naive)))
            sec.facts[f"max_nll_diff_{n}"] = float(np.max(np.abs(fast - exact)))
            sec.notes.append(
                f"n = {n:,}: max |p_fast - p_exact| = {sec.facts[f'max_abs_dp_{n}']:.1e} (mean "
                f"{sec.facts[f'mean_abs_dp_{n}']:.1e}) over {naive.size:,} held-out predictions (per-fold "
                f"binned vs exact fits); max |CV-NLL fast - exact| = {sec.facts[f'max_nll_diff_{n}']:.1e}; "
                f"chosen κ {grid[int(np.argmin(fast))]:.3g} (fast) vs "
                f"{grid[int(np.argmin(exact))]:.3g} (exact); "
                f"exact time predicted from {m} held-out points: {predicted.median:.2f} s vs "
                f"{t_exact.median:.2f} s measured"
            )
            if n == cfg["sizes"][0]:
                for label in ("(a) exact per fold", "(b) exact per (fold, κ)"):
                    sec.targets.append(Target(f"{label} / fast at n = {n:,}", table.ratio(label), 20.0, True))
        else:
            table.add(
                "(a) exact per fold",
                predicted,
                f"EXTRAPOLATED: fold 0 with {m} of its {n // 5:,} held-out points, x {n / m:.0f}",
            )
            fast_sub = np.stack(
                [NadarayaWatson(bandwidth=kappa).fit(X[tr], y[tr]).predict(q) for kappa in grid]
            )
            sec.facts[f"max_abs_dp_{n}"] = float(np.max(np.abs(fast_sub - p_sub)))
            sec.notes.append(
                f"n = {n:,}: max |p_fast - p_exact| = {sec.facts[f'max_abs_dp_{n}']:.1e} on the {m} "
                f"subsample points x {len(grid)} κ (fold-0 binned fits vs exact); exact cost is linear in "
                "the number of held-out points, which the n = 1e4 line checks"
            )
        sec.tables.append(table)
    return sec


# --------------------------------------------------------------------------- 4. batched MLP

MLP_SIZES: dict[str, dict[str, Any]] = {
    "full": dict(n=10_000, seeds=(0, 1, 2), restarts=3, max_epochs=200, fixed_epochs=20, repeats=3),
    "quick": dict(n=5_000, seeds=(0, 1, 2), restarts=3, max_epochs=200, fixed_epochs=10, repeats=1),
    "smoke": dict(n=400, seeds=(0,), restarts=1, max_epochs=3, fixed_epochs=2, repeats=1),
}


def mlp_problem(n: int, seed: int, n_layers: int = 8) -> tuple[list[np.ndarray], np.ndarray]:
    """The four control variants of one seed: candidate, zeros twin, within-bin and global shuffles."""
    rng = np.random.default_rng(seed)
    c = rng.beta(4.0, 1.5, n) * 0.9 + 0.1
    H = -0.8 * (c[:, None] - c.mean()) / c.std() + 0.6 * rng.normal(size=(n, n_layers))
    y = (rng.random(n) < np.clip(c**1.3, 0, 1)).astype(np.float64)
    X = np.column_stack([c, H])
    zeros = X.copy()
    zeros[:, 1:] = 0.0
    within = X.copy()
    for chunk in np.array_split(np.argsort(c), N_BINS):  # shuffle profiles inside confidence bins
        within[chunk, 1:] = X[rng.permutation(chunk), 1:]
    shuffled = X.copy()
    shuffled[:, 1:] = X[rng.permutation(n), 1:]
    return [X, zeros, within, shuffled], y


def _sklearn_fit_all(
    Xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    seeds: Sequence[int],
    restarts: int,
    max_epochs: int,
    fixed: int | None = None,
) -> int:
    """One ``MLPClassifier`` per (model, restart), trained one by one; returns the epochs run.

    Same architecture and optimiser as fit_many: (64, 64) ReLU, Adam lr 1e-3, minibatches of
    256, L2 1e-4, the same epoch cap; early stopping on a 20% validation split with patience
    10 and ``tol=0`` (fit_many stops after 10 epochs without a strict improvement). With
    ``fixed`` every network runs exactly that many epochs on 80% of the rows instead.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    epochs = 0
    for X, y, s in zip(Xs, ys, seeds, strict=True):
        Z = StandardScaler().fit_transform(X)
        if fixed is not None:  # as many training rows as fit_many trains on
            keep = np.random.default_rng(s).permutation(len(y))[round(0.2 * len(y)) :]
            Z, y = Z[keep], y[keep]
        for r in range(restarts):
            common: dict[str, Any] = dict(
                hidden_layer_sizes=(64, 64),
                activation="relu",
                solver="adam",
                learning_rate_init=1e-3,
                alpha=1e-4,
                batch_size=256,
                tol=0.0,
                random_state=1000 * s + r,
            )
            if fixed is None:
                clf = MLPClassifier(
                    **common,
                    max_iter=max_epochs,
                    early_stopping=True,
                    validation_fraction=0.2,
                    n_iter_no_change=10,
                )
            else:
                clf = MLPClassifier(
                    **common, max_iter=fixed, early_stopping=False, n_iter_no_change=fixed + 1
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(Z, y)
            epochs += int(clf.n_iter_)
    return epochs


def _mlp_gemm_floor(steps: int, repeats: int = 3) -> tuple[Timing, float]:
    """Time of ``steps`` minibatch steps' three large matrix products alone (forward 64→64,
    its weight gradient and the δ below, each 256 × 64 × 64 in float32, numpy's BLAS): what
    any trainer of this network must spend. Returns the timing and the GFLOP/s reached."""
    rng = np.random.default_rng(0)
    a, d = (rng.normal(size=(256, 64)).astype(np.float32) for _ in range(2))
    W = rng.normal(size=(64, 64)).astype(np.float32)
    out = [np.empty((256, 64), np.float32), np.empty((64, 64), np.float32),
           np.empty((256, 64), np.float32)]
    block = 1000

    def run() -> None:
        for _ in range(-(-steps // block)):
            for _ in range(block):
                np.matmul(a, W, out=out[0])
                np.matmul(a.T, d, out=out[1])
                np.matmul(d, W.T, out=out[2])

    timing, _ = measure(run, repeats)
    n_calls = -(-steps // block) * block
    gflops = 3 * 2 * 256 * 64 * 64 * n_calls / timing.median / 1e9
    return Timing(timing.times, steps / n_calls, timing.cpu), gflops


def bench_mlp(size: Size = "full") -> Section:
    cfg = MLP_SIZES[size]
    Xs, ys, ss = [], [], []
    for s in cfg["seeds"]:
        variants, y = mlp_problem(cfg["n"], s)
        Xs += variants
        ys += [y] * len(variants)
        ss += [s] * len(variants)
    restarts, cap, fixed = cfg["restarts"], cfg["max_epochs"], cfg["fixed_epochs"]
    nets = len(Xs) * restarts
    sec = Section(
        "mlp",
        f"batched MLP [9 -> 64 -> 64 -> 1]: {len(cfg['seeds'])} seeds x 4 variants x {restarts} restarts = "
        f"{nets} networks, n_cal = {cfg['n']:,} (80% train / 20% validation), epoch cap {cap}",
    )
    fit_many(Xs[:1], ys[:1], ss[:1], restarts=1, max_epochs=1)  # warm-up

    def ours(trainer: str = "compiled", **kw: Any) -> int:
        import routeaudit.stats._kernels as kernels

        before = kernels.USE_NUMBA
        kernels.USE_NUMBA = trainer == "compiled"  # off: the batched torch trainer on CPU
        try:
            models = fit_many(Xs, ys, ss, restarts=restarts, **kw)
        finally:
            kernels.USE_NUMBA = before
        return int(sum(m.restart_n_epochs_.sum() for m in models))

    ours("torch", max_epochs=1)  # warm-up (imports torch)
    table = Table("each with its own early stopping (patience 10)", "routeaudit fit_many")
    timed = measure_interleaved(
        {
            "ours": (lambda: ours(max_epochs=cap), cfg["repeats"]),
            "ours torch": (lambda: ours("torch", max_epochs=cap), cfg["repeats"]),
            "sklearn": (lambda: _sklearn_fit_all(Xs, ys, ss, restarts, cap), cfg["repeats"]),
            "ours fixed": (lambda: ours(max_epochs=fixed, patience=fixed), cfg["repeats"]),
            "sklearn fixed": (
                lambda: _sklearn_fit_all(Xs, ys, ss, restarts, cap, fixed=fixed),
                cfg["repeats"],
            ),
        }
    )
    (t_ours, ep_ours), (t_sk, ep_sk) = timed["ours"], timed["sklearn"]
    (t_fo, ep_fo), (t_fs, ep_fs) = timed["ours fixed"], timed["sklearn fixed"]
    table.add(
        "routeaudit fit_many",
        t_ours,
        f"{ep_ours} network-epochs, {t_ours.median / ep_ours * 1e3:.1f} ms each",
    )
    t_torch, ep_torch = timed["ours torch"]
    table.add(
        "routeaudit, torch trainer",
        t_torch,
        f"{ep_torch} network-epochs, {t_torch.median / ep_torch * 1e3:.1f} ms each (batched torch on "
        "CPU: the GPU trainer, and the CPU one without numba)",
    )
    table.add(
        "sklearn one by one",
        t_sk,
        f"{ep_sk} network-epochs, {t_sk.median / ep_sk * 1e3:.1f} ms each (float64; stops on val. accuracy)",
    )
    n_train = len(Xs[0]) - round(0.2 * len(Xs[0]))
    steps = ep_ours * -(-n_train // 256)
    floor, gflops = _mlp_gemm_floor(steps)
    table.add(
        "floor: the matrix products",
        floor,
        f"{steps:,} minibatch steps x the three 256x64x64 products of a step (BLAS, "
        f"{gflops:.0f} GFLOP/s), nothing else",
    )
    sec.tables.append(table)
    equal = Table(
        f"equal work: every network exactly {fixed} epochs, no early stopping", "routeaudit fit_many"
    )
    if not ep_fo == ep_fs == nets * fixed:
        raise AssertionError(f"equal-work runs differ: {ep_fo} vs {ep_fs} network-epochs")
    equal.add("routeaudit fit_many", t_fo, f"{ep_fo} network-epochs")
    equal.add("sklearn one by one", t_fs, f"{ep_fs} network-epochs")
    sec.tables.append(equal)
    per_epoch = (t_sk.median / ep_sk) / (t_ours.median / ep_ours)
    sec.notes.append(
        f"per network-epoch: sklearn / fit_many = {per_epoch:.2f}x (the two early-stopping rules stop at "
        "different epochs: fit_many watches the validation loss, scikit-learn the validation accuracy)"
    )
    sec.targets.append(
        Target("sklearn / fit_many (wall, as specified)", table.ratio("sklearn one by one"), 3.0, True)
    )
    sec.targets.append(
        Target("sklearn / fit_many (equal work)", equal.ratio("sklearn one by one"), 3.0, True)
    )
    return sec


# --------------------------------------------------------------------------- 5. bootstrap

BOOT_SIZES: dict[str, dict[str, int]] = {
    "full": dict(n=1_000_000, n_boot=200, ref_boot=10, repeats=3),
    "quick": dict(n=100_000, n_boot=200, ref_boot=20, repeats=2),
    "smoke": dict(n=2_000, n_boot=20, ref_boot=4, repeats=1),
}


def bench_bootstrap(size: Size = "full") -> Section:
    """The bootstrap of the matched weighted gap (15 bins x 3 strata) at large N."""
    import routeaudit.stats._bootstrap_kernels as bk
    from routeaudit.stats.bootstrap import Resampler

    cfg = BOOT_SIZES[size]
    n, n_boot, ref_boot = cfg["n"], cfg["n_boot"], cfg["ref_boot"]
    gen = np.random.default_rng(0)
    conf = gen.uniform(0.3, 1.0, n)
    bins = confidence_bins(conf, N_BINS)
    strata = gen.integers(0, N_STRATA, n)
    residual = (gen.random(n) < conf) - conf
    kw = dict(n_bins=N_BINS, n_strata=N_STRATA, min_count=MIN_COUNT)
    sec = Section("bootstrap", f"bootstrap of the matched weighted gap, N = {n:,}, {n_boot} replicates "
                               f"({N_BINS} bins x {N_STRATA} strata)")
    bootstrap_gap(bins[:500], strata[:500], residual[:500], **kw, n_boot=2, rng=1)  # JIT warm-up
    order = np.argsort(bins * N_STRATA + strata, kind="stable")
    picks = order[Resampler.draw(np.random.default_rng(1), n).picks(0, ref_boot)]

    def loop() -> np.ndarray:
        """The obvious loop on the same resamples: index, then gap_statistics per replicate."""
        return np.array([gap_statistics(bins[p], strata[p], residual[p], **kw).weighted_gap
                         for p in picks])

    def scipy_bootstrap() -> float:
        res = sps.bootstrap((bins, strata, residual), lambda b, s, x: gap_statistics(  # scipy
            b.astype(np.int64), s.astype(np.int64), x, **kw).weighted_gap,  # hands floats back
            paired=True, vectorized=False, n_resamples=ref_boot,
            method="percentile", random_state=np.random.default_rng(2))
        return float(res.confidence_interval.low)

    counts = np.empty(n, np.uint8)

    def picks_only() -> None:
        for k in range(n_boot):
            bk._count(np.uint64(1), np.uint64(2), k, n, bk.DRAW_BITS, bk.BYTE_CAP, counts)

    scale = n_boot / ref_boot
    timed = measure_interleaved({
        "ours": (lambda: bootstrap_gap(bins, strata, residual, **kw, n_boot=n_boot, rng=1)[2],
                 cfg["repeats"]),
        "loop": (loop, cfg["repeats"]),
        "scipy": (scipy_bootstrap, cfg["repeats"]),
        "picks": (picks_only, cfg["repeats"]),
    })
    table = Table(f"{n_boot} replicates; baselines timed on {ref_boot} and scaled",
                  "routeaudit bootstrap_gap")
    t_ours, reps = timed["ours"]
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    table.add("routeaudit bootstrap_gap", t_ours,
              f"{t_ours.median / n_boot * 1e3:.2f} ms per replicate, {threads} thread(s)")
    t_loop, loop_reps = timed["loop"]
    table.add("numpy loop, same resamples", Timing(t_loop.times, scale, t_loop.cpu),
              "resample by fancy indexing + gap_statistics (bincount) per replicate")
    t_scipy, _ = timed["scipy"]
    table.add("scipy.stats.bootstrap", Timing(t_scipy.times, scale, t_scipy.cpu),
              "paired=True, vectorized=False, percentile")
    table.add("floor: the picks alone", timed["picks"][0],
              "counted into one byte per unit, no data read")
    sec.tables.append(table)
    sec.facts["max_replicate_diff_loop"] = float(np.max(np.abs(loop_reps - reps[:ref_boot])))
    sec.notes.append(f"the loop on the same resamples reproduces the replicates to "
                     f"{sec.facts['max_replicate_diff_loop']:.1e}")
    return sec


# --------------------------------------------------------------------------- entry point

SECTIONS: dict[str, Callable[[Size], Section]] = {
    "permutation": bench_permutation,
    "ece": bench_ece,
    "nw": bench_nw,
    "mlp": bench_mlp,
    "bootstrap": bench_bootstrap,
}


def pin_threads() -> int:
    """Limit torch and the BLAS/OpenMP pools to ``OMP_NUM_THREADS`` (default 1); return the count."""
    threads = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:  # the environment variable then has to do
        pass
    return threads


def header(threads: int, argv: Sequence[str]) -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import scipy
    import sklearn

    try:
        import numba

        jit = f"numba {numba.__version__} (bootstrap kernel on OMP_NUM_THREADS threads, others single)"
    except ImportError:
        jit = "numba not installed (numpy twins of the kernels)"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return "\n".join(
        [
            f"routeaudit speed benchmarks, {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python {' '.join(argv)}",
            f"threads: {threads} (torch.get_num_threads() = {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS')}, BLAS pools limited by threadpoolctl)",
            f"machine: {model}, {os.cpu_count()} cores (shared with other jobs), load average {load}",
            f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
            f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, {jit}",
            "times: median of the runs shown (min next to it); ratio column = row median / named row median; "
            "cpu x = the same ratio of process CPU times",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="+", choices=sorted(SECTIONS), metavar="NAME", help=", ".join(SECTIONS)
    )
    parser.add_argument("--quick", action="store_true", help="smaller workloads and fewer repeats")
    parser.add_argument("--out", help="also write the printout to this file "
                                      "(of record: benchmarks/results/speed.txt)")
    args = parser.parse_args(argv)
    if not args.out:
        return _run(args, argv)
    with open(args.out, "w", encoding="utf-8") as fh:
        sys.stdout = Tee(sys.__stdout__, fh)
        try:
            return _run(args, argv)
        finally:
            sys.stdout = sys.__stdout__


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    threads = pin_threads()
    print(header(threads, ["benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)]))
    started = time.perf_counter()
    sections = []
    for name in args.only or list(SECTIONS):
        t0 = time.perf_counter()
        sec = SECTIONS[name]("quick" if args.quick else "full")
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        sec.notes.append(f"section wall time {time.perf_counter() - t0:.0f} s; load average {load}")
        print_section(sec)
        sections.append(sec)
    print("\n== summary")
    for sec in sections:
        for target in sec.targets:
            print(f"  {sec.name:<12} {target}")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"total {time.perf_counter() - started:.0f} s; load average at the end {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
