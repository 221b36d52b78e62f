"""Speed of routeaudit's ECE15 and SmoothECE against reading the data once and the libraries.

Workload: N = 1e7 top-label confidences (float64, none equal to 1.0 so every library bins
them the same way) and correctness (bool), one thread. Rows, each a median over repeats:

* ``read once``: ``conf.sum(); correct.sum()``, the floor for anything that reads the data;
* ours: ``routeaudit.metrics.ece`` (default (lo, hi] bins; also float64 correct, float32
  conf, ``[lo, hi)`` bins, ``norm="l2"``) and ``bin_indices``;
* what a user would write with numpy: ``np.searchsorted`` on the edges + ``np.bincount``;
* netcal ``ECE(15).measure``, relplot ``binnedECE(f, y, 15)`` and torchmetrics
  ``binary_calibration_error(n_bins=15)``, all on the same arrays;
* SmoothECE at N = 1e6: ``routeaudit.metrics.smooth_ece`` against ``relplot.smECE``.

Ratios are to ``read once`` (ECE rows) or to relplot (SmoothECE rows). The ECE target is
3x ``read once``: ``np.bincount``'s scatter-add alone costs about 1.3x, so a numpy
implementation cannot get much below 3.5x; see ``routeaudit.metrics._width_bin_sums``.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_ece.py [--n N] [--repeats R]``
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from routeaudit.metrics import bin_indices, ece, smooth_ece  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

N_BINS = 15


def workload(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Confidences of an over-confident classifier (in (0.1, 1), never exactly 1.0)."""
    gen = np.random.default_rng(seed)
    conf = 0.1 + 0.9 * gen.beta(5.0, 1.5, n)
    conf = np.minimum(conf, np.nextafter(1.0, 0.0))
    correct = gen.random(n) < conf - 0.05
    return conf, correct


def numpy_searchsorted_ece(conf: np.ndarray, correct: np.ndarray) -> float:
    """What one writes with numpy alone: search the edges, then bincount."""
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    b = np.searchsorted(edges[1:-1], conf, side="left")
    return float(np.abs(np.bincount(b, conf - correct, N_BINS)).sum() / conf.size)


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(median, min) seconds over ``repeats`` calls; slow calls (> 2 s) are run twice only."""
    times, out = [], None
    for i in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        if i >= 1 and times[0] > 2.0:
            break
    return float(np.median(times)), float(np.min(times)), out


def _library_rows(conf, correct):
    rows = []
    try:
        from netcal.metrics import ECE

        y_int = correct.astype(np.int64)
        rows.append(("netcal ECE(15).measure", lambda: ECE(N_BINS).measure(conf, y_int)))
    except ImportError:
        pass
    try:
        from relplot.metrics import binnedECE

        y_f = correct.astype(np.float64)
        rows.append(("relplot binnedECE(15)", lambda: binnedECE(conf, y_f, N_BINS)))
    except ImportError:
        pass
    try:
        from torchmetrics.functional.classification import binary_calibration_error

        tc, ty = torch.from_numpy(conf), torch.from_numpy(correct.astype(np.int64))
        rows.append(
            (
                "torchmetrics binary_calibration_error",
                lambda: float(binary_calibration_error(tc, ty, N_BINS)),
            )
        )
    except ImportError:
        pass
    return rows


def run(n: int = 10_000_000, repeats: int = 5, smooth_n: int = 1_000_000) -> list[dict]:
    """Time every row; return one dict per row (name, n, median_s, min_s, ratio, value)."""
    conf, correct = workload(n)
    correct_f = correct.astype(np.float64)
    conf32 = conf.astype(np.float32)
    rows: list[dict] = []

    def add(name, fn, base=None, size=n):
        med, best, out = _time(fn, repeats)
        value = out if isinstance(out, float) else None
        rows.append(
            {
                "name": name,
                "n": size,
                "median_s": med,
                "min_s": best,
                "ratio": med / base if base else None,
                "value": value,
            }
        )
        return med

    read = add("read once: conf.sum(); correct.sum()", lambda: (conf.sum(), correct.sum()))
    read_f = add("read once, float64 correct", lambda: (conf.sum(), correct_f.sum()), base=read)
    add("ours ece (lo,hi], bool correct", lambda: ece(conf, correct), read)
    rows[-1]["ratio_to_own_read"] = rows[-1]["ratio"]
    add("ours ece (lo,hi], float64 correct", lambda: ece(conf, correct_f), read)
    rows[-1]["ratio_to_own_read"] = rows[-1]["median_s"] / read_f
    add("ours ece [lo,hi)", lambda: ece(conf, correct, closed="left"), read)
    add("ours ece, float32 conf", lambda: ece(conf32, correct), read)
    add("ours ece norm='l2' (adds counts)", lambda: ece(conf, correct, norm="l2"), read)
    add("ours bin_indices (int64 out)", lambda: bin_indices(conf), read)
    add("numpy searchsorted + bincount", lambda: numpy_searchsorted_ece(conf, correct), read)
    for name, fn in _library_rows(conf, correct):
        add(name, fn, read)

    sc, sy = workload(smooth_n, seed=1)
    sy_f = sy.astype(np.float64)
    try:
        import relplot

        rel = add(
            "relplot smECE (auto sigma)",
            lambda: float(relplot.smECE(sc, sy_f)),
            size=smooth_n,
        )
    except ImportError:
        rel = None
    add("ours smooth_ece (auto sigma)", lambda: smooth_ece(sc, sy), rel, size=smooth_n)
    return rows


def _print(rows: list[dict]) -> None:
    print(
        f"threads: torch={torch.get_num_threads()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')}; numpy {np.__version__}; "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"{'row':42s} {'N':>9s} {'median ms':>10s} {'min ms':>9s} {'ratio':>7s}  value")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        value = f"{r['value']:.10f}" if r["value"] is not None else ""
        print(
            f"{r['name']:42s} {r['n']:9.0e} {1e3 * r['median_s']:10.1f} "
            f"{1e3 * r['min_s']:9.1f} {ratio:>7s}  {value}"
        )
    ours = next(r for r in rows if r["name"].startswith("ours ece (lo,hi], bool"))
    verdict = "meets" if ours["ratio"] <= 3.0 else "misses"
    print(f"ECE15 vs read-once: {ours['ratio']:.2f}x ({verdict} the 3x target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smooth-n", type=int, default=1_000_000)
    args = parser.parse_args()
    _print(run(args.n, args.repeats, args.smooth_n))


if __name__ == "__main__":
    main()
