"""routeaudit: pytest-style audits for routing-aware calibration and interpretability claims.

This module is the whole public API; docs/architecture.md draws the layers behind it.
Importing it is cheap (no torch, no scipy): they load only where a model runs, an MLP
trains or a kernel needs them.
"""

from __future__ import annotations

from routeaudit._version import __version__
from routeaudit.audit import (
    Audit,
    AuditContext,
    AuditSettings,
    BaseAudit,
    PlantedCases,
    SeedData,
    SeedOutcome,
    SeedTally,
)
from routeaudit.calibrators.base import BaseCalibrator, calibrator, clone
from routeaudit.calibrators.checks import check_calibrator
from routeaudit.errors import (
    AdapterError,
    AuditError,
    RouteAuditError,
    TraceFileError,
    TraceValidationError,
    UsageError,
)
from routeaudit.hookspecs import hookimpl, hookspec
from routeaudit.model.adapter import Adapter, ForwardOutput, TraceAdapter, adapter
from routeaudit.model.intervention import RoutingIntervention
from routeaudit.traces import TraceMeta, TraceSet
from routeaudit.verdict import ExitCode, Report, Status, Verdict

__all__ = [
    "Adapter",
    "AdapterError",
    "Audit",
    "AuditContext",
    "AuditError",
    "AuditSettings",
    "BaseAudit",
    "BaseCalibrator",
    "ExitCode",
    "ForwardOutput",
    "PlantedCases",
    "Report",
    "RouteAuditError",
    "RoutingIntervention",
    "SeedData",
    "SeedOutcome",
    "SeedTally",
    "Status",
    "TraceAdapter",
    "TraceFileError",
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
