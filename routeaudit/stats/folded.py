"""The folded normal behind debiased ECE bounds: E|x + Z| and its inverse.

A plug-in ECE is a sum of |bias + noise| terms; for a configuration whose every bin sits
the same number of standard errors from calibrated, its expectation is noise·f(ece / noise)
with f(x) = E|x + Z|, Z ~ N(0, 1). ``expert_calibration`` (and plugins that bound an ECE the
same way) debias and bound with these, so they live here once.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["FOLD_AT_ZERO", "boundary_mean", "fold_inverse", "fold_mean"]

#: f(0) = E|Z| = √(2/π).
FOLD_AT_ZERO = math.sqrt(2.0 / math.pi)
_FOLD = FOLD_AT_ZERO

_erf = np.vectorize(math.erf, otypes=[float])


def fold_mean(x: np.ndarray | float) -> np.ndarray:
    """f(x) = E|x + Z| for x ≥ 0: √(2/π) e^{−x²/2} + x·erf(x/√2) (convex, increasing)."""
    x = np.asarray(x, dtype=np.float64)
    return _FOLD * np.exp(-0.5 * x * x) + x * _erf(x / math.sqrt(2.0))


def fold_inverse(y: np.ndarray | float) -> np.ndarray:
    """x ≥ 0 with f(x) = y (0 when y ≤ √(2/π)): Newton from x = y, which lies right of the
    root (f(x) ≥ x), so the iterates decrease monotonically onto it."""
    y = np.asarray(y, dtype=np.float64)
    live = y > _FOLD
    x = np.where(live, y, 0.0)
    for _ in range(60):  # a fixed number of rounds, vectorised
        slope = np.maximum(_erf(x / math.sqrt(2.0)), 1e-300)
        x = np.where(live, np.maximum(x - (fold_mean(x) - y) / slope, 0.0), 0.0)
    return x


def boundary_mean(ece: np.ndarray | float, noise: np.ndarray | float) -> np.ndarray:
    """The smallest expected plug-in ECE among configurations with this ECE: noise·f(ece /
    noise) (every bin equally far from calibrated, in units of its sd); ``ece`` when the
    noise scale is 0."""
    e = np.asarray(ece, dtype=np.float64)
    s = np.asarray(noise, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, s * fold_mean(np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)),
                        e)
