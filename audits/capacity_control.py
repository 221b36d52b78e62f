"""Audit: the candidate must beat its capacity-matched twins (docs/methods.md §2.7).

A twin is the candidate's own factory with the same input width, whose routing columns carry
nothing about routing: set to zero (``zeros``) or replaced by confidence-derived columns
(``derived``: predictive entropy, margin, logit confidence, ...). A gain that the twins share
is non-linear modelling of confidence and extra capacity, not routing information. The
candidate must beat every twin (so, the strongest) under the rule in routeaudit.calibration.decision.
"""

from __future__ import annotations

from typing import Any

from routeaudit.calibration.controls import CAPACITY_KINDS
from routeaudit.calibration.gain_audit import GainAudit
from routeaudit.hookspecs import hookimpl


class CapacityControlAudit(GainAudit):
    name = "capacity_control"
    claim = ("The calibrator's gain comes from the routing feature, not from extra capacity: "
             "it beats the same calibrator with that feature's columns replaced by "
             "non-routing columns.")
    kinds = CAPACITY_KINDS


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [CapacityControlAudit()]
