"""Selecting cells: pytest-style node ids and ``-k`` expressions."""

from __future__ import annotations

import re
from typing import Any

from routeaudit.errors import UsageError

_K_TOKEN = re.compile(r"\s*(\(|\)|and\b|or\b|not\b|[^\s()]+)")


def nodeid(target: str, audit: str, cell: dict[str, Any]) -> str:
    """``target::audit[cell values joined by -]``, the id ``-k``, JUnit and pytest share."""
    cell_id = "-".join(str(v) for v in cell.values())
    return f"{target}::{audit}[{cell_id}]" if cell else f"{target}::{audit}"


def keyword_matches(expression: str, node: str) -> bool:
    """pytest-like ``-k``: words match as case-insensitive substrings; and/or/not/parentheses."""
    tokens = _K_TOKEN.findall(expression)
    if not tokens:
        return True
    pieces = []
    for token in tokens:
        if token in ("(", ")", "and", "or", "not"):
            pieces.append(token)
        else:
            pieces.append(str(token.lower() in node.lower()))
    try:
        return bool(eval(" ".join(pieces), {"__builtins__": {}}, {}))  # only True/False/ops
    except SyntaxError as exc:
        raise UsageError(f"-k {expression!r}: malformed expression") from exc


class Selection:
    """Counts the node ids ``-k`` saw and kept across a run, so that a run which selects
    nothing says why instead of only "no verdicts" (the exit code stays 5)."""

    def __init__(self, keyword: str | None, audits: list[str] | None = None) -> None:
        self.keyword = keyword or None
        self.audits = list(dict.fromkeys(audits or []))
        self.seen = 0
        self.kept = 0
        self.example: str | None = None

    def keeps(self, node: str) -> bool:
        """Whether ``node`` is selected (always, without ``-k``); counts it either way."""
        self.seen += 1
        if self.example is None or ("[" in node and "[" not in self.example):
            self.example = node  # prefer an id with a cell: it shows the whole shape
        if self.keyword is None or keyword_matches(self.keyword, node):
            self.kept += 1
            return True
        return False

    def nothing_selected(self) -> str | None:
        """The message for a run whose selection left nothing to audit, else None."""
        among = f" of --audit {', '.join(self.audits)}" if self.audits else ""
        if self.keyword is not None and self.seen and not self.kept:
            cells = "cell" if self.seen == 1 else "cells"
            example = f", e.g. {self.example}" if self.example else ""
            return (f"-k {self.keyword!r} matched none of the {self.seen} {cells}{among}; "
                    f"node ids look like TARGET::audit[cell]{example}")
        if self.audits and not self.seen:
            return f"--audit {', '.join(self.audits)}: no cells to audit on these targets"
        return None
