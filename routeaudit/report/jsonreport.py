"""JSON reporter: the Report model, dumped as it is (``--json PATH``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routeaudit.hookspecs import hookimpl
from routeaudit.verdict import Report


@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    parser.getgroup("reporting").add_argument(
        "--json", metavar="PATH", help="write the JSON report to PATH")


@hookimpl
def routeaudit_report(config: Any, report: Report) -> None:
    path = getattr(config.options, "json", None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(report.to_json())
