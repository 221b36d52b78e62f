"""Audit: the candidate must beat its shuffled-profile twins (docs/methods.md §2.7).

The twins see the real routing values, but attached to the wrong examples: shuffled across
all examples (``shuffled_global``) or, stricter, within confidence bins
(``shuffled_within_bin``). The within-bin shuffle is the decisive control (docs/methods.md §2.7):
under the null it is exchangeable with the real profile given confidence, so it has the same
capacity, input distribution and optimisation; only the routing–correctness link differs.
"""

from __future__ import annotations

from typing import Any

from routeaudit.calibration.controls import SHUFFLE_KINDS
from routeaudit.calibration.gain_audit import GainAudit
from routeaudit.hookspecs import hookimpl


class ShuffledProfileAudit(GainAudit):
    name = "shuffled_profile"
    claim = ("The calibrator uses the link between routing and correctness: it beats the same "
             "calibrator given shuffled routing (globally and within confidence bins).")
    kinds = SHUFFLE_KINDS


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [ShuffledProfileAudit()]
