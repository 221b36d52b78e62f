"""The exception tree. Every error routeaudit raises on purpose is a RouteAuditError.

    RouteAuditError
    ├── UsageError              bad command line, unknown audit/plugin/option  (exit 4)
    ├── TraceValidationError    a trace array breaks the contract               (exit 4)
    ├── AdapterError            the user's adapter file failed to load or run   (exit 4)
    └── AuditError              an audit could not run; becomes an `error` verdict
"""

from __future__ import annotations


class RouteAuditError(Exception):
    """Base class of every deliberate routeaudit error."""


class UsageError(RouteAuditError):
    """The command line or configuration is wrong."""


class AdapterError(RouteAuditError):
    """The user's adapter or calibrator file could not be loaded or used."""


class AuditError(RouteAuditError):
    """An audit could not be carried out."""


class TraceValidationError(RouteAuditError):
    """A trace array breaks the TraceSet contract.

    The message always names the field, the first offending index (when there is one)
    and what was expected, so the user can find the bad example.
    """

    def __init__(self, field: str, problem: str, *, index: object = None, expected: str = ""):
        self.field = field
        self.index = index
        self.problem = problem
        self.expected = expected
        where = f" at index {index}" if index is not None else ""
        want = f"; expected {expected}" if expected else ""
        super().__init__(f"{field}{where}: {problem}{want}")
