"""Matched-confidence gap statistics (docs/methods.md §2.4) and their exact fixed-point form.

``gap_statistics`` computes the weighted and max gap of one labelling in float64. The
permutation null and the bootstrap need the same statistic for thousands of labellings or
weightings at once; they quantise the residuals once to fixed point (:func:`quantise`,
``round(x * 2**K)`` with ``K`` from :func:`scale_exponent` as large as int64 allows for the
sample: resolution about ``max|x| * N * 2**-62``, i.e. 4e-15 for N = 1e4), sum cells in int64
and turn the sums into gaps with :func:`gap_from_cells`. Integer addition is associative, so
every replicate's statistic is bit-identical whatever the chunk size, summation order or
device. The two paths agree to ~1e-14.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GapResult", "gap_statistics", "stratum_reliability"]


@dataclass(frozen=True)
class GapResult:
    """Matched-confidence gaps of one (bins, strata, residual) triple (docs/methods.md §2.4)."""

    weighted_gap: float
    max_gap: float
    bin_gaps: np.ndarray = field(repr=False)  # Δ_b; NaN where the bin is not used
    used_bins: np.ndarray = field(repr=False)  # bool per bin: ≥ 2 strata with ≥ min_count
    n_used: int = 0


def check_cells(
    bin_idx: np.ndarray,
    strata: np.ndarray,
    residual: np.ndarray,
    n_bins: int,
    n_strata: int,
    min_count: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = np.asarray(bin_idx)
    s = np.asarray(strata)
    x = np.asarray(residual, dtype=np.float64)
    if b.ndim != 1 or s.ndim != 1 or x.ndim != 1:
        raise ValueError("bin_idx, strata and residual must be 1-D")
    if not (b.shape == s.shape == x.shape):
        raise ValueError(f"length mismatch: bins {b.shape}, strata {s.shape}, residual {x.shape}")
    for name, arr, hi in (("bin_idx", b, n_bins), ("strata", s, n_strata)):
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name} must be integer labels, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= hi):
            raise ValueError(f"{name} out of range [0, {hi})")
    if int(n_bins) < 1 or int(n_strata) < 1:
        raise ValueError("n_bins and n_strata must be >= 1")
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not np.isfinite(x).all():
        raise ValueError("residual contains NaN or inf")
    return b.astype(np.int64), s.astype(np.int64), x


def gap_from_cells(
    sums: np.ndarray, counts: np.ndarray, min_count: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """WG, MG, Δ_b and the used-bin mask from per-(bin, stratum) sums and counts.

    ``sums`` is [..., n_bins, n_strata]; ``counts`` broadcasts to it (fixed counts for the
    permutation null, per-replicate weighted counts for the bootstrap). The one place where
    the §2.4 formula is written, so every caller computes it in the same floating-point order.
    """
    supported = counts >= min_count
    with np.errstate(invalid="ignore", divide="ignore"):
        g = sums / counts
    hi = np.where(supported, g, -np.inf).max(axis=-1)
    lo = np.where(supported, g, np.inf).min(axis=-1)
    used = supported.sum(axis=-1) >= 2
    delta = np.where(used, hi - lo, 0.0)
    # n_b counts every example of the bin, supported strata or not (see gap_statistics)
    weight = np.where(used, counts.sum(axis=-1), 0)
    total = weight.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        wg = (weight * delta).sum(axis=-1) / total
    wg = np.where(total > 0, wg, np.nan)
    mg = np.where(used, delta, -np.inf).max(axis=-1)
    mg = np.where(used.any(axis=-1), mg, np.nan)
    return wg, mg, np.where(used, delta, np.nan), used


def gap_statistics(
    bin_idx: np.ndarray,
    strata: np.ndarray,
    residual: np.ndarray,
    *,
    n_bins: int,
    n_strata: int,
    min_count: int = 5,
) -> GapResult:
    """Weighted and max gap between routing strata at matched confidence (docs/methods.md §2.4).

    g_{b,t} is the mean residual (y - c) of bin b and stratum t, kept when n_{b,t} >= min_count;
    Δ_b = max_t g_{b,t} - min_t g_{b,t} over those strata, and a bin needs two of them to be
    used. WG = Σ_b n_b Δ_b / Σ_b n_b over used bins and MG = max_b Δ_b; both are NaN when no
    bin is used.

    The weight n_b is the bin's total count, including examples of strata too small to be
    supported: the weight says how much of the evaluation split the bin stands for, and it is
    then invariant under the within-bin permutation null (which keeps every n_{b,t}).
    """
    b, s, x = check_cells(bin_idx, strata, residual, n_bins, n_strata, min_count)
    cell = b * n_strata + s
    size = n_bins * n_strata
    counts = np.bincount(cell, minlength=size).reshape(n_bins, n_strata)
    sums = np.bincount(cell, weights=x, minlength=size).reshape(n_bins, n_strata)
    wg, mg, delta, used = gap_from_cells(sums, counts, min_count)
    return GapResult(float(wg), float(mg), delta, used, int(used.sum()))


def stratum_reliability(
    bin_idx: np.ndarray,
    strata: np.ndarray,
    confidence: np.ndarray,
    correct: np.ndarray,
    *,
    n_bins: int,
    n_strata: int,
) -> dict[str, list[float] | list[int]]:
    """Mean confidence, accuracy and count of every non-empty (bin, stratum) cell.

    The reliability diagram per routing stratum at matched confidence: the picture behind
    the gaps above (the gap of a cell is accuracy − confidence). Plain lists, rounded to 6
    decimals, so a verdict can record them (a few hundred numbers at most).
    """
    b = np.asarray(bin_idx, dtype=np.int64)
    s = np.asarray(strata, dtype=np.int64)
    cell = b * n_strata + s
    size = n_bins * n_strata
    counts = np.bincount(cell, minlength=size)
    conf_sum = np.bincount(cell, weights=np.asarray(confidence, dtype=np.float64), minlength=size)
    acc_sum = np.bincount(cell, weights=np.asarray(correct, dtype=np.float64), minlength=size)
    present = np.flatnonzero(counts)
    n = counts[present]
    return {"bin": [int(i // n_strata) for i in present],
            "stratum": [int(i % n_strata) for i in present],
            "count": [int(v) for v in n],
            "confidence": [round(float(v), 6) for v in conf_sum[present] / n],
            "accuracy": [round(float(v), 6) for v in acc_sum[present] / n]}


# --------------------------------------------------------------------------- fixed point


def scale_exponent(x: np.ndarray, n: int) -> int:
    """K such that sums of up to n values round(x * 2**K) stay below 2**62 in magnitude."""
    bound = float(np.abs(x).max(initial=0.0)) * max(n, 1)
    if bound == 0.0:
        return 0
    return 62 - math.frexp(bound)[1]


def quantise(x: np.ndarray, exponent: int) -> np.ndarray:
    return np.rint(np.ldexp(x, exponent)).astype(np.int64)
