"""Small inline-SVG figures for the HTML report: no plotting library, no network.

Each helper returns one well-formed ``<svg>`` element as a string (it parses as XML), or
``""`` when there is nothing finite to draw. Every piece of text that may come from a user
(labels, titles, tooltips) goes through :func:`text` here, so callers cannot forget to
escape it. Non-finite numbers are dropped rather than drawn at a wrong place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["PALETTE", "Band", "Point", "Ref", "Row", "Series", "finite", "histogram", "interval_chart",
           "text", "xy_chart"]

#: Colour-blind-safe series colours (Okabe–Ito), cycled.
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#7f7f7f",
           "#f0e442")
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")
FONT = 'font-family="sans-serif" font-size="11"'


def text(value: object, limit: int | None = None) -> str:
    """``value`` as escaped text for HTML and XML alike: characters that XML forbids are
    dropped, ``& < > " '`` are escaped; cut to ``limit`` characters first when given."""
    s = _INVALID_XML.sub("", str(value))
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return escape(s, quote=True)


def finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _range(values: Sequence[float], pad: float = 0.06) -> tuple[float, float]:
    """A padded axis range that always has positive width."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        half = max(abs(lo) * 0.1, 1e-3)
        return lo - half, hi + half
    margin = (hi - lo) * pad
    return lo - margin, hi + margin


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values inside [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, t = [], first
    while t <= hi + 1e-9 * step:
        out.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return out


def _num(x: float) -> str:
    return f"{x:.3g}"


def _open(kind: str, width: int, height: int, title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" class="fig" data-fig="{text(kind)}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" {FONT}>',
            f"<title>{text(title)}</title>",
            f'<text x="6" y="15" font-size="12" font-weight="bold">{text(title, 90)}</text>']


# --------------------------------------------------------------------------- interval rows


@dataclass(frozen=True)
class Row:
    """One estimate with an optional interval (a dot and a whisker), or a bar from 0."""

    label: str
    value: float
    lo: float | None = None
    hi: float | None = None
    colour: str = PALETTE[0]
    bar: bool = False
    tip: str = ""


@dataclass(frozen=True)
class Ref:
    """A reference value drawn as a dashed line across the plot (0, a margin, a tolerance)."""

    value: float
    label: str
    colour: str = "#c0392b"


@dataclass(frozen=True)
class Band:
    """A shaded interval [lo, hi] behind rows ``first``..``last`` (a pooled interval, a
    seed band)."""

    first: int
    last: int
    lo: float
    hi: float
    colour: str = "#9ecae1"


def interval_chart(rows: Sequence[Row], title: str, xlabel: str = "", *,
                   refs: Sequence[Ref] = (), bands: Sequence[Band] = (), kind: str = "intervals",
                   width: int = 560, left: int = 190) -> str:
    """Rows of dots with interval whiskers (or bars), optional reference lines and bands."""
    rows = [r for r in rows if finite(r.value)]
    if not rows:
        return ""
    refs = [r for r in refs if finite(r.value)]
    bands = [b for b in bands if finite(b.lo) and finite(b.hi)]
    values = [r.value for r in rows] + [x for r in rows for x in (r.lo, r.hi) if finite(x)]
    values += [r.value for r in refs] + [x for b in bands for x in (b.lo, b.hi)]
    if any(r.bar for r in rows):
        values.append(0.0)
    lo, hi = _range(values)
    row_h, top, bottom, right = 20, 34 + 11 * min(len(refs), 2), 36, 16
    plot_w = width - left - right
    base = top + row_h * len(rows)
    height = base + bottom

    def sx(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    parts = _open(kind, width, height, title)
    for b in bands:
        first, last = max(b.first, 0), min(b.last, len(rows) - 1)
        if first > last:
            continue
        x0, x1 = sorted((sx(b.lo), sx(b.hi)))
        parts.append(f'<rect x="{x0:.1f}" y="{top + row_h * first + 2}" width="{max(x1 - x0, 1):.1f}" '
                     f'height="{row_h * (last - first + 1) - 4}" fill="{b.colour}" '
                     f'fill-opacity="0.35"/>')
    for t in _ticks(lo, hi):
        parts.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{base}" stroke="#eee"/>'
                     f'<text x="{sx(t):.1f}" y="{base + 13}" text-anchor="middle">{_num(t)}</text>')
    if xlabel:
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{base + 29}" text-anchor="middle">'
                     f"{text(xlabel, 90)}</text>")
    for j, r in enumerate(refs):
        x = sx(r.value)
        at = f'x="{x - 3:.1f}" text-anchor="end"' if x > left + 0.75 * plot_w else f'x="{x + 3:.1f}"'
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{base}" stroke="{r.colour}" '
                     f'stroke-dasharray="4 3"/><text {at} y="{top - 6 - 11 * (j % 2)}" '
                     f'fill="{r.colour}">{text(r.label, 30)}</text>')
    for i, r in enumerate(rows):
        y = top + row_h * i + row_h / 2
        tip = text(r.tip or f"{r.label}: {_num(r.value)}"
                   + (f" [{_num(r.lo)}, {_num(r.hi)}]" if finite(r.lo) and finite(r.hi) else ""))
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{text(r.label, max(int(left // 5.8), 8))}</text>")
        if r.bar:
            x0, x1 = sorted((sx(0.0), sx(r.value)))
            parts.append(f'<rect x="{x0:.1f}" y="{y - 6:.1f}" width="{max(x1 - x0, 1):.1f}" height="12" '
                         f'fill="{r.colour}"><title>{tip}</title></rect>')
            continue
        if finite(r.lo) and finite(r.hi):
            parts.append(f'<line x1="{sx(r.lo):.1f}" y1="{y:.1f}" x2="{sx(r.hi):.1f}" '  # type: ignore[arg-type]
                         f'y2="{y:.1f}" stroke="{r.colour}" stroke-width="2"/>')
        parts.append(f'<circle cx="{sx(r.value):.1f}" cy="{y:.1f}" r="4" fill="{r.colour}">'
                     f"<title>{tip}</title></circle>")
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- x-y plots


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    lo: float | None = None  # vertical interval
    hi: float | None = None
    tip: str = ""
    label: str = ""  # drawn next to the point
    size: float = 3.5


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[Point]
    colour: str = PALETTE[0]
    line: bool = True
    width: float = 1.5
    dash: str = ""


@dataclass(frozen=True)
class _Axes:
    x0: float
    x1: float
    y0: float
    y1: float
    left: int
    top: int
    pw: int
    ph: int

    def sx(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * self.pw

    def sy(self, v: float) -> float:
        return self.top + self.ph - (v - self.y0) / (self.y1 - self.y0) * self.ph


def xy_chart(series: Sequence[Series], title: str, xlabel: str, ylabel: str, *,
             diagonal: bool = False, hlines: Sequence[Ref] = (), vlines: Sequence[Ref] = (),
             square: bool = False, kind: str = "xy", width: int = 440, height: int = 330,
             legend: bool = True) -> str:
    """Points (with optional vertical intervals) joined per series; a y = x diagonal, and
    dashed horizontal / vertical reference lines. ``square`` gives both axes one range."""
    series = [Series(s.label, [p for p in s.points if finite(p.x) and finite(p.y)], s.colour,
                     s.line, s.width, s.dash) for s in series]
    series = [s for s in series if s.points]
    if not series:
        return ""
    hlines = [r for r in hlines if finite(r.value)]
    vlines = [r for r in vlines if finite(r.value)]
    pts = [p for s in series for p in s.points]
    xs = [p.x for p in pts] + [r.value for r in vlines]
    ys = [p.y for p in pts] + [v for p in pts for v in (p.lo, p.hi) if finite(v)]
    ys += [r.value for r in hlines]
    if square:
        xs = ys = xs + ys
    n_legend = len(series) if legend and len(series) > 1 else 0
    longest = max(len(s.label) for s in series)
    per_line = max(1, min(4, (width - 58) // (6 * min(longest, 30) + 24)))
    legend_h = 15 * math.ceil(n_legend / per_line)
    left, top, right, bottom = 58, 28, 14, 40 + legend_h
    x0, x1 = _range(xs)
    y0, y1 = _range(ys)
    ax = _Axes(x0, x1, y0, y1, left, top, width - left - right, height - top - bottom)
    parts = _open(kind, width, height, title)
    parts.append(f'<rect x="{left}" y="{top}" width="{ax.pw}" height="{ax.ph}" fill="none" '
                 'stroke="#ccc"/>')
    for t in _ticks(x0, x1):
        parts.append(f'<line x1="{ax.sx(t):.1f}" y1="{top}" x2="{ax.sx(t):.1f}" y2="{top + ax.ph}" '
                     f'stroke="#f0f0f0"/><text x="{ax.sx(t):.1f}" y="{top + ax.ph + 13}" '
                     f'text-anchor="middle">{_num(t)}</text>')
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" y1="{ax.sy(t):.1f}" x2="{left + ax.pw}" y2="{ax.sy(t):.1f}" '
                     f'stroke="#f0f0f0"/><text x="{left - 4}" y="{ax.sy(t) + 4:.1f}" '
                     f'text-anchor="end">{_num(t)}</text>')
    mid_y = top + ax.ph / 2
    parts.append(f'<text x="{left + ax.pw / 2:.1f}" y="{top + ax.ph + 28}" text-anchor="middle">'
                 f'{text(xlabel, 70)}</text><text x="13" y="{mid_y:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 13 {mid_y:.1f})">{text(ylabel, 50)}</text>')
    if diagonal:
        a, b = max(x0, y0), min(x1, y1)
        if b > a:
            parts.append(f'<line x1="{ax.sx(a):.1f}" y1="{ax.sy(a):.1f}" x2="{ax.sx(b):.1f}" '
                         f'y2="{ax.sy(b):.1f}" stroke="#888" stroke-dasharray="3 3"/>')
    for j, r in enumerate(hlines):  # labels alternate between the right and the left end
        y = ax.sy(r.value)
        at = (f'x="{left + ax.pw - 2}" text-anchor="end"' if j % 2 == 0
              else f'x="{left + 3}" text-anchor="start"')
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + ax.pw}" y2="{y:.1f}" '
                     f'stroke="{r.colour}" stroke-dasharray="4 3"/><text {at} '
                     f'y="{y - 3:.1f}" fill="{r.colour}">{text(r.label, 30)}</text>')
    for r in vlines:
        x = ax.sx(r.value)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ax.ph}" '
                     f'stroke="{r.colour}" stroke-dasharray="4 3"/><text x="{x + 3:.1f}" '
                     f'y="{top + 11}" fill="{r.colour}">{text(r.label, 30)}</text>')
    for s in series:
        if s.line and len(s.points) > 1:
            path = " ".join(f"{ax.sx(p.x):.1f},{ax.sy(p.y):.1f}"
                            for p in sorted(s.points, key=lambda p: p.x))
            dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
            parts.append(f'<polyline points="{path}" fill="none" stroke="{s.colour}" '
                         f'stroke-width="{s.width}"{dash}/>')
        for p in s.points:
            if finite(p.lo) and finite(p.hi):
                parts.append(f'<line x1="{ax.sx(p.x):.1f}" y1="{ax.sy(p.lo):.1f}" '  # type: ignore[arg-type]
                             f'x2="{ax.sx(p.x):.1f}" y2="{ax.sy(p.hi):.1f}" stroke="{s.colour}"/>')  # type: ignore[arg-type]
            tip = text(p.tip or f"{s.label}: x={_num(p.x)}, y={_num(p.y)}")
            parts.append(f'<circle cx="{ax.sx(p.x):.1f}" cy="{ax.sy(p.y):.1f}" r="{p.size:.1f}" '
                         f'fill="{s.colour}" fill-opacity="0.85"><title>{tip}</title></circle>')
            if p.label:  # to the right of the point, or to its left near the right edge
                x = ax.sx(p.x)
                at = (f'x="{x - 6:.1f}" text-anchor="end"' if x > left + 0.6 * ax.pw
                      else f'x="{x + 6:.1f}"')
                parts.append(f'<text {at} y="{ax.sy(p.y) - 5:.1f}" font-size="10">'
                             f"{text(p.label, 28)}</text>")
    if n_legend:
        col_w = (width - left) // per_line
        for i, s in enumerate(series):
            x = left + col_w * (i % per_line)
            y = height - legend_h + 15 * (i // per_line) + 2
            parts.append(f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{s.colour}"/>'
                         f'<text x="{x + 14}" y="{y + 1}">{text(s.label, 30)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- histogram


def histogram(counts: Sequence[float], edges: Sequence[float], title: str, xlabel: str, *,
              marks: Sequence[Ref] = (), kind: str = "histogram", width: int = 440,
              height: int = 230) -> str:
    """Bars of ``counts`` between consecutive ``edges``; ``marks`` are vertical lines (the
    observed statistic), and the x axis stretches to show them."""
    if len(edges) != len(counts) + 1 or not counts:
        return ""
    if not all(finite(v) for v in (*counts, *edges)) or max(counts) <= 0:
        return ""
    marks = [m for m in marks if finite(m.value)]
    x0, x1 = _range([*edges, *(m.value for m in marks)], pad=0.03)
    left, top, right, bottom = 50, 50, 14, 38
    ax = _Axes(x0, x1, 0.0, max(counts) * 1.08, left, top, width - left - right,
               height - top - bottom)
    parts = _open(kind, width, height, title)
    parts.append(f'<line x1="{left}" y1="{top + ax.ph}" x2="{left + ax.pw}" y2="{top + ax.ph}" '
                 'stroke="#999"/>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{ax.sx(t):.1f}" y="{top + ax.ph + 13}" text-anchor="middle">'
                     f"{_num(t)}</text>")
    for t in _ticks(0.0, ax.y1, 4):
        parts.append(f'<text x="{left - 4}" y="{ax.sy(t) + 4:.1f}" text-anchor="end">{_num(t)}</text>')
    parts.append(f'<text x="{left + ax.pw / 2:.1f}" y="{height - 6}" text-anchor="middle">'
                 f"{text(xlabel, 70)}</text>")
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if c <= 0:
            continue
        xa, xb = ax.sx(a), ax.sx(b)
        parts.append(f'<rect x="{xa:.1f}" y="{ax.sy(c):.1f}" width="{max(xb - xa - 0.5, 0.5):.1f}" '
                     f'height="{ax.sy(0) - ax.sy(c):.1f}" fill="#9ecae1"><title>{_num(a)} to '
                     f"{_num(b)}: {c:g}</title></rect>")
    for j, m in enumerate(marks):
        x = ax.sx(m.value)
        parts.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{top + ax.ph}" '
                     f'stroke="{m.colour}" stroke-width="2"/><text x="{x:.1f}" '
                     f'y="{top - 9 - 11 * (j % 2)}" text-anchor="{"end" if x > width * 0.6 else "start"}" '
                     f'fill="{m.colour}">{text(m.label, 40)}</text>')
    parts.append("</svg>")
    return "".join(parts)
