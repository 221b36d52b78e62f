"""Audit: the candidate must beat the matched post-hoc probes (docs/methods.md §2.6).

The probes are the same factory, fitted the same way, differing only in the auxiliary
feature: no routing at all (``confidence_only``) or predictive entropy in place of routing
(``predictive_entropy``). One cell per calibrator: the probes drop every routing feature.
"""

from __future__ import annotations

from typing import Any

from routeaudit.calibration.controls import PROBE_KINDS
from routeaudit.calibration.gain_audit import GainAudit
from routeaudit.hookspecs import hookimpl


class BaselineGainAudit(GainAudit):
    name = "baseline_gain"
    claim = ("Routing features improve on confidence: the calibrator beats its matched "
             "confidence-only and predictive-entropy probes.")
    kinds = PROBE_KINDS
    per_feature = False


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [BaselineGainAudit()]
