"""Terminal reporter: progress marks as verdicts arrive, then a table and a pytest-like summary."""

from __future__ import annotations

import sys
import textwrap
from typing import Any

from tabulate import tabulate

from routeaudit.hookspecs import hookimpl
from routeaudit.verdict import Report, Status, Verdict

MARKS = {Status.PASS: ".", Status.FAIL: "F", Status.INCONCLUSIVE: "I",
         Status.ERROR: "E", Status.SKIP: "s"}
ORDER = [Status.FAIL, Status.ERROR, Status.INCONCLUSIVE, Status.PASS, Status.SKIP]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def effect_text(verdict: Verdict) -> str:
    if verdict.effect is None:
        return ""
    text = f"{verdict.effect:.4f}"
    if verdict.ci is not None:
        text += f" [{verdict.ci[0]:.4f}, {verdict.ci[1]:.4f}]"
    return text


def table(verdicts: list[Verdict], *, width: int = 60, limit: int | None = 320) -> str:
    """The verdict table; reasons longer than ``limit`` characters are cut (``-v``: never)."""
    rows = []
    for v in verdicts:
        p = "" if v.p_value is None else f"{_fmt(v.p_value, 3)} / {_fmt(v.p_value_corrected, 3)}"
        reason = v.reason
        if limit is not None and len(reason) > limit:
            reason = reason[: limit - 1].rstrip() + "…"
        rows.append([v.audit, v.cell_id, v.status.value.upper(), effect_text(v), p,
                     textwrap.fill(reason, width=width)])
    headers = ["audit", "cell", "status", "effect [CI]", "p raw / corr", "reason"]
    return tabulate(rows, headers=headers, tablefmt="simple")


def summary_line(report: Report) -> str:
    counts = report.summary.model_dump(by_alias=True)
    words = {"pass": "passed", "fail": "failed", "inconclusive": "inconclusive",
             "error": "error", "skip": "skipped"}
    parts = [f"{counts[s.value]} {words[s.value]}" for s in ORDER if counts[s.value]]
    body = ", ".join(parts) or "no verdicts"
    return f"{'=' * 10} {body} in {report.duration_s:.2f}s {'=' * 10}"


@hookimpl
def routeaudit_verdict(config: Any, verdict: Verdict) -> None:
    if config.options.quiet < 1:
        sys.stdout.write(MARKS[verdict.status])
        sys.stdout.flush()


@hookimpl
def routeaudit_report(config: Any, report: Report) -> None:
    quiet = config.options.quiet
    if quiet < 1 and report.verdicts:
        sys.stdout.write("\n")
    if quiet < 2 and report.verdicts:
        print(table(report.verdicts, limit=None if config.options.verbose else 320))
    if config.options.verbose:
        for v in report.verdicts:
            print(f"\n{v.nodeid}: {v.status.value}")
            for entry in v.per_seed:
                print("   ", ", ".join(f"{k}={_fmt(x) if isinstance(x, float) else x}"
                                        for k, x in entry.items()))
    for v in report.verdicts:
        if v.status is Status.ERROR and v.traceback:
            print(f"\n_____ {v.nodeid} _____\n{v.traceback}")
    print(summary_line(report))
