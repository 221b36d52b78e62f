"""Matched-confidence cells: the shared preparation of the stratification and permutation audits.

For one seed and one routing summary: confidence bins on the evaluation split, global
quantile strata of the summary, and the residual y − c whose per-(bin, stratum) means give
the calibration gaps of methods.md §2.4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routeaudit.audit import AuditSettings, SeedData
from routeaudit.stats import confidence_bins, quantile_strata, within_bin_strata


@dataclass(frozen=True)
class MatchedCell:
    bin_idx: np.ndarray
    strata: np.ndarray
    residual: np.ndarray
    n_bins: int
    n_strata: int
    no_variation: str | None  # why the summary cannot carry signal, or None


def matched_cell(seed: SeedData, summary: str, settings: AuditSettings) -> MatchedCell:
    """Bins, strata and residuals of one (seed, summary) on the evaluation split."""
    conf, correct = seed.conf_correct("eval")
    r = seed.summary(summary, "eval")
    if r.ndim != 1:
        raise ValueError(f"summary {summary!r} is a profile; matched audits need a scalar summary")
    bin_idx = confidence_bins(conf, settings.n_bins, strategy=settings.bin_strategy)
    if settings.strata == "within_bin":
        strata = within_bin_strata(bin_idx, r, settings.n_strata)
    elif settings.strata == "global":
        strata = quantile_strata(r, settings.n_strata)
    else:
        raise ValueError(f"strata must be 'within_bin' or 'global', not {settings.strata!r}")
    spread = float(np.ptp(r)) if r.size else 0.0
    no_variation = None
    if spread <= 1e-12 * max(1.0, float(np.abs(r).max(initial=0.0))):
        no_variation = (f"no routing variation: {summary} is constant ({float(r[0]):.6g}) across "
                        f"all {r.size} evaluation examples (frozen routing)")
    elif np.unique(strata).size < 2:
        no_variation = (f"no routing variation: {summary} takes one value for all but a few "
                        "examples, so its quantile strata collapse to one")
    return MatchedCell(bin_idx, strata, correct - conf, settings.n_bins, settings.n_strata,
                       no_variation)


def stable(flags: list[bool], rule: str) -> bool:
    """The seed-stability rule: every seed (``all``) or more than half (``majority``)."""
    if not flags:
        return False
    if rule == "all":
        return all(flags)
    if rule == "majority":
        return sum(flags) * 2 > len(flags)
    raise ValueError(f"stability must be 'all' or 'majority', not {rule!r}")
