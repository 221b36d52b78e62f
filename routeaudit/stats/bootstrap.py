"""Bootstrap intervals: of the weighted gap, of worst-tile ECE (paired across probes), of a
mean over resampled groups, and the paired gain between two probes (docs/methods.md §2.4,
§2.7, §3.4).

Every replicate is a row of multinomial resampling counts from a :class:`Resampler`:
replicate k is a function of two keys drawn from the caller's generator and of k, so results
do not depend on the chunk size or the device. The gap and group-mean bootstraps sum their
data in exact integers with a compiled kernel (numba; numpy and torch give the same bits):
counts first, then one ordered pass over the data, no [replicates, examples] matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

import routeaudit.stats._backend as _backend
from routeaudit.metrics import bin_indices
from routeaudit.stats._backend import DeviceLike
from routeaudit.stats.gaps import check_cells, gap_from_cells, quantise, scale_exponent
from routeaudit.stats.rng import as_generator

__all__ = [
    "Resampler",
    "bootstrap_ci",
    "bootstrap_gap",
    "bootstrap_worst_tile_ece",
    "cluster_bootstrap_mean",
    "group_units",
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


@dataclass(frozen=True)
class Resampler:
    """Who every bootstrap replicate picks: ``n_units`` units drawn with replacement.

    Replicate k is a function of two 64-bit keys (drawn once from the caller's generator)
    and k only (:mod:`routeaudit.stats._bootstrap_kernels`), so replicates do not depend on
    the chunk size, the device or whether the compiled (numba), numpy or torch code runs.
    A unit is an example, or a group of examples (e.g. a sequence of tokens) resampled whole.
    """

    key: int
    key2: int
    n_units: int

    @classmethod
    def draw(cls, rng: np.random.Generator | int, n_units: int) -> Resampler:
        """Keys from ``rng`` (which advances by exactly two words)."""
        _bk, _ = _compiled()
        if not 0 < int(n_units) <= 1 << _bk.DRAW_BITS:
            raise ValueError(f"the bootstrap resamples 1 .. 2**{_bk.DRAW_BITS} units, not {n_units}")
        key, key2 = (int(w) for w in as_generator(rng).bit_generator.random_raw(2))
        return cls(key, key2, int(n_units))

    def picks(self, row0: int, rows: int) -> np.ndarray:
        """The units replicates ``row0 .. row0 + rows - 1`` pick, in draw order: [rows, n_units]."""
        _bk, _ = _compiled()
        return _bk.picks_numpy(self.key, self.key2, row0, rows, self.n_units, _bk.DRAW_BITS)

    def counts(self, row0: int, rows: int) -> np.ndarray:
        """How often each replicate picks each unit: int64 [rows, n_units]."""
        _bk, _kernels = _compiled()
        if _kernels.available():
            out = np.empty((rows, self.n_units), dtype=np.int64)
            _bk.counts(np.uint64(self.key), np.uint64(self.key2), row0, rows, self.n_units,
                       _bk.DRAW_BITS, out)
            return out
        return _bk.counts_numpy(self.key, self.key2, row0, rows, self.n_units, _bk.DRAW_BITS)

    def segment_sums(self, row0: int, rows: int, unit: np.ndarray, values: np.ndarray,
                     weight: np.ndarray, starts: np.ndarray, device: DeviceLike = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Per replicate and segment, Σ count × ``values`` and Σ count × ``weight`` (exact
        int64; ``weight`` empty: all 1). Position k of ``values`` belongs to unit ``unit[k]``
        (unit k when ``unit`` is empty); segment s is positions ``starts[s] .. starts[s + 1]
        - 1`` (none empty)."""
        _bk, _kernels = _compiled()
        args = (row0, rows, self.n_units, unit, values, weight, starts)
        dev = _backend.torch_device(device)
        if dev is not None:
            return _bk.segment_sums_torch(self.key, self.key2, *args, dev, _bk.DRAW_BITS)
        if not _kernels.available():
            return _bk.segment_sums_numpy(self.key, self.key2, *args, _bk.DRAW_BITS)
        sums = np.empty((rows, starts.size - 1), dtype=np.int64)
        counts = np.empty_like(sums)
        _bk.segment_sums(np.uint64(self.key), np.uint64(self.key2), *args, _bk.DRAW_BITS,
                         _bk.BYTE_CAP, min(_kernels.threads(), rows), sums, counts)
        return sums, counts


_NO_WEIGHT = np.empty(0, dtype=np.int64)  # every position weighs 1
_IDENTITY = np.empty(0, dtype=np.int64)  # position k is unit k


def _compiled() -> tuple[ModuleType, ModuleType]:
    """The kernel modules, imported on first use so that ``import routeaudit`` does not load
    numba."""
    import routeaudit.stats._bootstrap_kernels as bootstrap_kernels
    import routeaudit.stats._kernels as kernels

    return bootstrap_kernels, kernels


def _replicate_chunk(n: int, device: DeviceLike) -> int:
    """Replicates per call of the segment sums: the compiled kernel holds one count array per
    thread (any number of rows); numpy and torch hold [rows, n] arrays (bounded)."""
    if _compiled()[1].available() and _backend.torch_device(device) is None:
        return 4096
    return max(1, _backend.CHUNK_KEYS // max(n, 1))


def group_units(groups: np.ndarray | None, n: int) -> tuple[np.ndarray | None, int]:
    """(unit of each example, number of units): each example its own unit without
    ``groups``, else one unit per distinct group id (ids in sorted order)."""
    if groups is None:
        return None, n
    _, inverse = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
    if inverse.size != n:
        raise ValueError(f"groups has {inverse.size} entries for {n} examples")
    return inverse.astype(np.int64), int(inverse.max()) + 1 if n else 0


def resampling_counts(resampler: Resampler, row0: int, rows: int,
                      unit: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap weights [rows, n] of n examples: how often replicate row0 + r picks each
    example, or with ``unit`` (from :func:`group_units`) each example's group."""
    counts = resampler.counts(row0, rows)
    return counts if unit is None else counts[:, unit]


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
    (whole ``groups``, e.g. sequences, when given).

    Replicate k picks the units :meth:`Resampler.picks` gives: the groups (ids in sorted
    order), or without groups the examples in the order of their (bin, stratum) cell, ties
    by position (a fixed relabelling that lets the kernel read the data in order); the bin and
    stratum of every example stay as they are (the partition is fixed, as in the audit), and
    the gap is recomputed from the resampled cell sums, so supports and weights are
    re-evaluated per replicate. Cell sums are exact integers (residuals quantised as in
    :mod:`routeaudit.stats.gaps`), so the result depends on neither ``chunk_size`` nor the
    device. Returns (low, high, replicate values).
    """
    b, s, x = check_cells(bin_idx, strata, residual, n_bins, n_strata, min_count)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = b.size
    values = np.full(int(n_boot), np.nan)
    if n == 0:
        return (np.nan, np.nan, values)
    unit_of, n_units = group_units(groups, n)
    resampler = Resampler.draw(rng, n_units)
    # most examples a replicate can hold: n, or n_units times the largest group
    n_terms = n if unit_of is None else n_units * int(np.bincount(unit_of).max())
    exponent = scale_exponent(x, n_terms)
    cell = b * n_strata + s
    order = np.argsort(cell, kind="stable")  # segments: the cells, in order
    present, first = np.unique(cell[order], return_index=True)
    starts = np.append(first, n).astype(np.int64)
    # unit of each position: without groups the units are the examples in cell order (a
    # fixed relabelling, so the data are read in order); with groups, each example's group
    unit = _IDENTITY if unit_of is None else unit_of[order]
    xq = quantise(x, exponent)[order]
    n_cells = n_bins * n_strata
    chunk = int(chunk_size) if chunk_size else _replicate_chunk(n, device)
    for row0 in range(0, int(n_boot), chunk):  # chunks of replicates
        rows = min(chunk, int(n_boot) - row0)
        seg_sums, seg_counts = resampler.segment_sums(row0, rows, unit, xq, _NO_WEIGHT, starts,
                                                       device)
        sums = np.zeros((rows, n_cells))
        counts = np.zeros((rows, n_cells), dtype=np.int64)
        sums[:, present] = np.ldexp(seg_sums.astype(np.float64), -exponent)
        counts[:, present] = seg_counts
        wg, _, _, _ = gap_from_cells(sums.reshape(rows, n_bins, n_strata),
                                     counts.reshape(rows, n_bins, n_strata), min_count)
        values[row0 : row0 + rows] = wg
    lo, hi = bootstrap_ci(values, level)
    return lo, hi, values


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
    ECE15 on each probe's own calibrated confidence. Per replicate the compiled kernel counts
    the picks and sums every probe's (tile, bin) cells in one ordered pass
    (:func:`routeaudit.stats._bootstrap_kernels.cell_sums`); without numba one ``bincount``
    over (replicate, tile, bin) per probe gives the same bits.

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
    unit_of, n_units = group_units(groups, n)
    resampler = Resampler.draw(rng, n_units)
    cells = n_tiles * n_bins
    cell = np.stack([t * n_bins + bin_indices(np.clip(row, 0.0, 1.0), n_bins) for row in p])
    residual = p - y[None, :]

    def cell_sums(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell sums [R, M, cells] and tile sizes [R, tiles] for example weights [R, n] (the
        numpy path: one ``bincount`` per probe, vectorised over replicates)."""
        rows = weights.shape[0]
        sizes = np.bincount((np.arange(rows)[:, None] * n_tiles + t).ravel(),
                            weights=weights.ravel(), minlength=rows * n_tiles).reshape(rows, n_tiles)
        sums = np.empty((rows, m, cells))
        offset = (np.arange(rows) * cells)[:, None]
        for j in range(m):  # probes (a handful)
            sums[:, j] = np.bincount((offset + cell[j]).ravel(),
                                     weights=(weights * residual[j]).ravel(),
                                     minlength=rows * cells).reshape(rows, cells)
        return sums, sizes

    def worst(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Worst-tile ECE per (replicate, probe) from cell sums and tile sizes."""
        with np.errstate(invalid="ignore", divide="ignore"):
            per_tile = (np.abs(sums.reshape(-1, m, n_tiles, n_bins)).sum(axis=3)
                        / sizes[:, None, :])
        per_tile[np.broadcast_to(sizes[:, None, :] == 0, per_tile.shape)] = -np.inf
        best = per_tile.max(axis=2)
        return np.where(np.isfinite(best), best, np.nan)

    observed = worst(*cell_sums(np.ones((1, n))))[0]
    bk, kernels = _compiled()
    compiled = kernels.available()
    chunk = int(chunk_size) if chunk_size else (
        4096 if compiled else max(1, _backend.CHUNK_KEYS // n))
    reps = np.empty((int(n_boot), m))
    for row0 in range(0, int(n_boot), chunk):  # chunks of replicates, each vectorised
        rows = min(chunk, int(n_boot) - row0)
        if compiled:  # counts, then one ordered pass per probe: the numpy path's bits
            sums = np.empty((rows, m, cells))
            sizes = np.empty((rows, n_tiles))
            bk.cell_sums(np.uint64(resampler.key), np.uint64(resampler.key2), row0, rows,
                         n_units, _IDENTITY if unit_of is None else unit_of, cell, residual, t,
                         bk.DRAW_BITS, min(kernels.threads(), rows), sums, sizes)
        else:
            sums, sizes = cell_sums(
                resampling_counts(resampler, row0, rows, unit_of).astype(np.float64))
        reps[row0 : row0 + rows] = worst(sums, sizes)
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
    unit_of, n_units = group_units(groups, v.size)
    if unit_of is None:
        sums, sizes = v, _NO_WEIGHT  # every unit one example
    else:
        sums = np.bincount(unit_of, weights=v, minlength=n_units)
        sizes = np.bincount(unit_of, minlength=n_units).astype(np.int64)
    resampler = Resampler.draw(rng, n_units)
    exponent = scale_exponent(sums, n_units)  # a replicate adds n_units group sums
    sq = quantise(sums, exponent)
    whole = np.array([0, n_units], dtype=np.int64)  # one segment: every unit
    reps = np.empty(int(n_boot))
    chunk = _replicate_chunk(n_units, None)
    for row0 in range(0, int(n_boot), chunk):  # chunks of replicates
        rows = min(chunk, int(n_boot) - row0)
        total, size = resampler.segment_sums(row0, rows, _IDENTITY, sq, sizes, whole)
        reps[row0 : row0 + rows] = np.ldexp(total[:, 0].astype(np.float64), -exponent) / size[:, 0]
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
