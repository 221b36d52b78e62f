"""Markdown reporter (``--markdown PATH``): a compact summary for a pull-request comment or a
CI job page.

The result and the counts come first; the claims that did not pass are a table (node id,
status, one-line reason, effect); passes, skips and the effective configuration (with
where each value came from) are folded into ``<details>`` blocks, so a long battery stays
one screen. When ``$GITHUB_STEP_SUMMARY`` names a file (GitHub Actions sets it), the same
summary is appended to it: that file holds every step's summary, so it is never truncated.

Every piece of user text (node ids, reasons, option values) is escaped: a pipe would split
a table cell, a backtick or ``<`` would start code or HTML, a newline would end the row.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from routeaudit.errors import UsageError
from routeaudit.hookspecs import hookimpl
from routeaudit.report.files import MARKERS, check_target, write_atomic
from routeaudit.report.terminal import config_text, effect_text
from routeaudit.verdict import Report, Status

KIND = "markdown"
#: First line of every markdown report: invisible when rendered, and how ``check_target``
#: knows a file at ``--markdown PATH`` is an earlier report it may replace.
MARKER = MARKERS[KIND][0]
STEP_SUMMARY = "GITHUB_STEP_SUMMARY"
#: Rows shown per table before "… and N more": a PR comment holds at most 65,536 characters.
MAX_ROWS = 50
#: A reason is cut to this many characters in the table (the JSON report has all of it).
REASON_CHARS = 200

ICONS = {Status.PASS: "✅", Status.FAIL: "❌", Status.INCONCLUSIVE: "❔",
         Status.ERROR: "💥", Status.SKIP: "⏭️"}
ORDER = [Status.FAIL, Status.ERROR, Status.INCONCLUSIVE, Status.PASS, Status.SKIP]
NOT_PASSED = (Status.FAIL, Status.ERROR, Status.INCONCLUSIVE)
#: The overall result, by exit code (routeaudit.verdict.ExitCode).
RESULTS = {0: "✅ passed", 1: "❌ failed", 2: "interrupted", 3: "internal error",
           4: "usage error", 5: "⚠️ nothing audited"}

#: Inline markdown (GitHub flavour) in a table cell: escapes, code, emphasis, links, cell
#: borders, strikethrough, math. Block syntax (#, -, >, 1.) cannot start inside a cell.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$])")
_WHITESPACE = re.compile(r"\s+")


def escape(text: Any) -> str:
    """User text as inert markdown, on one line: HTML-significant characters become
    entities, markdown punctuation is backslash-escaped (a pipe cannot end a table cell, a
    backtick cannot open code), and newlines become spaces."""
    one_line = _WHITESPACE.sub(" ", str(text)).strip()
    html_safe = one_line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", html_safe)


def code(text: Any) -> str:
    """User text as an inline code span in a table cell (node ids, option values): one
    line, a fence longer than any run of backticks inside, pipes escaped (GitHub tables
    split on them even inside code)."""
    one_line = _WHITESPACE.sub(" ", str(text)).strip()
    # GitHub splits rows on a pipe not taken by a backslash pair, even inside code
    one_line = re.sub(r"(\\*)\|", lambda m: m.group(1) * 2 + "\\|", one_line)
    if not one_line:
        return ""
    runs = re.findall(r"`+", one_line)
    fence = "`" * (max((len(r) for r in runs), default=0) + 1)
    pad = " " if one_line.startswith("`") or one_line.endswith("`") else ""
    return f"{fence}{pad}{one_line}{pad}{fence}"


def one_line_reason(reason: str, limit: int = REASON_CHARS) -> str:
    text = _WHITESPACE.sub(" ", reason).strip()
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return escape(text)


def _table(headers: list[str], rows: list[list[str]], *, align: str = "---",
           limit: int | None = MAX_ROWS) -> list[str]:
    """A GitHub table of already escaped cells; rows past ``limit`` are counted, not shown."""
    shown = rows if limit is None else rows[:limit]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in shown]
    if len(rows) > len(shown):
        lines += ["", f"… and {len(rows) - len(shown)} more (every row is in the JSON report)"]
    return lines


def _details(summary: str, body: list[str]) -> list[str]:
    """A folded block; the blank lines let GitHub render the markdown inside it."""
    return ["<details>", f"<summary>{summary}</summary>", "", *body, "", "</details>", ""]


def to_markdown(report: Report) -> str:
    """The summary: title, counts, what did not pass, passes and configuration folded."""
    counts = report.summary.model_dump(by_alias=True)
    result = RESULTS.get(report.exit_code, f"exit {report.exit_code}")
    targets = ", ".join(code(t) for t in report.targets) or "no targets"
    seeds = ", ".join(str(s) for s in report.seeds)
    out = [MARKER, f"## routeaudit: {result} (exit {report.exit_code})", "",
           f"{targets} · seeds {seeds} · {report.duration_s:.1f} s · routeaudit "
           f"{escape(report.routeaudit_version)}", ""]
    out += _table([f"{ICONS[s]} {s.value}" for s in ORDER], [[str(counts[s.value]) for s in ORDER]],
                  align="---:")
    out.append("")
    bad = [v for v in report.verdicts if v.status in NOT_PASSED]
    bad.sort(key=lambda v: ORDER.index(v.status))
    if bad:
        out += [f"### Claims that did not pass ({len(bad)})", ""]
        out += _table(["node id", "status", "reason", "effect [CI]"],
                      [[code(v.nodeid), f"{ICONS[v.status]} {v.status.value}",
                        one_line_reason(v.reason), effect_text(v)] for v in bad])
        out.append("")
    passed = [v for v in report.verdicts if v.status is Status.PASS]
    if passed:
        out += _details(f"{len(passed)} passed", _table(
            ["node id", "effect [CI]", "reason"],
            [[code(v.nodeid), effect_text(v), one_line_reason(v.reason)] for v in passed]))
    skipped = [v for v in report.verdicts if v.status is Status.SKIP]
    if skipped:
        out += _details(f"{len(skipped)} skipped", _table(
            ["node id", "why"], [[code(v.nodeid), one_line_reason(v.reason)] for v in skipped]))
    out += _details(f"Configuration ({len(report.config)} options)", config_table(report))
    return "\n".join(out).rstrip() + "\n"


def config_table(report: Report) -> list[str]:
    """The effective configuration: every option, its value and where the value came from
    (``default``, ``pyproject.toml`` or ``command line``) when the report says."""
    if not report.config:
        return ["(no options recorded)"]
    sources = report.config_sources
    headers = ["option", "value"] + (["source"] if sources else [])
    rows = []
    for key in sorted(report.config):
        row = [code(key), code(config_text(report.config[key]))]
        if sources:
            row.append(escape(sources.get(key, "default")))
        rows.append(row)
    return _table(headers, rows, limit=None)  # never cut: it is what reproduces the run


def step_summary_path() -> Path | None:
    """``$GITHUB_STEP_SUMMARY``, when it is set to something."""
    value = os.environ.get(STEP_SUMMARY, "").strip()
    return Path(value) if value else None


def append_step_summary(path: Path, text: str) -> None:
    """Append to the job summary file, keeping what earlier steps wrote (one write, so the
    summary is not interleaved with another writer's)."""
    with open(path, "a", encoding="utf-8") as handle:
        head = "" if handle.tell() == 0 else "\n"
        handle.write(head + text)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    parser.getgroup("reporting").add_argument(
        "--markdown", metavar="PATH",
        help="write a markdown summary (for a pull-request comment) to PATH; with "
             "$GITHUB_STEP_SUMMARY set, it is also appended to the job summary")


@hookimpl
def routeaudit_configure(config: Any) -> None:
    path = getattr(config.options, "markdown", None)
    summary = step_summary_path()
    if summary is not None and summary.is_dir():  # before the run, not after it
        raise UsageError(f"${STEP_SUMMARY} {summary}: is a directory; it must name the job "
                         "summary file")
    if path and not (summary is not None and _same_file(Path(path), summary)):
        check_target(path, KIND, "--markdown")


@hookimpl
def routeaudit_report(config: Any, report: Report) -> None:
    path = getattr(config.options, "markdown", None)
    summary = step_summary_path()
    if not path and summary is None:
        return
    text = to_markdown(report)
    if summary is not None:
        append_step_summary(summary, text)
    if path and not (summary is not None and _same_file(Path(path), summary)):
        write_atomic(path, text)
