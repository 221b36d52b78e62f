"""Partitions of the evaluation data: confidence bins, routing strata, the cal/eval split.

These are the conditioning sets of every matched-confidence statistic (docs/methods.md §2.4,
§5). Each is a pure function of the data and, for the split, a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from routeaudit.metrics import bin_indices, quantile_tiles
from routeaudit.stats.rng import rng_for

__all__ = [
    "MatchedPartition",
    "confidence_bins",
    "matched_partition",
    "quantile_strata",
    "stratified_split",
    "within_bin_strata",
]

#: Global quantile strata of a summary (docs/methods.md §2.3): the same cut rule as the
#: worst-tertile metric, so they are one function.
quantile_strata = quantile_tiles


def confidence_bins(
    conf: np.ndarray,
    n_bins: int = 15,
    strategy: Literal["equal_mass", "equal_width"] = "equal_mass",
) -> np.ndarray:
    """Confidence-bin label (0..n_bins-1) per example, with the (lo, hi] rule of §2.2.

    ``equal_width`` uses edges linspace(0, 1, n_bins + 1); ``equal_mass`` uses
    ``np.quantile`` edges. A value on an edge goes to the lower bin and the first bin is
    closed at its lower end, so c = 0 lands in bin 0 and c = 1 in the last bin. With tied
    confidences some equal-mass bins can be empty; that is intended, not an error.
    """
    c = np.asarray(conf, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"conf must be 1-D, got shape {c.shape}")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not np.isfinite(c).all():
        raise ValueError("conf contains NaN or inf")
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if strategy not in ("equal_mass", "equal_width"):
        raise ValueError(f"strategy must be 'equal_mass' or 'equal_width', not {strategy!r}")
    if strategy == "equal_width" and (c.min() < 0.0 or c.max() > 1.0):
        raise ValueError("equal_width bins need confidences in [0, 1]")
    # one binning rule for the whole package: metrics.bin_indices, (lo, hi] closure
    return bin_indices(c, int(n_bins), closed="right", strategy=strategy)


def within_bin_strata(bin_idx: np.ndarray, r: np.ndarray, n_strata: int = 3) -> np.ndarray:
    """Quantile strata of a routing summary computed inside each confidence bin.

    Stratum of example i in bin b: ``min(k - 1, floor(k * m_i / n_b))`` where m_i is the number
    of members of b with a strictly smaller value (the min-rank), so tied values always share a
    stratum (the lower one, as the global rule does). The labels depend only on the multiset of
    values in the bin and their order, so permuting r inside a bin permutes the labels: the
    within-bin permutation null stays exact. One lexsort, no loop over bins.
    """
    b = np.asarray(bin_idx, dtype=np.int64)
    x = np.asarray(r, dtype=np.float64)
    if b.shape != x.shape or x.ndim != 1:
        raise ValueError(f"bin_idx and r must be 1-D of equal length: {b.shape} vs {x.shape}")
    if int(n_strata) < 1:
        raise ValueError(f"n_strata must be >= 1, got {n_strata}")
    if not np.isfinite(x).all():
        raise ValueError("r contains NaN or inf")
    n = x.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((x, b))
    sb, sx = b[order], x[order]
    new_bin = np.r_[True, sb[1:] != sb[:-1]]
    new_value = new_bin | np.r_[True, sx[1:] != sx[:-1]]
    position = np.arange(n)
    bin_start = np.maximum.accumulate(np.where(new_bin, position, 0))
    tie_start = np.maximum.accumulate(np.where(new_value, position, 0))
    counts = np.bincount(sb, minlength=int(sb.max()) + 1)[sb]
    below = tie_start - bin_start
    out = np.empty(n, dtype=np.int64)
    out[order] = np.minimum(int(n_strata) - 1, (int(n_strata) * below) // counts)
    return out


def stratified_split(confidence: np.ndarray, correct: np.ndarray, seed: int,
                     *, n_conf_groups: int = 10, groups: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A 50/50 calibration/evaluation split, stratified by correctness × confidence decile.

    Stratifying on what the audits condition on keeps the two halves comparable, so a
    calibrator fitted on one half is evaluated on data with the same confidence profile.

    With ``groups`` (the sequence of each token) whole groups go to one half, stratified by
    the decile of their mean confidence: tokens of one sequence share context, so a split
    that put some in each half would let a calibrator see its evaluation sequences. Without
    groups the result is unchanged from earlier releases (one random key per example).
    """
    n = confidence.shape[0]
    rng = rng_for("split", seed)
    if groups is None:
        stratum = _decile(confidence, n_conf_groups) * 2 + correct.astype(np.int64)
        to_cal = _alternate(stratum, rng)
        return np.flatnonzero(to_cal), np.flatnonzero(~to_cal)
    g = np.asarray(groups).reshape(-1)
    if g.size != n:
        raise ValueError(f"groups has {g.size} entries for {n} examples")
    _, inverse = np.unique(g, return_inverse=True)
    size = np.bincount(inverse).astype(np.float64)
    mean_conf = np.bincount(inverse, weights=np.asarray(confidence, dtype=np.float64)) / size
    to_cal = _alternate(_decile(mean_conf, n_conf_groups), rng)[inverse]
    return np.flatnonzero(to_cal), np.flatnonzero(~to_cal)


def _decile(values: np.ndarray, n_groups: int) -> np.ndarray:
    n = values.shape[0]
    order = np.argsort(values, kind="stable")
    decile = np.empty(n, dtype=np.int64)
    decile[order] = (np.arange(n) * n_groups) // max(n, 1)
    return decile


def _alternate(stratum: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """True for the calibration half: within each stratum, in a random order, units
    alternate between the halves, starting at a random side per stratum."""
    n = stratum.shape[0]
    key = rng.random(n)
    order = np.lexsort((key, stratum))
    position = np.empty(n, dtype=np.int64)
    sorted_stratum = stratum[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_stratum)) + 1]
    counts = np.diff(np.r_[starts, n])
    position[order] = np.arange(n) - np.repeat(starts, counts)
    flip = rng.integers(0, 2, size=int(stratum.max()) + 1)
    return ((position + flip[stratum]) % 2) == 0


@dataclass(frozen=True)
class MatchedPartition:
    """Bins, strata and residuals of one (seed, summary): the input of §2.4 and §2.5."""

    bin_idx: np.ndarray
    strata: np.ndarray
    residual: np.ndarray  # y − c
    n_bins: int
    n_strata: int
    no_variation: str | None  # why the summary cannot carry signal, or None

    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(bin_idx, strata, residual)``, the positional arguments of the gap kernels."""
        return self.bin_idx, self.strata, self.residual


def matched_partition(
    conf: np.ndarray,
    correct: np.ndarray,
    summary: np.ndarray,
    *,
    name: str = "summary",
    n_bins: int = 15,
    bin_strategy: Literal["equal_mass", "equal_width"] = "equal_mass",
    strata: Literal["within_bin", "global"] = "within_bin",
    n_strata: int = 3,
) -> MatchedPartition:
    """Confidence bins, routing strata of ``summary`` and residuals y − c (docs/methods.md §2.4).

    ``strata="within_bin"`` (the default) cuts the summary into quantile strata inside each
    confidence bin, ``"global"`` over all examples. ``no_variation`` says why the summary
    cannot carry signal (it is constant, or its strata collapse to one), else None.
    """
    r = np.asarray(summary)
    if r.ndim != 1:
        raise ValueError(f"summary {name!r} is a profile; matched audits need a scalar summary")
    bin_idx = confidence_bins(conf, n_bins, strategy=bin_strategy)
    if strata == "within_bin":
        labels = within_bin_strata(bin_idx, r, n_strata)
    elif strata == "global":
        labels = quantile_strata(r, n_strata)
    else:
        raise ValueError(f"strata must be 'within_bin' or 'global', not {strata!r}")
    spread = float(np.ptp(r)) if r.size else 0.0
    no_variation = None
    if spread <= 1e-12 * max(1.0, float(np.abs(r).max(initial=0.0))):
        no_variation = (f"no routing variation: {name} is constant ({float(r[0]):.6g}) across "
                        f"all {r.size} evaluation examples (frozen routing)")
    elif np.unique(labels).size < 2:
        no_variation = (f"no routing variation: {name} takes one value for all but a few "
                        "examples, so its quantile strata collapse to one")
    return MatchedPartition(bin_idx, labels, correct - conf, n_bins, n_strata, no_variation)
