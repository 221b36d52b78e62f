"""GPU against CPU: the torch/CUDA paths of the permutation engine, the bootstrap and the MLP.

Run where a CUDA device is present (the extraction overhead on the GPU is
``benchmarks/extract.py --device cuda``; verdicts of a whole run on both devices are compared
by the device script quoted in README.md). Each row times the same call on the CPU (compiled
numba kernels, ``OMP_NUM_THREADS`` threads) and on the GPU (torch), checks that the results
are the ones the CPU gives (bit for bit for the permutation null and the bootstrap; to float
rounding for the MLP, whose reductions run in another order) and prints the ratio.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/gpu.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._output import Tee
from benchmarks.speed import mlp_problem, permutation_workload
from routeaudit.calibrators import fit_many
from routeaudit.stats import (
    bootstrap_gap,
    confidence_bins,
    rng_for,
    within_bin_permutation_test,
)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def timed(fn: Callable[[], Any], repeats: int, cuda: bool) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls after one warm-up call (JIT, CUDA context)."""
    out = fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def row(label: str, cpu: float, gpu: float, check: str) -> None:
    print(f"  {label:<52} cpu {cpu:8.3f} s   gpu {gpu:8.3f} s   cpu/gpu {cpu / gpu:6.1f}x   {check}")


def permutation(n: int, n_perm: int, n_summaries: int, repeats: int) -> None:
    bins, residual, strata = permutation_workload(n, n_summaries)

    def tests(device: str | None) -> list:
        return [within_bin_permutation_test(bins, s, residual, n_bins=15, n_strata=3, min_count=5,
                                            n_permutations=n_perm, rng=rng_for("gpu", k),
                                            device=device)
                for k, s in enumerate(strata)]

    t_cpu, cpu = timed(lambda: tests(None), repeats, False)
    t_gpu, gpu = timed(lambda: tests("cuda"), repeats, True)
    same = all(a.p_value == b.p_value and np.array_equal(a.null, b.null)
               for a, b in zip(cpu, gpu, strict=True))
    row(f"permutation N={n:,} B={n_perm:,} x {n_summaries} summaries", t_cpu, t_gpu,
        f"p-values and nulls identical: {same}")


def bootstrap(n: int, n_boot: int, repeats: int) -> None:
    gen = np.random.default_rng(0)
    conf = gen.uniform(0.3, 1.0, n)
    bins = confidence_bins(conf, 15)
    strata = gen.integers(0, 3, n)
    residual = (gen.random(n) < conf) - conf

    def run(device: str | None) -> tuple:
        return bootstrap_gap(bins, strata, residual, n_bins=15, n_strata=3, min_count=5,
                             n_boot=n_boot, rng=1, device=device)

    t_cpu, cpu = timed(lambda: run(None), repeats, False)
    t_gpu, gpu = timed(lambda: run("cuda"), repeats, True)
    same = cpu[:2] == gpu[:2] and np.array_equal(cpu[2], gpu[2])
    row(f"bootstrap_gap N={n:,}, {n_boot} replicates", t_cpu, t_gpu, f"replicates identical: {same}")


def mlp(n: int, seeds: Sequence[int], restarts: int, epochs: int, repeats: int) -> None:
    Xs, ys, ss = [], [], []
    for s in seeds:
        variants, y = mlp_problem(n, s)
        Xs += variants
        ys += [y] * len(variants)
        ss += [s] * len(variants)

    def run(device: str) -> list:
        return fit_many(Xs, ys, ss, restarts=restarts, max_epochs=epochs, patience=epochs,
                        device=device)

    t_cpu, cpu = timed(lambda: run("cpu"), repeats, False)
    t_gpu, gpu = timed(lambda: run("cuda"), repeats, True)
    diff = max(float(np.max(np.abs(a.predict(X) - b.predict(X))))
               for a, b, X in zip(cpu, gpu, Xs, strict=True))
    row(f"MLP fit_many {len(Xs)} models x {restarts} restarts, {epochs} epochs, n={n:,}",
        t_cpu, t_gpu, f"max |p_cpu - p_gpu| = {diff:.1e}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--out", help="also write the printout to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.out:
            out = stack.enter_context(open(args.out, "w", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stdout(Tee(sys.stdout, out)))
        import numba

        print(f"routeaudit GPU benchmark: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"numba {numba.__version__}, CPU side {os.environ['OMP_NUM_THREADS']} thread(s)")
        q = args.quick
        permutation(10_000, 1_000 if q else 10_000, 2 if q else 5, 3)
        permutation(1_000_000, 100 if q else 1_000, 1, 3)
        bootstrap(100_000 if q else 1_000_000, 200, 3)
        mlp(2_000 if q else 10_000, (0, 1, 2), 3, 5 if q else 20, 1 if q else 3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
