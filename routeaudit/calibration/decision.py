"""The decision rule for "the candidate beats control C" (docs/methods.md §2.7, §5.2).

The gain, metric(C) − metric(candidate), is measured in every seed with a paired bootstrap
over the evaluation examples. The seeds' gains and bootstrap variances are pooled into one
:class:`~routeaudit.stats.evidence.Evidence` (mean gain, with a standard error that adds the
between-seed spread to the within-seed sampling variance), so a gain is judged on all the
evidence at once, not by a conjunction of per-seed tests. For a cell compared against
several controls:

* ``pass``: the gain over *every* control is shown positive (an intersection-union test:
  the largest of the one-sided p-values, Holm-corrected across the audit's cells, ≤ α) and
  positive in every seed (``--stability``);
* ``fail``: the gain over *some* control is shown below the margin (``--gain-margin``;
  one-sided p-values Holm-corrected across all the audit's comparisons): refuted;
* ``inconclusive`` otherwise, with about how much more data would decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from routeaudit.calibration.study import Study
from routeaudit.stats import paired_gain
from routeaudit.stats.evidence import Evidence, pool_seeds


@dataclass
class GainCheck:
    """The candidate against one control, with every number the verdict states."""

    control: str
    gains: list[float]
    variances: list[float]
    cis: list[tuple[float, float]]
    candidate: list[float] = field(default_factory=list)
    control_values: list[float] = field(default_factory=list)

    @property
    def evidence(self) -> Evidence:
        return pool_seeds(self.gains, self.variances)

    @property
    def mean_gain(self) -> float:
        return float(np.mean(self.gains))


def gain_checks(st: Study, controls: Sequence[str], alpha: float) -> list[GainCheck]:
    """Candidate vs each control in every seed: the gain, its bootstrap variance and CI."""
    checks = [GainCheck(c, [], [], [], candidate=st.metric("candidate"),
                        control_values=st.metric(c)) for c in controls]
    for seed in st.seeds:
        for check in checks:
            i, j = seed.index("candidate"), seed.index(check.control)
            gain, ci, _ = paired_gain(seed.observed, seed.replicates, i, j, 1 - alpha)
            replicates = seed.replicates[:, j] - seed.replicates[:, i]
            replicates = replicates[np.isfinite(replicates)]
            check.gains.append(gain)
            check.variances.append(float(np.var(replicates, ddof=1))
                                   if replicates.size > 1 else float("nan"))
            check.cis.append(ci)
    return checks
