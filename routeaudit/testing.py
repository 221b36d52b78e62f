"""Run the battery in-process and get the Report back: what the pytest plugin builds on.

``routeaudit.cli.main`` ends in an exit code and prints; a test runner needs the verdicts
themselves, and needs to tell a usage error (bad options: the whole run is wrong) from a
bad target (one file is wrong). This module does the ``run`` path of the CLI with the same
parser, plugin manager and session, and raises instead of printing.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from routeaudit.cli import build_parser, finish, split_plugin_args, start
from routeaudit.errors import UsageError
from routeaudit.verdict import Report


def parse_run_args(args: list[str]) -> tuple[Any, list[str]]:
    """Check ``routeaudit run`` arguments without running anything; argparse's complaint
    (which it would print and exit on) becomes a UsageError with its text. Returns the
    options and the arguments left for plugins' options."""
    _, rest = split_plugin_args(list(args))
    parser = build_parser(early=True)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            options, unknown = parser.parse_known_args(["run", *rest])
    except SystemExit as exc:
        raise UsageError(_argparse_text(err.getvalue()) or "invalid routeaudit arguments") from exc
    return options, unknown


def _argparse_text(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].split("error:", 1)[-1].strip() if lines else ""


def run_report(args: list[str], *, quiet: bool = True) -> Report:
    """``routeaudit run ARGS`` in this process: the Report, or the RouteAuditError
    (UsageError, AdapterError, TraceValidationError, TraceFileError) that stopped it.

    The same start-up as the command line (``routeaudit.cli.start``); ``quiet`` adds ``-qq``
    so the terminal reporter stays silent (the caller reports).
    """
    from routeaudit.session.runner import run_session

    plugin_args, rest = split_plugin_args(list(args))
    argv = ["run", *rest, *(["-qq"] if quiet else [])]
    parse_run_args(argv[1:])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            started = start(plugin_args, argv)
    except SystemExit as exc:
        raise UsageError(_argparse_text(err.getvalue()) or "invalid routeaudit arguments") from exc
    started.caller.call("routeaudit_configure", config=started.config)
    report = run_session(started.config, started.options.targets, started.modules)
    finish(started.config, report.exit_code)
    return report
