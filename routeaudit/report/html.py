"""HTML reporter (``--html PATH``): one self-contained page, no scripts, no network."""

from __future__ import annotations

import html
from typing import Any

from routeaudit.hookspecs import hookimpl
from routeaudit.report.files import check_target, write_atomic
from routeaudit.report.terminal import effect_text, summary_line
from routeaudit.verdict import Report

COLOURS = {"pass": "#d4edda", "fail": "#f8d7da", "inconclusive": "#fff3cd",
           "error": "#f5c6cb", "skip": "#e2e3e5"}


def render(report: Report) -> str:
    rows = []
    for v in report.verdicts:
        seeds = "<br>".join(html.escape(", ".join(f"{k}={x:.4g}" if isinstance(x, float) else
                                                  f"{k}={x}" for k, x in e.items()))
                            for e in v.per_seed)
        p = "" if v.p_value is None else f"{v.p_value:.3g} / {v.p_value_corrected:.3g}"
        rows.append(
            f"<tr style='background:{COLOURS[v.status.value]}'><td>{html.escape(v.nodeid)}</td>"
            f"<td>{v.status.value}</td><td>{html.escape(effect_text(v))}</td><td>{p}</td>"
            f"<td>{html.escape(v.reason)}<details><summary>claim and seeds</summary>"
            f"{html.escape(v.claim)}<br>{seeds}</details></td></tr>")
    config = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(x))}</td></tr>"
                     for k, x in report.config.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>routeaudit report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}}</style></head>
<body><h1>routeaudit report</h1><p>{html.escape(summary_line(report))} — exit code
{report.exit_code}; routeaudit {html.escape(report.routeaudit_version)}; seeds {report.seeds}</p>
<table><tr><th>node</th><th>status</th><th>effect [CI]</th><th>p raw / corrected</th>
<th>reason</th></tr>{''.join(rows)}</table>
<h2>Configuration</h2><table>{config}</table></body></html>"""


@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    parser.getgroup("reporting").add_argument(
        "--html", metavar="PATH", help="write a self-contained HTML report to PATH")


@hookimpl
def routeaudit_configure(config: Any) -> None:
    path = getattr(config.options, "html", None)
    if path:
        check_target(path, "html", "--html")  # before the run, not after it


@hookimpl
def routeaudit_report(config: Any, report: Report) -> None:
    path = getattr(config.options, "html", None)
    if path:
        write_atomic(path, render(report))
