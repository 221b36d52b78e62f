"""Terminal reporter: progress marks as verdicts arrive, then a table and a pytest-like summary.

When the reader goes away (``routeaudit run ... | head``), output stops quietly: the rest of
the run, the other reports and the exit code are unaffected.
"""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any

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
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="simple")


def summary_line(report: Report) -> str:
    counts = report.summary.model_dump(by_alias=True)
    words = {"pass": "passed", "fail": "failed", "inconclusive": "inconclusive",
             "error": "error", "skip": "skipped"}
    parts = [f"{counts[s.value]} {words[s.value]}" for s in ORDER if counts[s.value]]
    body = ", ".join(parts) or "no verdicts"
    return f"{'=' * 10} {body} in {report.duration_s:.2f}s {'=' * 10}"


def write(text: str) -> None:
    """Write to stdout; a closed pipe silences the rest of the output instead of raising."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()


def silence_stdout() -> None:
    """Point stdout at /dev/null, so nothing (not even the flush at exit) hits the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the process ends


@hookimpl
def routeaudit_verdict(config: Any, verdict: Verdict) -> None:
    if config.options.quiet < 1:
        write(MARKS[verdict.status])


@hookimpl
def routeaudit_report(config: Any, report: Report) -> None:
    quiet = config.options.quiet
    out: list[str] = []
    if quiet < 1 and report.verdicts:
        out.append("")
    if quiet < 2 and report.verdicts:
        out.append(table(report.verdicts, limit=None if config.options.verbose else 320))
    if config.options.verbose:
        for v in report.verdicts:
            out.append(f"\n{v.nodeid}: {v.status.value}")
            for entry in v.per_seed:
                out.append("    " + ", ".join(f"{k}={_fmt(x) if isinstance(x, float) else x}"
                                              for k, x in entry.items()))
    for v in report.verdicts:
        if v.status is Status.ERROR and v.traceback:
            out.append(f"\n_____ {v.nodeid} _____\n{v.traceback}")
    out.append(summary_line(report))
    write("\n".join(out) + "\n")
