"""Rates of simulated outcomes and their intervals: one implementation for ``routeaudit
validate`` and every study in ``benchmarks/``."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

__all__ = ["bound", "proportion_ci", "rate_text"]


def proportion_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (good coverage at rates near 0 or 1,
    where the normal interval fails; no scipy needed)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, float(centre - half)), min(1.0, float(centre + half)))


def bound(alpha: float, n: int) -> float:
    """The bound an error rate must meet in a study of n replicates: α + 2 SE."""
    return float(alpha + 2.0 * np.sqrt(alpha * (1.0 - alpha) / max(n, 1)))


def rate_text(flags: Sequence[bool]) -> str:
    """``0.050 [0.031, 0.079] (25/500)``."""
    k, n = int(sum(bool(f) for f in flags)), len(flags)
    if n == 0:
        return "n/a (0 replicates)"
    lo, hi = proportion_ci(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}] ({k}/{n})"
