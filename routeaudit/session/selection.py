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
