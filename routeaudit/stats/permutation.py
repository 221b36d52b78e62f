"""The within-confidence-bin routing-permutation test (docs/methods.md §2.5).

Stratum labels are permuted among the members of each confidence bin, independently per bin
and per permutation, and the gap statistic is recomputed for every permutation. A uniform
relabelling of a bin is drawn by sequential sampling, one bounded random integer per example
and no sort (see :mod:`routeaudit.stats._kernels`), from a counter-based stream keyed by two
words of the ``numpy.random.Generator`` that is passed in: permutation k is the same whatever
the chunk size, the device, or whether the compiled (numba), numpy or torch kernels run.
Cell sums are exact int64 sums (see :mod:`routeaudit.stats.gaps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np

import routeaudit.stats._backend as _backend
from routeaudit.stats._backend import DeviceLike
from routeaudit.stats.gaps import check_cells, quantise, scale_exponent
from routeaudit.stats.rng import as_generator

if TYPE_CHECKING:
    import torch

__all__ = ["PermutationResult", "null_mean_draws", "within_bin_permutation_test"]

Statistic = Literal["weighted_gap", "max_gap"]

# Work per chunk of permutations when chunk_size is not given: examples x permutations for
# the compiled kernel (a few ms; bounds what Besag-Clifford stopping computes past its stop),
# bins x permutations for the vectorised numpy and torch loops (bounds their temporaries).
_COMPILED_CHUNK = 1 << 22
_NUMPY_CHUNK = 1 << 16
_DEVICE_CHUNK = 1 << 20


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of a within-bin permutation test; ``null`` holds every drawn T*."""

    statistic: float
    p_value: float
    n_permutations: int
    """Permutations drawn (L): fewer than asked for when sequential stopping stopped early."""
    exceedances: int
    null_mean: float
    """Unbiased estimate of E[T*] (the mean of the permutation distribution) under the
    sampling that was done: with sequential stopping, the mean of the draws before the h-th
    exceedance, not of all L draws (see :func:`null_mean_draws`)."""
    null_sd: float
    """sd of T* (ddof 1) over the same draws as ``null_mean``."""
    null_mean_var: float
    """Monte Carlo variance of ``null_mean``: ``null_sd² / m`` for its m draws (NaN when
    fewer than two permutations were drawn)."""
    stopped_early: bool
    null: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class _Layout:
    """What the null keeps fixed, for the U used bins, in canonical order.

    Canonical order: used bins by label, inside a bin by observed stratum, inside a cell by
    position in the input, so the null only depends on (bin, stratum, order within the cell).
    """

    x: np.ndarray  # [sum n_b] int64 quantised residuals of the used bins, canonical order
    starts: np.ndarray  # [U] first position of each bin in x
    sizes: np.ndarray  # [U] n_b
    cum: np.ndarray  # [U, S-1] examples of strata <= t: the label boundaries
    woff: np.ndarray  # [U] uint64 first stream word of each bin within a permutation
    words: int  # stream words per permutation (one per two examples)
    counts: np.ndarray  # [U, S] n_{b,t}
    supported: np.ndarray  # [U, S] n_{b,t} >= min_count
    totals: np.ndarray  # [U] quantised residual total per used bin
    bin_ids: np.ndarray  # [U] original labels of the used bins
    exponent: int
    observed_le: np.ndarray  # [U, S-1] observed sums below each boundary

    @cached_property
    def x_pad(self) -> np.ndarray:
        """[U, max n_b] ``x``, one zero-padded row per bin (the numpy and torch loops)."""
        out = np.zeros((self.sizes.size, int(self.sizes.max())), dtype=np.int64)
        rows = np.repeat(np.arange(self.sizes.size), self.sizes)
        out[rows, np.arange(self.x.size) - np.repeat(self.starts, self.sizes)] = self.x
        return out


def _layout(
    b: np.ndarray, s: np.ndarray, x: np.ndarray, n_bins: int, n_strata: int, min_count: int
) -> _Layout | None:
    """Freeze everything the null keeps fixed: supported cells, used bins, canonical order.

    Within-bin permutation leaves every n_{b,t} unchanged, so supported cells and used bins
    are decided once, and bins that are not used are never permuted.
    """
    counts_all = np.bincount(b * n_strata + s, minlength=n_bins * n_strata)
    counts_all = counts_all.reshape(n_bins, n_strata)
    used = (counts_all >= min_count).sum(axis=1) >= 2
    if n_strata < 2 or not used.any():
        return None
    bin_ids = np.flatnonzero(used)
    counts = counts_all[bin_ids]
    sizes = counts.sum(axis=1)
    exponent = scale_exponent(x, b.size)
    member = used[b]
    order = np.lexsort((s[member], b[member]))  # stable: by bin, then stratum, then position
    xs = quantise(x, exponent)[member][order]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    cum = np.cumsum(counts, axis=1)[:, :-1]
    prefix = np.concatenate([[0], np.cumsum(xs)])
    totals = prefix[starts + sizes] - prefix[starts]
    observed_le = prefix[starts[:, None] + cum] - prefix[starts][:, None]
    pairs = sizes // 2
    return _Layout(
        x=xs,
        starts=starts,
        sizes=sizes.astype(np.int64),
        cum=np.ascontiguousarray(cum, dtype=np.int64),
        woff=np.concatenate([[0], np.cumsum(pairs)[:-1]]).astype(np.uint64),
        words=int(pairs.sum()),
        counts=counts,
        supported=counts >= min_count,
        totals=totals,
        bin_ids=bin_ids,
        exponent=exponent,
        observed_le=observed_le,
    )


def _statistic(le: np.ndarray, layout: _Layout, statistic: Statistic) -> np.ndarray:
    """T for each row of sums-below-boundaries [C, U, S-1] (compiled or numpy, same bits)."""
    import routeaudit.stats._kernels as _kernels

    weighted = statistic == "weighted_gap"
    if _kernels.available():
        out = np.empty(le.shape[0])
        _kernels.perm_statistic(
            np.ascontiguousarray(le), layout.totals, layout.counts, layout.supported,
            layout.exponent, weighted, out,
        )
        return out
    return _kernels.perm_statistic_numpy(
        le, layout.totals, layout.counts, layout.supported, layout.exponent, weighted
    )


def _null_chunk(
    key: int,
    key2: int,
    rows: int,
    row0: int,
    layout: _Layout,
    statistic: Statistic,
    device: torch.device | None,
) -> np.ndarray:
    """T* for permutations row0 .. row0 + rows - 1 (each a function of its index only)."""
    import routeaudit.stats._kernels as _kernels

    bits = _kernels.DRAW_BITS
    if int(layout.sizes.max()) > 1 << bits:
        raise ValueError(f"a bin of {int(layout.sizes.max())} examples needs more than {bits}-bit draws")
    args = (layout.cum, key, key2, layout.words, layout.woff, row0, rows, bits)
    if device is not None:
        le = _kernels.perm_le_torch(layout.x_pad, layout.sizes, *args, device)
    elif _kernels.available():
        le = np.empty((rows, layout.sizes.size, layout.cum.shape[1]), dtype=np.int64)
        _kernels.threads()  # (lane group, bin) pairs over OMP_NUM_THREADS threads, same sums
        _kernels.perm_le(
            layout.x, layout.starts, layout.sizes, layout.cum, np.uint64(key), np.uint64(key2),
            np.uint64(layout.words), layout.woff, row0, rows, bits, le,
        )
    else:
        le = _kernels.perm_le_numpy(layout.x_pad, layout.sizes, *args)
    return _statistic(le, layout, statistic)


def _default_chunk(layout: _Layout, device: torch.device | None) -> int:
    import routeaudit.stats._kernels as _kernels

    bins = layout.sizes.size
    if device is not None:
        return max(1, _DEVICE_CHUNK // bins)
    if _kernels.available():
        lanes = _kernels.LANES
        return lanes * max(1, _COMPILED_CHUNK // int(layout.x.size) // lanes)
    return max(1, _NUMPY_CHUNK // bins)


def within_bin_permutation_test(
    bin_idx: np.ndarray,
    strata: np.ndarray,
    residual: np.ndarray,
    *,
    n_bins: int,
    n_strata: int,
    n_permutations: int = 9999,
    rng: np.random.Generator | int,
    min_count: int = 5,
    statistic: Statistic = "weighted_gap",
    sequential_h: int | None = None,
    chunk_size: int | None = None,
    device: DeviceLike = None,
) -> PermutationResult:
    """Within-confidence-bin routing-permutation test of Y ⟂ R | C (docs/methods.md §2.5).

    Stratum labels are permuted among the members of each confidence bin, independently per
    bin and per permutation (uniform permutations, not a subgroup), and T (the weighted gap,
    or the max gap) is recomputed. p = (1 + #{T* >= T}) / (1 + B) (Phipson & Smyth 2010), never
    0. "T* >= T" allows a relative tolerance, T* >= T - 1e-12 * max(1, |T|), so that
    permutations which reproduce the observed gaps up to rounding count as ties, as they
    should. (The engine's integer cell sums already make such ties exact; the tolerance is a
    guard, not a fudge.)

    Sequential stopping (Besag & Clifford 1991) with ``sequential_h=h``: draw permutations in
    order and stop at the first L where h exceedances have been seen; then p = h / L, which
    is a valid p-value. If all B permutations are drawn with fewer than h exceedances, p is the
    usual (1 + #) / (1 + B). Clear non-rejections stop after about h / p draws. L is found
    exactly inside a chunk, so the result does not depend on ``chunk_size``. ``sequential_h``
    None or 0 draws all B. The null mean stays unbiased under stopping: it averages the draws
    before the h-th exceedance (:func:`null_mean_draws`), and ``null_mean_var`` is its Monte
    Carlo variance, which callers add to any variance of an effect built on the null mean.

    Determinism: two 64-bit words of ``rng`` key a counter-based stream in which permutation k
    has its own block, so the same seed gives bit-identical results for any ``chunk_size``,
    on any device, and with or without numba (the generator always advances by exactly two
    words).

    ``device``: None or "cpu" runs the compiled kernels (numba) on the CPU, or their numpy
    twin where numba is unavailable; a GPU device ("cuda") runs the same loop in torch.
    ``chunk_size`` is the number of permutations processed at once; the default keeps a
    chunk to a few milliseconds of work on CPU.

    If no bin has two strata with ``min_count`` examples, nothing can be tested: the result
    has NaN statistic and p-value and no permutations.
    """
    b, s, x = check_cells(bin_idx, strata, residual, n_bins, n_strata, min_count)
    if statistic not in ("weighted_gap", "max_gap"):
        raise ValueError(f"statistic must be 'weighted_gap' or 'max_gap', not {statistic!r}")
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    if sequential_h is not None and int(sequential_h) < 0:
        raise ValueError(f"sequential_h must be >= 1 (or 0 / None: off), got {sequential_h}")
    sequential_h = int(sequential_h) if sequential_h else None
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    gen = as_generator(rng)
    layout = _layout(b, s, x, n_bins, n_strata, min_count)
    if layout is None:
        return PermutationResult(
            statistic=np.nan, p_value=np.nan, n_permutations=0, exceedances=0, null_mean=np.nan,
            null_sd=np.nan, null_mean_var=np.nan, stopped_early=False,
            null=np.zeros(0, dtype=np.float64),
        )
    dev = _backend.torch_device(device)
    observed = _statistic(layout.observed_le[None], layout, statistic)[0]
    threshold = observed - 1e-12 * max(1.0, abs(observed))
    key, key2 = (int(w) for w in gen.bit_generator.random_raw(2))
    total = int(n_permutations)
    chunk = int(chunk_size) if chunk_size else _default_chunk(layout, dev)
    null = np.empty(total, dtype=np.float64)
    exceed = 0
    drawn = total
    reached_h = False
    for row0 in range(0, total, chunk):  # chunks of permutations, each fully vectorised
        rows = min(chunk, total - row0)
        values = _null_chunk(key, key2, rows, row0, layout, statistic, dev)
        null[row0 : row0 + rows] = values
        hits = values >= threshold
        if sequential_h is not None:
            running = exceed + np.cumsum(hits)
            reached = np.flatnonzero(running >= sequential_h)
            if reached.size:
                drawn = row0 + int(reached[0]) + 1
                exceed = int(sequential_h)
                reached_h = True
                break
        exceed += int(hits.sum())
    null = null[:drawn]
    # Besag-Clifford h / L once h exceedances are reached, else Phipson-Smyth (1 + k) / (1 + B)
    p_value = exceed / drawn if reached_h else (1 + exceed) / (1 + drawn)
    used = null[: null_mean_draws(drawn, reached_h)]
    spread = used if used.size > 1 else null  # h <= 2 may leave one draw: all L estimate sd
    sd = float(spread.std(ddof=1)) if spread.size > 1 else np.nan
    return PermutationResult(
        statistic=float(observed),
        p_value=float(p_value),
        n_permutations=int(drawn),
        exceedances=int(exceed),
        null_mean=float(used.mean()),
        null_sd=sd,
        null_mean_var=sd * sd / used.size,
        stopped_early=bool(drawn < total),
        null=null,
    )


def null_mean_draws(drawn: int, reached_h: bool) -> int:
    """How many leading draws the unbiased null mean averages (docs/methods.md §2.5).

    Under Besag-Clifford stopping the L drawn T* are not a plain sample: the last one is
    always an exceedance, so their mean is biased upward (by about (E[T* | T* >= T] - E[T*]) / L,
    large when L ~ h / p is small). Given that the h-th exceedance fell at draw L, the first
    L - 1 draws are exchangeable, so E[T*_1 | L, the first L - 1 as a set, T*_L] is their mean:
    the Rao-Blackwellised T*_1, unbiased for E[T*]. (For L = 1, with h = 1, it is T*_1 itself.)
    When the h-th exceedance never came, the event "fewer than h in all B" is symmetric in all
    B draws and their mean is the estimate, as without stopping.
    """
    return max(1, drawn - 1) if reached_h else drawn
