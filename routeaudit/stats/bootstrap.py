"""Bootstrap intervals: of the weighted gap, of worst-tile ECE (paired across probes), of a
mean over resampled groups, and the paired gain between two probes (docs/methods.md §2.4,
§2.7, §3.4).

Every replicate is a row of multinomial resampling counts; replicate k uses the k-th block
of uniforms from the generator, so results do not depend on the chunk size. Replicates are
processed in chunks, each fully vectorised: no Python loop over replicates or bins. The gap
bootstrap sums its cells with a compiled kernel (numba) when it can, with the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import routeaudit.stats._backend as _backend
from routeaudit.metrics import bin_indices
from routeaudit.stats._backend import DeviceLike
from routeaudit.stats.gaps import batched_weighted_gap, check_cells, gap_from_cells, quantise, scale_exponent
from routeaudit.stats.rng import as_generator

__all__ = [
    "bootstrap_ci",
    "bootstrap_gap",
    "bootstrap_worst_tile_ece",
    "cluster_bootstrap_mean",
    "paired_gain",
    "resampling_counts",
]


def bootstrap_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates; NaN replicates (no bin used) are dropped."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = np.asarray(samples, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (np.nan, np.nan)
    lo, hi = np.quantile(v, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def _multinomial_counts(gen: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Bootstrap resampling counts [rows, n]: row k takes the k-th block of n uniforms."""
    pick = np.minimum((gen.random((rows, n)) * n).astype(np.int64), n - 1)
    pick += (np.arange(rows, dtype=np.int64) * n)[:, None]
    return np.bincount(pick.reshape(-1), minlength=rows * n).reshape(rows, n)


def resampling_counts(gen: np.random.Generator, rows: int, n: int,
                      groups: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap weights [rows, n] of n examples: multinomial counts over examples, or with
    ``groups`` over whole groups (each example weighted by its group's count), so tokens of
    one sequence are resampled together. Without groups this is exactly the per-example
    draw of earlier releases."""
    if groups is None:
        return _multinomial_counts(gen, rows, n)
    _, inverse = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
    if inverse.size != n:
        raise ValueError(f"groups has {inverse.size} entries for {n} examples")
    return _multinomial_counts(gen, rows, int(inverse.max()) + 1)[:, inverse]


def bootstrap_gap(
    bin_idx: np.ndarray,
    strata: np.ndarray,
    residual: np.ndarray,
    *,
    n_bins: int,
    n_strata: int,
    n_boot: int = 2000,
    rng: np.random.Generator | int,
    min_count: int = 5,
    level: float = 0.95,
    device: DeviceLike = None,
    chunk_size: int | None = None,
    groups: np.ndarray | None = None,
) -> tuple[float, float, np.ndarray]:
    """Percentile bootstrap CI of the weighted gap, resampling examples with replacement
    (whole ``groups``, e.g. sequences, when given: :func:`resampling_counts`).

    Each replicate is a row of multinomial counts over the N examples; the bin and stratum of
    every example stay as they are (the partition is fixed, as in the audit), and the gap is
    recomputed from count-weighted cell sums, so supports and weights are re-evaluated per
    replicate. Replicate k uses the k-th block of N uniforms from ``rng``, so the result does
    not depend on ``chunk_size``. Returns (low, high, replicate values).
    """
    b, s, x = check_cells(bin_idx, strata, residual, n_bins, n_strata, min_count)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    gen = as_generator(rng)
    n = b.size
    values = np.full(int(n_boot), np.nan)
    if n == 0:
        return (np.nan, np.nan, values)
    chunk = int(chunk_size) if chunk_size else max(1, _backend.CHUNK_KEYS // n)
    compiled = _compiled_gap_replicates(b, s, x, n_bins, n_strata, min_count, groups, device)
    for row0 in range(0, int(n_boot), chunk):  # chunks of replicates, each vectorised
        rows = min(chunk, int(n_boot) - row0)
        if compiled is not None:
            values[row0 : row0 + rows] = compiled(gen, rows)
            continue
        counts = resampling_counts(gen, rows, n, groups)
        wg, _ = batched_weighted_gap(
            b,
            s,
            x,
            n_bins=n_bins,
            n_strata=n_strata,
            min_count=min_count,
            weights=counts,
            device=device,
        )
        values[row0 : row0 + rows] = wg
    lo, hi = bootstrap_ci(values, level)
    return lo, hi, values


def _compiled_gap_replicates(
    b: np.ndarray, s: np.ndarray, x: np.ndarray, n_bins: int, n_strata: int, min_count: int,
    groups: np.ndarray | None, device: DeviceLike,
) -> Callable[[np.random.Generator, int], np.ndarray] | None:
    """The weighted gap of the next ``rows`` replicates with the compiled kernel (numba), or
    None (no numba, or a GPU device). It consumes the generator exactly as
    :func:`resampling_counts` does and sums the same integers, so the values are those of the
    numpy path, bit for bit."""
    import routeaudit.stats._kernels as _kernels

    if _backend.torch_device(device) is not None or not _kernels.available():
        return None
    n = b.size
    if groups is None:
        members = np.arange(n, dtype=np.int64)
        starts = np.arange(n + 1, dtype=np.int64)
    else:
        _, inverse = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
        if inverse.size != n:
            raise ValueError(f"groups has {inverse.size} entries for {n} examples")
        members = np.argsort(inverse, kind="stable").astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(np.bincount(inverse))]).astype(np.int64)
    sizes = np.diff(starts)
    cell = (b * n_strata + s).astype(np.int64)
    n_cells = n_bins * n_strata

    def replicates(gen: np.random.Generator, rows: int) -> np.ndarray:
        u = gen.random((rows, sizes.size))  # the uniforms of _multinomial_counts
        n_terms = n if groups is None else int(_kernels.boot_row_weight(u, sizes))
        exponent = scale_exponent(x, n_terms)  # as batched_weighted_gap picks it for the chunk
        sums = np.empty((rows, n_cells), dtype=np.int64)
        counts = np.empty((rows, n_cells), dtype=np.int64)
        _kernels.boot_cell_sums(u, starts, members, cell, quantise(x, exponent), groups is not None,
                                sums, counts)
        real = np.ldexp(sums.astype(np.float64), -exponent).reshape(rows, n_bins, n_strata)
        wg, _, _, _ = gap_from_cells(real, counts.reshape(rows, n_bins, n_strata), min_count)
        return np.asarray(wg, dtype=np.float64)

    return replicates


def bootstrap_worst_tile_ece(
    preds: np.ndarray,
    correct: np.ndarray,
    tiles: np.ndarray,
    *,
    n_boot: int,
    rng: np.random.Generator | int,
    n_tiles: int = 3,
    n_bins: int = 15,
    chunk_size: int | None = None,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Worst-tile ECE15 of M calibrated predictions, observed and under a *paired* bootstrap
    (over whole ``groups``, e.g. sequences, when given).

    ``preds`` is [M, n] (one row per probe, all on the same n evaluation examples),
    ``tiles`` the shared routing tile of each example (0..n_tiles-1). Every bootstrap
    replicate draws one multinomial resample of the n examples and applies it to all M
    probes at once, so differences between probes are paired. Bins are the (lo, hi] rule of
    ECE15 on each probe's own calibrated confidence. Per replicate and probe the cell sums
    are one ``bincount`` over (replicate, tile, bin): no loop over replicates or bins.

    Returns ``(observed [M], replicates [n_boot, M])``; a replicate in which every tile is
    empty is NaN (it cannot happen with n >= 1 and non-empty tiles, but is guarded).
    """
    p = np.atleast_2d(np.asarray(preds, dtype=np.float64))
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    t = np.asarray(tiles, dtype=np.int64).reshape(-1)
    m, n = p.shape
    if y.size != n or t.size != n:
        raise ValueError(f"preds [M, n] = {p.shape}, correct {y.shape} and tiles {t.shape} differ")
    if n == 0:
        raise ValueError("no evaluation examples")
    if t.min() < 0 or t.max() >= n_tiles:
        raise ValueError(f"tiles out of range [0, {n_tiles})")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    gen = as_generator(rng)
    cells = n_tiles * n_bins
    cell = np.stack([t * n_bins + bin_indices(np.clip(row, 0.0, 1.0), n_bins) for row in p])
    residual = p - y[None, :]

    def worst(weights: np.ndarray) -> np.ndarray:
        """Worst-tile ECE per (replicate, probe) for example weights [R, n]."""
        rows = weights.shape[0]
        sizes = np.bincount((np.arange(rows)[:, None] * n_tiles + t).ravel(),
                            weights=weights.ravel(), minlength=rows * n_tiles).reshape(rows, n_tiles)
        out = np.empty((rows, m))
        offset = (np.arange(rows) * cells)[:, None]
        for j in range(m):  # probes (a handful), each fully vectorised over replicates
            sums = np.bincount((offset + cell[j]).ravel(), weights=(weights * residual[j]).ravel(),
                               minlength=rows * cells).reshape(rows, n_tiles, n_bins)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_tile = np.abs(sums).sum(axis=2) / sizes
            per_tile[sizes == 0] = -np.inf
            best = per_tile.max(axis=1)
            out[:, j] = np.where(np.isfinite(best), best, np.nan)
        return out

    observed = worst(np.ones((1, n)))[0]
    chunk = int(chunk_size) if chunk_size else max(1, _backend.CHUNK_KEYS // n)
    reps = np.empty((int(n_boot), m))
    for row0 in range(0, int(n_boot), chunk):  # chunks of replicates, each vectorised
        rows = min(chunk, int(n_boot) - row0)
        reps[row0 : row0 + rows] = worst(resampling_counts(gen, rows, n, groups).astype(np.float64))
    return observed, reps


def cluster_bootstrap_mean(
    values: np.ndarray,
    *,
    n_boot: int,
    rng: np.random.Generator | int,
    groups: np.ndarray | None = None,
    level: float = 0.95,
) -> tuple[float, tuple[float, float], np.ndarray]:
    """Mean of per-example values with a percentile bootstrap CI, resampling whole groups.

    With ``groups`` (e.g. the sequence of each token) the resampling unit is the group and
    the statistic is Σ_g w_g S_g / Σ_g w_g n_g (S_g, n_g: the group's sum and size), which
    keeps the dependence between tokens of a sequence inside a resampling unit; without
    groups every example is its own group. Replicates are multinomial counts over groups,
    in chunks, one matrix product per chunk. Returns (mean, (low, high), replicates).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("no values")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or inf")
    if groups is None:
        sums, sizes = v, np.ones_like(v)
    else:
        g = np.asarray(groups).reshape(-1)
        if g.size != v.size:
            raise ValueError(f"groups has {g.size} entries for {v.size} values")
        _, inverse = np.unique(g, return_inverse=True)
        sums = np.bincount(inverse, weights=v)
        sizes = np.bincount(inverse).astype(np.float64)
    gen = as_generator(rng)
    n = sums.size
    reps = np.empty(int(n_boot))
    chunk = max(1, _backend.CHUNK_KEYS // n)
    for row0 in range(0, int(n_boot), chunk):  # chunks of replicates, each one matmul
        rows = min(chunk, int(n_boot) - row0)
        w = _multinomial_counts(gen, rows, n).astype(np.float64)
        reps[row0 : row0 + rows] = (w @ sums) / (w @ sizes)
    return float(v.mean()), bootstrap_ci(reps, level), reps


def paired_gain(
    observed: np.ndarray, replicates: np.ndarray, candidate: int, control: int, level: float
) -> tuple[float, tuple[float, float], float]:
    """Gain = metric(control) − metric(candidate) (> 0: the candidate is better).

    Returns the observed gain, its percentile CI from the paired replicates, and a two-sided
    bootstrap p-value ``min(1, 2 · min((1 + #{g* ≤ 0}), (1 + #{g* ≥ 0})) / (1 + B))``.
    """
    gain = float(observed[control] - observed[candidate])
    g = replicates[:, control] - replicates[:, candidate]
    g = g[np.isfinite(g)]
    if g.size == 0:
        return gain, (np.nan, np.nan), np.nan
    lo, hi = bootstrap_ci(g, level)
    b = g.size
    p = min(1.0, 2.0 * min(1 + int((g <= 0).sum()), 1 + int((g >= 0).sum())) / (1 + b))
    return gain, (lo, hi), p
