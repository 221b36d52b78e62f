"""Across seeds: the stability rule a claim must meet, and per-seed summaries.

A claim is decided per seed (each seed redraws the calibration/evaluation split, or is a
trained replicate); ``stable`` says whether it holds across them (docs/methods.md §5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["STABILITY_RULES", "need_text", "seed_summary", "stable"]

#: ``all``: the claim must hold in every seed; ``majority``: in more than half of them.
STABILITY_RULES = ("all", "majority")


def stable(flags: Sequence[bool], rule: str) -> bool:
    """The seed-stability rule: every seed (``all``) or more than half (``majority``)."""
    if not flags:
        return False
    if rule == "all":
        return all(flags)
    if rule == "majority":
        return sum(flags) * 2 > len(flags)
    raise ValueError(f"stability must be 'all' or 'majority', not {rule!r}")


def need_text(rule: str) -> str:
    """How the rule reads in a reason: "every seed" or "a majority of seeds"."""
    return "every seed" if rule == "all" else "a majority of seeds"


def seed_summary(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean, sd (ddof = 1; NaN for a single seed), min, max and n of per-seed values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = int(v.size)
    if n == 0:
        return {"mean": np.nan, "sd": np.nan, "min": np.nan, "max": np.nan, "n": 0}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if n > 1 else np.nan,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": n,
    }
