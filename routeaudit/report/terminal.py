"""Terminal reporter: progress marks as verdicts arrive, then a table and a pytest-like summary.

When the reader goes away (``routeaudit run ... | head``), output stops quietly: the rest of
the run, the other reports and the exit code are unaffected. ``-v`` adds, per verdict, its
thresholds, per-seed numbers and pooled evidence, laid out for reading (4 significant
digits, small tables, long lists cut) rather than dumped; the JSON report has every digit.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from routeaudit.hookspecs import hookimpl
from routeaudit.verdict import Report, Status, Verdict

MARKS = {Status.PASS: ".", Status.FAIL: "F", Status.INCONCLUSIVE: "I",
         Status.ERROR: "E", Status.SKIP: "s"}
ORDER = [Status.FAIL, Status.ERROR, Status.INCONCLUSIVE, Status.PASS, Status.SKIP]
#: ``config.stash`` key the runner sets while its progress bar is on stderr (see
#: routeaudit.session.runner.PROGRESS_KEY; a plain string, as the session is a higher layer).
PROGRESS_KEY = "routeaudit.progress"
#: ``-v`` detail: list items shown before "… (N more)", and the indent of one level.
MAX_ITEMS = 8
MAX_ROWS = 12
INDENT = "  "


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def value_text(value: Any) -> str:
    """One scalar, as ``-v`` shows it: floats to 4 significant digits, None as "—"."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return _fmt(value)
    if isinstance(value, (list, tuple)):
        return _short_list(value)
    return str(value)


def _short_list(values: Sequence[Any]) -> str:
    shown = ", ".join(value_text(v) for v in values[:MAX_ITEMS])
    more = f", … ({len(values) - MAX_ITEMS} more)" if len(values) > MAX_ITEMS else ""
    return f"[{shown}{more}]"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _is_flat(value: Any) -> bool:
    """A scalar or a list of scalars: fits on one line (or one table cell)."""
    if isinstance(value, (list, tuple)):
        return all(_is_scalar(v) for v in value)
    return _is_scalar(value)


def _is_row(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(_is_flat(v) for v in value.values())


def _grid(rows: list[Mapping[str, Any]], index: list[str] | None = None) -> list[str]:
    """Rows of flat mappings as a small table (columns: the union of their keys, in order)."""
    from tabulate import tabulate

    columns = list(dict.fromkeys(key for row in rows for key in row))
    shown = rows[:MAX_ROWS]
    body = [([index[i]] if index else []) + [value_text(row.get(c)) if c in row else ""
                                             for c in columns] for i, row in enumerate(shown)]
    headers = ([""] if index else []) + [str(c) for c in columns]
    lines = tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True).splitlines()
    if len(rows) > MAX_ROWS:
        lines.append(f"… ({len(rows) - MAX_ROWS} more)")
    return lines


def detail_lines(value: Any, depth: int = 0) -> list[str]:
    """A nested value (threshold, per_seed, evidence) as indented ``key: value`` lines;
    lists of records and mappings of records become tables."""
    pad = INDENT * depth
    if isinstance(value, Mapping):
        if len(value) > 1 and all(_is_row(v) for v in value.values()):
            return [pad + line for line in _grid(list(value.values()), [str(k) for k in value])]
        lines = []
        for key, item in value.items():
            if _is_flat(item):
                lines.append(f"{pad}{key}: {value_text(item)}")
            else:
                lines.append(f"{pad}{key}:")
                lines.extend(detail_lines(item, depth + 1))
        return lines
    if isinstance(value, (list, tuple)):
        if _is_flat(value):
            return [pad + value_text(value)]
        if all(_is_row(v) for v in value):
            return [pad + line for line in _grid(list(value))]
        lines = []
        for item in value[:MAX_ROWS]:
            sub = detail_lines(item, depth + 1)
            lines.append(pad + "- " + sub[0].lstrip() if sub else pad + "-")
            lines.extend(sub[1:])
        if len(value) > MAX_ROWS:
            lines.append(f"{pad}… ({len(value) - MAX_ROWS} more)")
        return lines
    return [pad + value_text(value)]


def verbose_lines(verdict: Verdict) -> list[str]:
    """What ``-v`` adds for one verdict: its thresholds, per-seed numbers and evidence."""
    lines = [f"\n{verdict.nodeid}: {verdict.status.value}"]
    for name in ("threshold", "per_seed", "evidence"):
        value = getattr(verdict, name)
        if value:
            lines.append(f"{INDENT}{name}:")
            lines.extend(detail_lines(value, 2))
    return lines


def number_text(value: float | None, digits: int = 4) -> str:
    """A recorded number as every reporter shows it: ``digits`` significant digits, blank
    when absent or not finite."""
    if value is None or not math.isfinite(value):
        return ""
    return _fmt(value, digits)


def config_text(value: Any) -> str:
    """An option's value exactly (floats by repr), so a report's configuration reproduces
    the run: shared by the markdown and HTML reporters."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ", ".join(config_text(v) for v in value) or "[]"
    return repr(value) if isinstance(value, float) else str(value)


def effect_text(verdict: Verdict) -> str:
    """The effect with its interval (the ``effect [CI]`` column of every reporter)."""
    text = number_text(verdict.effect)
    if text and verdict.ci is not None:
        text += f" [{number_text(verdict.ci[0])}, {number_text(verdict.ci[1])}]"
    return text


def p_text(verdict: Verdict) -> str:
    """The ``p raw / corr`` column of every reporter."""
    if verdict.p_value is None:
        return ""
    return f"{number_text(verdict.p_value, 3)} / {number_text(verdict.p_value_corrected, 3)}"


def table(verdicts: list[Verdict], *, width: int = 60, limit: int | None = 320) -> str:
    """The verdict table; reasons longer than ``limit`` characters are cut (``-v``: never)."""
    rows = []
    for v in verdicts:
        reason = v.reason
        if limit is not None and len(reason) > limit:
            reason = reason[: limit - 1].rstrip() + "…"
        rows.append([v.audit, v.cell_id, v.status.value.upper(), effect_text(v), p_text(v),
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


def _marks_tear_the_bar(config: Any) -> bool:
    """A progress bar on stderr and marks on the same terminal would overwrite each other;
    the bar counts the verdicts then, and the marks are left out."""
    if not getattr(config, "stash", {}).get(PROGRESS_KEY):
        return False
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):
        return False


@hookimpl
def routeaudit_verdict(config: Any, verdict: Verdict) -> None:
    if config.options.quiet < 1 and not _marks_tear_the_bar(config):
        if isinstance(getattr(config, "stash", None), dict):
            config.stash["terminal.marks"] = True
        write(MARKS[verdict.status])


@hookimpl
def routeaudit_report(config: Any, report: Report) -> None:
    quiet = config.options.quiet
    if quiet >= 3:  # -qqq: nothing at all (an in-process run whose caller reports)
        return
    out: list[str] = []
    if getattr(config, "stash", {}).get("terminal.marks") and report.verdicts:
        out.append("")  # end the line of marks
    if quiet < 2 and report.verdicts:
        out.append(table(report.verdicts, limit=None if config.options.verbose else 320))
    if config.options.verbose:
        for v in report.verdicts:
            out.extend(verbose_lines(v))
    for v in report.verdicts:
        if v.status is Status.ERROR and v.traceback:
            out.append(f"\n_____ {v.nodeid} _____\n{v.traceback}")
    out.append(summary_line(report))
    write("\n".join(out) + "\n")
