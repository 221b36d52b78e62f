"""routeaudit: pytest-style audits for routing-aware calibration and interpretability claims.

This module is the whole public API; everything else is an implementation detail.
"""

from __future__ import annotations

__version__ = "0.1.0"

from routeaudit.adapter import Adapter, ForwardOutput, TraceAdapter, adapter
from routeaudit.audit import AuditContext, AuditSettings, SeedData
from routeaudit.calibrators.base import BaseCalibrator, calibrator, clone
from routeaudit.calibrators.checks import check_calibrator
from routeaudit.errors import (
    AdapterError,
    AuditError,
    RouteAuditError,
    TraceValidationError,
    UsageError,
)
from routeaudit.hookspecs import hookimpl, hookspec
from routeaudit.intervention import RoutingIntervention
from routeaudit.traces import TraceMeta, TraceSet
from routeaudit.verdict import ExitCode, Report, Status, Verdict

__all__ = [
    "Adapter",
    "AdapterError",
    "AuditContext",
    "AuditError",
    "AuditSettings",
    "BaseCalibrator",
    "ExitCode",
    "ForwardOutput",
    "Report",
    "RouteAuditError",
    "RoutingIntervention",
    "SeedData",
    "Status",
    "TraceAdapter",
    "TraceMeta",
    "TraceSet",
    "TraceValidationError",
    "UsageError",
    "Verdict",
    "__version__",
    "adapter",
    "calibrator",
    "check_calibrator",
    "clone",
    "hookimpl",
    "hookspec",
]
