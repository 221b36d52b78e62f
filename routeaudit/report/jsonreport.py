"""JSON reporter: the Report model, dumped as it is (``--json PATH``), written atomically and
never over a file that is not a routeaudit JSON report."""

from __future__ import annotations

from typing import Any

from routeaudit.hookspecs import hookimpl
from routeaudit.report.files import check_target, write_atomic
from routeaudit.verdict import Report


@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    parser.getgroup("reporting").add_argument(
        "--json", metavar="PATH", help="write the JSON report to PATH")


@hookimpl
def routeaudit_configure(config: Any) -> None:
    path = getattr(config.options, "json", None)
    if path:
        check_target(path, "json", "--json")  # before the run, not after it


@hookimpl
def routeaudit_report(config: Any, report: Report) -> None:
    path = getattr(config.options, "json", None)
    if path:
        write_atomic(path, report.to_json())
