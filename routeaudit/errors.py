"""The exception tree. Every error routeaudit raises on purpose is a RouteAuditError.

    RouteAuditError
    ├── UsageError              bad command line, unknown audit/plugin/option  (exit 4)
    ├── TraceValidationError    a trace array or meta field breaks the contract (exit 4)
    ├── TraceFileError          a trace file/directory cannot be read or written (exit 4)
    ├── AdapterError            the user's adapter file failed to load or run   (exit 4)
    └── AuditError              an audit could not run; becomes an `error` verdict

Bad input must never end in a traceback, so every way a file can be what it does not claim
(missing, unreadable, truncated, corrupted, pickled, a folder) ends in one of these, with a
message that names the file or field, what was found, what was expected and what to do.
"""

from __future__ import annotations

import os


class RouteAuditError(Exception):
    """Base class of every deliberate routeaudit error."""


class UsageError(RouteAuditError):
    """The command line or configuration is wrong."""


class AdapterError(RouteAuditError):
    """The user's adapter or calibrator file could not be loaded or used."""


class AuditError(RouteAuditError):
    """An audit could not be carried out."""


def show_path(path: object) -> str:
    """A path as printable text: bytes that are not UTF-8 (``b'\\xff'``) are shown as ``\\xff``
    escapes instead of lone surrogates, which a UTF-8 stream refuses to write."""
    try:
        text = os.fsdecode(path)  # type: ignore[arg-type]
    except TypeError:
        text = str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class TraceValidationError(RouteAuditError):
    """A trace array or a meta field breaks the TraceSet contract.

    The message always names the field (``labels``, ``meta.schedule``), the first offending
    index (when there is one) and what was expected, so the user can find the bad example;
    ``source`` names the file the arrays came from, when they came from one.
    """

    def __init__(self, field: str, problem: str, *, index: object = None, expected: str = "",
                 source: object = None):
        self.field = field
        self.index = index
        self.problem = problem
        self.expected = expected
        self.source = None if source is None else show_path(source)
        where = f" at index {index}" if index is not None else ""
        want = f"; expected {expected}" if expected else ""
        prefix = f"{self.source}: " if self.source else ""
        super().__init__(f"{prefix}{field}{where}: {problem}{want}")

    def with_source(self, source: object) -> TraceValidationError:
        """The same error, naming the file the arrays were read from."""
        return TraceValidationError(self.field, self.problem, index=self.index,
                                    expected=self.expected, source=source)

    def __reduce__(self):  # keyword-only arguments: rebuild explicitly (multiprocessing)
        return (_rebuild_validation, (self.field, self.problem, self.index, self.expected,
                                      self.source))


class TraceFileError(RouteAuditError):
    """A trace file or directory cannot be read or written as asked.

    Raised for files that are missing, unreadable, not what their name claims (an empty or
    truncated ``.npz``, a ``.npy`` renamed ``.npz``, a manifest that is not JSON), that need
    pickle, or whose headers declare more data than they hold; and for a ``save`` that
    would overwrite something routeaudit did not write. ``path`` is the file at fault.
    """

    def __init__(self, path: object, problem: str, *, expected: str = "", hint: str = ""):
        self.path = show_path(path)
        self.problem = problem
        self.expected = expected
        self.hint = hint
        want = f"; expected {expected}" if expected else ""
        advice = f". {hint}" if hint else ""
        super().__init__(f"{self.path}: {problem}{want}{advice}")

    def __reduce__(self):
        return (_rebuild_file, (self.path, self.problem, self.expected, self.hint))


def _rebuild_validation(field, problem, index, expected, source):
    return TraceValidationError(field, problem, index=index, expected=expected, source=source)


def _rebuild_file(path, problem, expected, hint):
    return TraceFileError(path, problem, expected=expected, hint=hint)
