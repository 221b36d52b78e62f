"""The calibrator study: the machinery behind the four calibrator audits
(``capacity_control``, ``shuffled_profile``, ``baseline_gain``, ``bandwidth_sensitivity``).

================  ===========================================================================
``features``      a calibrator's declared features as an input matrix, with provenance
``controls``      the twins and probes: capacity-matched, shuffled-profile, confidence-only
``study``         fitting the candidate and its controls on every seed, scored on the
                  evaluation split with a paired bootstrap (memoised per run)
``scores``        what is scored for every probe (worst-tertile ECE15 and the rest)
``decision``      the rule for "the candidate beats control C"
``reasons``       the words of a verdict, with the numbers behind it
``gain_audit``    the shared base class of the gain audits
================  ===========================================================================

See docs/methods.md §2.6–§2.7 for the definitions.
"""

from __future__ import annotations

from routeaudit.calibration.gain_audit import GainAudit
from routeaudit.calibration.study import Study, resolve_spec, study

__all__ = ["GainAudit", "Study", "resolve_spec", "study"]
