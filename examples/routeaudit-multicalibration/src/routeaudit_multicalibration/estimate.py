"""Bounds on one group's ECE15, pooled over seeds: the statistics of ``multicalibration``.

The plug-in ECE15 (``routeaudit.metrics.ece``, 15 equal-width (lo, hi] bins) is biased
upward by noise, and on a group of a few hundred examples the bias is as large as any
practical tolerance, so neither "plug-in ± se" bound means what it says. As in
routeaudit's ``expert_calibration`` (docs/methods.md §4.3), each bound uses an estimator
whose bias is known in sign. With S_b the residual sum Σ (c − y) of bin b, σ_b its standard
deviation and the noise scale s = Σ_b σ_b / n:

* **upper bound** (decides pass): in the normal approximation the plug-in U has
  E U ≥ s·f(ECE / s), f(x) = E|x + Z| (convex, increasing), with equality when every bin is
  equally far from calibrated. So U + z·se below s·f(tol / s) shows ECE < tol at level α,
  and the upper bound is the ECE where that test stops rejecting: s·f⁻¹((U + z·se) / s).
* **lower bound** (decides fail): L = U − √(2/π)·s has E L ≤ ECE bin by bin, so
  L − z·se above tol shows ECE > tol.

Standard errors are analytic: |·| is 1-Lipschitz, so Var(U) ≤ Σ_b σ_b² / n² (conservative;
sums over resampling units for token traces, so whole sequences count as one draw). Seeds
redraw the split of the same examples and are pooled with
``routeaudit.stats.evidence.pool_seeds`` (within-seed variance not divided by the number of
seeds). Using the mean noise scale over seeds is conservative too: s·f(t / s) is convex in s.
The folded-normal helpers are routeaudit's own (those behind ``expert_calibration``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from statistics import NormalDist

import numpy as np
from routeaudit import metrics
from routeaudit.stats.evidence import Evidence, pool_seeds
from routeaudit.stats.folded import boundary_mean, fold_inverse, fold_mean

#: Bins of the ECE (ECE15, as every calibration claim of routeaudit).
N_BINS = 15
#: E|Z| for a standard normal: the noise floor of |S_b| in units of its sd.
FOLD = float(fold_mean(0.0))


@dataclass(frozen=True)
class SeedEstimate:
    """One group in one seed's evaluation half."""

    n: int
    upper: float
    """Plug-in ECE15 (biased upward)."""
    noise: float
    """Noise scale s = Σ_b σ_b / n."""
    var: float
    """Conservative sampling variance of the plug-in (and of the lower estimate)."""

    @property
    def lower(self) -> float:
        """Noise-subtracted ECE15 (biased downward)."""
        return self.upper - FOLD * self.noise


def estimate(conf: np.ndarray, correct: np.ndarray, units: np.ndarray | None = None
             ) -> SeedEstimate:
    """The plug-in ECE15 of a group and its noise; ``units`` are the resampling units
    (e.g. sequences of token-level traces), None when every example is its own."""
    n = int(conf.size)
    upper = metrics.ece(conf, correct, N_BINS)
    bins = metrics.bin_indices(conf, N_BINS)
    residual = conf - correct
    s = np.bincount(bins, residual, N_BINS)
    if units is None:
        n_units, q = n, np.bincount(bins, residual * residual, N_BINS)
    else:
        _, unit = np.unique(units, return_inverse=True)
        n_units = int(unit.max()) + 1
        per_unit = np.bincount(unit * N_BINS + bins, residual, n_units * N_BINS)
        q = (per_unit.reshape(n_units, N_BINS) ** 2).sum(axis=0)
    sd = np.sqrt(np.maximum(q - s * s / max(n_units, 1), 0.0))
    return SeedEstimate(n, float(upper), float(sd.sum() / n), float((sd * sd).sum() / n**2))


@dataclass(frozen=True)
class GroupBounds:
    """One group's ECE15 pooled over seeds, against the tolerance ``tol`` at level ``alpha``."""

    label: str
    seeds: tuple[SeedEstimate, ...]
    tol: float
    alpha: float

    @property
    def n(self) -> int:
        """The group's smallest size over the seeds."""
        return min(s.n for s in self.seeds)

    @cached_property
    def z(self) -> float:
        return NormalDist().inv_cdf(1.0 - self.alpha)

    @cached_property
    def noise(self) -> float:
        return float(np.mean([s.noise for s in self.seeds]))

    @cached_property
    def shows(self) -> Evidence:
        """Evidence that ECE < tol: the plug-in's distance below its least-favourable mean."""
        boundary = float(boundary_mean(self.tol, self.noise))
        return pool_seeds([boundary - s.upper for s in self.seeds], [s.var for s in self.seeds])

    @cached_property
    def refutes(self) -> Evidence:
        """Evidence that ECE > tol: the noise-subtracted lower estimate's excess over tol."""
        return pool_seeds([s.lower - self.tol for s in self.seeds], [s.var for s in self.seeds])

    @property
    def upper(self) -> float:
        return float(np.mean([s.upper for s in self.seeds]))

    @property
    def lower(self) -> float:
        return self.tol + self.refutes.estimate

    @property
    def point(self) -> float:
        """Debiased ECE15: s·f⁻¹(U / s), between the lower and the plug-in estimate."""
        value = self._invert(self.upper)
        return float(min(max(value, self.lower, 0.0), self.upper))

    @property
    def ucb(self) -> float:
        """Upper confidence bound: pass (before any multiplicity correction) iff < tol."""
        return self._invert(self.upper + self.z * self.shows.se)

    @property
    def lcb(self) -> float:
        """Lower confidence bound: the group refutes the claim (uncorrected) iff > tol."""
        return max(self.lower - self.z * self.refutes.se, 0.0)

    def p_pass(self) -> float:
        """One-sided p-value of H0: ECE ≥ tol."""
        return self.shows.p_positive()

    def p_fail(self) -> float:
        """One-sided p-value of H0: ECE ≤ tol."""
        return self.refutes.p_positive()

    def stable(self, rule: str) -> bool:
        """The plug-in lies below its boundary in every seed (or a majority)."""
        return self.shows.sign_stable(rule)

    def directed(self) -> Evidence:
        """The slack tol − ECE with the se that makes its 1 − 2α bound the decisive test's
        bound, for ``routeaudit.stats.evidence.scale_text`` (how much more data decides)."""
        slack = self.tol - self.point
        toward_pass = slack > 0
        distance = (self.ucb - self.point) if toward_pass else (self.point - self.lcb)
        se = max(distance, 0.0) / self.z
        ev = self.shows if toward_pass else self.refutes
        share = ev.within_se / ev.se if ev.se > 0 else 1.0
        return Evidence(slack, se, ev.per_seed, se * share, ev.between_sd)

    def _invert(self, plug_in: float) -> float:
        s = self.noise
        if not math.isfinite(plug_in):
            return float("nan")
        return float(s * fold_inverse(plug_in / s)) if s > 0 else plug_in

    def as_dict(self, digits: int = 6) -> dict[str, object]:
        """The numbers a verdict records for this group (small, JSON-ready)."""
        r = lambda v: round(float(v), digits)  # noqa: E731
        return {"group": self.label, "n": self.n, "ece": r(self.point), "ece_plugin": r(self.upper),
                "ece_lower": r(self.lower), "interval": [r(self.lcb), r(self.ucb)],
                "p_pass": r(self.p_pass()), "p_fail": r(self.p_fail())}
