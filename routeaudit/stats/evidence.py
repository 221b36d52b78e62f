"""Evidence about an effect pooled over seeds, and the three outcomes it supports
(docs/methods.md §5.2).

Every built-in claim is "an effect θ is positive" (a gain over a control, an excess gap over
the within-bin null, a ΔNLL). Each seed gives an estimate θ̂_s and its sampling variance
v_s (from the seed's bootstrap). The seeds are not independent samples: they redraw the
split of the same examples or retrain on them. The pooled estimate is the mean θ̄ over the S
seeds, with the conservative variance

    se² = mean_s v_s + sd_s(θ̂)² / S

i.e. the within-seed variance is *not* divided by S (as if the seeds were perfectly
correlated, which they nearly are when they share the evaluation data) and the spread
between seeds (split and training noise) enters as the variance of a mean of S draws. Two
one-sided tests at level α then decide (the interval shown is the matching 1 − 2α one,
the convention of equivalence testing):

* ``pass``: θ > 0 is shown (p₊ = 1 − Φ(θ̄ / se) ≤ α) and θ̂_s > 0 in every seed (or a
  majority, ``--stability``);
* ``fail``: θ < margin is shown (p₋ = Φ((θ̄ − margin) / se) ≤ α): the effect is absent or
  below the practical margin, so the claim is refuted;
* ``inconclusive``: neither; :func:`data_needed` says about how much more evaluation data
  would decide, at 80 % power, if θ is what was estimated.

A true effect at or above the margin is refuted with probability ≤ α, and a true effect at
or below 0 passes with probability ≤ α; ``benchmarks/`` simulates both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from routeaudit.stats.seeds import stable

__all__ = ["POWER", "Evidence", "data_needed", "outcome", "p_text", "pool_seeds", "scale_text"]

_NORMAL = NormalDist()
#: The power at which :func:`data_needed` sizes a decisive study.
POWER = 0.8
#: Beyond this many times the data, "more data" is not a useful answer.
MAX_SCALE = 1000.0


@dataclass(frozen=True)
class Evidence:
    """An effect pooled over seeds: estimate, standard error and the per-seed values."""

    estimate: float
    se: float
    per_seed: tuple[float, ...]
    within_se: float
    """Root mean within-seed variance: the part that more evaluation data shrinks."""
    between_sd: float
    """sd of the per-seed estimates (0 with one seed): the part more seeds average out."""

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def n_positive(self) -> int:
        return sum(v > 0 for v in self.per_seed)

    def interval(self, alpha: float) -> tuple[float, float]:
        """The 1 − 2α interval: its ends are the two one-sided tests at level α."""
        z = _NORMAL.inv_cdf(1.0 - alpha)
        return (self.estimate - z * self.se, self.estimate + z * self.se)

    def p_positive(self) -> float:
        """One-sided p-value of H0: θ ≤ 0."""
        return _upper_tail(self.estimate, self.se)

    def p_below(self, margin: float) -> float:
        """One-sided p-value of H0: θ ≥ margin (small: θ is shown below the margin)."""
        return _upper_tail(margin - self.estimate, self.se)

    def sign_stable(self, rule: str) -> bool:
        return stable([v > 0 for v in self.per_seed], rule)

    def as_dict(self, margin: float, alpha: float) -> dict[str, Any]:
        """The numbers a verdict records in its ``evidence`` field."""
        factor, toward = data_needed(self, margin, alpha)
        return {"estimate": self.estimate, "se": self.se, "within_se": self.within_se,
                "between_sd": self.between_sd, "p_positive": self.p_positive(),
                "p_below_margin": self.p_below(margin), "margin": margin,
                "interval": list(self.interval(alpha)), "interval_level": 1 - 2 * alpha,
                "data_needed": {"factor": factor, "toward": toward}}


def _upper_tail(distance: float, se: float) -> float:
    if not np.isfinite(distance) or not np.isfinite(se):
        return float("nan")
    if se <= 0:
        return 0.0 if distance > 0 else 1.0
    return float(1.0 - _NORMAL.cdf(distance / se))


def pool_seeds(estimates: Sequence[float], variances: Sequence[float]) -> Evidence:
    """Pool per-seed estimates and their within-seed sampling variances (see the module
    docstring for why the within part is not divided by the number of seeds)."""
    est = np.asarray(estimates, dtype=np.float64).reshape(-1)
    var = np.asarray(variances, dtype=np.float64).reshape(-1)
    if est.size == 0 or est.size != var.size:
        raise ValueError(f"need one variance per estimate, got {est.size} and {var.size}")
    within = float(np.mean(var))
    between = float(np.var(est, ddof=1)) if est.size > 1 else 0.0
    se = float(np.sqrt(within + between / est.size))
    return Evidence(float(est.mean()), se, tuple(float(v) for v in est),
                    float(np.sqrt(within)), float(np.sqrt(between)))


def data_needed(evidence: Evidence, margin: float, alpha: float, power: float = POWER
                ) -> tuple[float, str]:
    """About how many times the evaluation data would decide, if the effect is as estimated.

    The nearer boundary is the one the estimate leans towards: 0 (to pass) when it sits
    above the midpoint of [0, margin], the margin (to fail) otherwise. A one-sided test at α
    reaches power ``power`` when distance / se ≥ z_{1−α} + z_{power}; se shrinks as
    1/√(data), so the factor is (that z-sum · se / distance)². Returns (factor, which
    boundary: "pass" or "fail"); the factor is inf when the estimate sits on the boundary.
    """
    toward = "pass" if evidence.estimate > margin / 2.0 else "fail"
    distance = evidence.estimate if toward == "pass" else margin - evidence.estimate
    if not np.isfinite(evidence.se) or evidence.se <= 0:
        return 1.0, toward
    if distance <= 0:
        return float("inf"), toward
    z = _NORMAL.inv_cdf(1.0 - alpha) + _NORMAL.inv_cdf(power)
    return max(1.0, float((z * evidence.se / distance) ** 2)), toward


def scale_text(evidence: Evidence, margin: float, alpha: float, n_eval: int | None = None,
               *, goals: tuple[str, str] | None = None) -> str:
    """The words of :func:`data_needed`: "about 3.2× the evaluation data (N ≈ 16,000)
    would likely show the effect positive" and, when the seeds disagree more than the data
    are noisy, that more seeds would help more. ``goals`` words the two directions
    (toward pass, toward fail) for effects that are not "the effect"."""
    factor, toward = data_needed(evidence, margin, alpha)
    up, down = goals or ("show the effect positive", f"show it below the margin {margin:g}")
    goal = up if toward == "pass" else down
    if factor <= 1.0:
        text = ("the pooled evidence is already decisive at this size; a seed that disagrees "
                "in sign is what keeps it open, and more data per seed would settle it")
    elif not np.isfinite(factor) or factor > MAX_SCALE:
        text = (f"the estimate sits at the {'zero' if toward == 'pass' else 'margin'} "
                "boundary: no feasible amount of data decides it at this effect size")
    else:
        size = f" (N_eval ≈ {round(factor * n_eval):,})" if n_eval else ""
        text = f"about {factor:.1f}× the evaluation data{size} would likely {goal}"
    between = evidence.between_sd ** 2 / max(evidence.n_seeds, 1)
    if evidence.n_seeds > 1 and between > evidence.within_se ** 2:
        text += "; the seeds disagree more than one seed's data are noisy, so more seeds " \
                "(--seeds) would help more than more data"
    return text


def outcome(evidence: Evidence, margin: float, alpha: float, rule: str, *,
            p_positive: float | None = None, p_below: float | None = None) -> str:
    """``"fail"`` when the effect is shown below the margin, else ``"pass"`` when it is shown
    positive with a stable sign across seeds, else ``"inconclusive"``. The p-values may be
    passed in already corrected for multiplicity (Holm across an audit's cells)."""
    below = evidence.p_below(margin) if p_below is None else p_below
    positive = evidence.p_positive() if p_positive is None else p_positive
    if below <= alpha:
        return "fail"
    if positive <= alpha and evidence.sign_stable(rule):
        return "pass"
    return "inconclusive"


def p_text(p: float) -> str:
    """A p-value as a reason shows it: three digits, "< 0.0001" below that."""
    if not np.isfinite(p):
        return "n/a"
    return "< 0.0001" if p < 1e-4 else f"{p:.3g}"
