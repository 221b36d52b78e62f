"""The excess matched-confidence gap of one (seed, summary): the effect size behind both
``stratification`` and ``permutation_null`` (docs/methods.md §2.4, §2.5, §5.2).

The weighted gap is positive even when routing carries nothing, so the effect is its excess
over the within-bin null mean (the mean of the permutation distribution). Its sampling
variance is the bootstrap variance of the weighted gap over evaluation examples (partition
held fixed) plus the Monte Carlo variance of the null mean, which is estimated from finitely
many permutations, and from few when Besag-Clifford stopping ends the test early.
One computation serves both audits: the permutation test gives the p-value and the null
mean, the bootstrap the spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from routeaudit.stats._backend import DeviceLike
from routeaudit.stats.bootstrap import bootstrap_gap
from routeaudit.stats.evidence import Evidence, pool_seeds
from routeaudit.stats.gaps import gap_statistics
from routeaudit.stats.partitions import MatchedPartition
from routeaudit.stats.permutation import PermutationResult, within_bin_permutation_test

__all__ = ["MatchedExcess", "Undecided", "excess_interval", "excess_row", "matched_excess", "pooled_excess"]


@dataclass(frozen=True)
class MatchedExcess:
    """The permutation test and the excess gap, with its spread (bootstrap and Monte Carlo)."""

    test: PermutationResult
    weighted_gap: float
    max_gap: float
    bins_used: int
    excess: float
    """Weighted gap minus its within-bin null mean (NaN when no bin is usable)."""
    variance: float
    """Bootstrap variance of the weighted gap plus the Monte Carlo variance of the null mean
    (``test.null_mean_var``): the two are independent (own random streams)."""
    replicates: np.ndarray
    bootstrap_variance: float
    """The bootstrap part of ``variance``."""

    @property
    def usable(self) -> bool:
        return bool(np.isfinite(self.excess))


def matched_excess(part: MatchedPartition, *, n_permutations: int, n_boot: int, min_count: int,
                   rng_null: np.random.Generator, rng_boot: np.random.Generator,
                   sequential_h: int | None = None, device: DeviceLike = None,
                   groups: np.ndarray | None = None) -> MatchedExcess:
    """Permutation test, observed gaps and bootstrap of one matched partition (the
    bootstrap resamples whole ``groups``, e.g. sequences of tokens, when given).
    ``sequential_h``: Besag-Clifford stopping of the test (None or 0: all permutations); the
    excess stays unbiased and its variance counts the null mean's Monte Carlo error."""
    kw = dict(n_bins=part.n_bins, n_strata=part.n_strata, min_count=min_count)
    gaps = gap_statistics(*part.cells(), **kw)
    test = within_bin_permutation_test(*part.cells(), **kw, n_permutations=n_permutations,
                                       rng=rng_null, sequential_h=sequential_h, device=device)
    if not np.isfinite(gaps.weighted_gap):
        return MatchedExcess(test, gaps.weighted_gap, gaps.max_gap, gaps.n_used, float("nan"),
                             float("nan"), np.zeros(0), float("nan"))
    _, _, replicates = bootstrap_gap(*part.cells(), **kw, n_boot=n_boot, device=device,
                                     rng=rng_boot, groups=groups)
    finite = replicates[np.isfinite(replicates)]
    variance = float(np.var(finite, ddof=1)) if finite.size > 1 else float("nan")
    return MatchedExcess(test, gaps.weighted_gap, gaps.max_gap, gaps.n_used,
                         float(gaps.weighted_gap - test.null_mean), variance + test.null_mean_var,
                         replicates, variance)


def excess_interval(excess: float, replicates: np.ndarray, level: float,
                    null_mean_var: float = 0.0) -> tuple[float, float]:
    """Basic-bootstrap interval of the excess, with the bias handled once, by the null mean,
    widened for the Monte Carlo error of the null mean (``null_mean_var``).

    The max-minus-min gap is biased upward by noise, and resampling inflates that bias again:
    the replicates sit above the estimate. The excess already removes the bias (it subtracts
    the within-bin null mean), so only the *spread* of the replicates around their own mean is
    used, reflected around the excess; reflecting around the raw gap as well would correct the
    bias twice and make the interval useless. The null mean's own error is independent of the
    bootstrap's, so the centred replicates are scaled by √((s² + null_mean_var) / s²), s² their
    variance: the interval keeps the bootstrap's shape and has the variance of ``variance``.
    (With s² = 0 the normal interval of ``null_mean_var`` alone is used.)
    """
    v = np.asarray(replicates, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or not np.isfinite(null_mean_var) or null_mean_var < 0:
        return (np.nan, np.nan)
    tail = (1.0 - level) / 2.0
    centred = v - v.mean()
    boot_var = float(np.var(v, ddof=1))
    if boot_var > 0:
        lo, hi = np.quantile(centred * np.sqrt((boot_var + null_mean_var) / boot_var),
                             [tail, 1.0 - tail])
    else:
        half = NormalDist().inv_cdf(1.0 - tail) * float(np.sqrt(null_mean_var))
        lo, hi = -half, half
    return (float(excess - hi), float(excess - lo))


@dataclass(frozen=True)
class Undecided:
    """Why the seeds' excesses cannot be pooled: the summary does not vary (the claim's
    premise fails, ``premise_violated``), or some seed has too little data."""

    reason: str
    premise_violated: bool


def pooled_excess(rows: list[MatchedExcess | str]) -> Evidence | Undecided:
    """The seeds' excesses pooled (:func:`~routeaudit.stats.evidence.pool_seeds`); a row
    that is a string is the reason the summary cannot carry signal."""
    for row in rows:
        if isinstance(row, str):
            return Undecided(row, premise_violated=True)
    for seed, row in enumerate(rows):
        if not row.usable:
            return Undecided(f"too little data in seed {seed}: no confidence bin has ≥ 2 "
                             "strata with enough examples", premise_violated=False)
    return pool_seeds([r.excess for r in rows], [r.variance for r in rows])  # type: ignore[union-attr]


def excess_row(row: MatchedExcess | str, alpha: float) -> dict[str, Any]:
    """One seed's numbers for a verdict's ``per_seed`` (its interval at level 1 − 2α)."""
    if isinstance(row, str):
        return {"reason": row}
    entry: dict[str, Any] = {"weighted_gap": row.weighted_gap, "max_gap": row.max_gap,
                             "null_mean": row.test.null_mean, "excess": row.excess,
                             "bins_used": row.bins_used, "p_value": row.test.p_value,
                             "n_permutations": row.test.n_permutations,
                             "stopped_early": row.test.stopped_early,
                             "null_mean_sd": float(np.sqrt(row.test.null_mean_var))}
    if row.usable:
        entry["bootstrap_sd"] = float(np.sqrt(row.bootstrap_variance))
        entry["ci"] = list(excess_interval(row.excess, row.replicates, 1 - 2 * alpha,
                                           row.test.null_mean_var))
    return entry
