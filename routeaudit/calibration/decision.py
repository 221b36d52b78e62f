"""The decision rule for "the candidate beats control C" (docs/methods.md §2.7).

Every threshold is a setting and is reported in the verdict:

1. the gain, metric(C) − metric(candidate), is positive in every seed (``stability``);
2. its paired bootstrap CI excludes 0 in every seed: the two-sided bootstrap p-value,
   Holm-corrected across the comparisons of the audit within the seed, is ≤ alpha;
3. the mean gain over seeds exceeds the seed-variance band of C (one sd of C's metric
   across seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from routeaudit.calibration.study import Study
from routeaudit.stats import holm, paired_gain, stable


@dataclass
class GainCheck:
    """Whether the candidate beats one control, with every number the verdict states."""

    control: str
    gains: list[float]
    cis: list[tuple[float, float]]
    p_raw: list[float]
    p_corrected: list[float] = field(default_factory=list)
    candidate: list[float] = field(default_factory=list)
    control_values: list[float] = field(default_factory=list)

    @property
    def mean_gain(self) -> float:
        return float(np.mean(self.gains))

    @property
    def band(self) -> float:
        """One sd across seeds of the control's metric (0 with a single seed)."""
        return float(np.std(self.control_values, ddof=1)) if len(self.control_values) > 1 else 0.0

    def decide(self, alpha: float, stability: str) -> dict[str, Any]:
        sign = [g > 0 for g in self.gains]
        ci = [bool(pc <= alpha and lo > 0) for pc, (lo, _) in
              zip(self.p_corrected, self.cis, strict=True)]
        band_ok = self.mean_gain > self.band
        return {"sign": stable(sign, stability), "ci": stable(ci, stability), "band": band_ok,
                "n_sign": sum(sign), "n_ci": sum(ci), "n": len(sign),
                "passed": stable(sign, stability) and stable(ci, stability) and band_ok}


def gain_checks(st: Study, controls: Sequence[str], alpha: float) -> list[GainCheck]:
    """Candidate vs each control in every seed, Holm-corrected across the controls per seed."""
    checks = [GainCheck(c, [], [], [], candidate=st.metric("candidate"),
                        control_values=st.metric(c)) for c in controls]
    for seed in st.seeds:
        for check in checks:
            gain, ci, p = paired_gain(seed.observed, seed.replicates, seed.index("candidate"),
                                      seed.index(check.control), 1 - alpha)
            check.gains.append(gain)
            check.cis.append(ci)
            check.p_raw.append(p)
        corrected = holm([c.p_raw[-1] for c in checks])
        for check, pc in zip(checks, corrected, strict=True):
            check.p_corrected.append(float(pc))
    return checks
