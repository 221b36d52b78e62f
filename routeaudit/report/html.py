"""HTML reporter (``--html PATH``): one self-contained page with inline SVG figures.

No network and no external JS/CSS. The status filter is CSS-only (``:checked``); a text
filter is a few lines of inline script, and the page works without it. :func:`figures`
chooses the figures from what each verdict records (``per_seed``, ``ci``, ``evidence``) and
:mod:`routeaudit.report.svg` draws them; a figure is drawn only when its data are in the
report, so reports written before the data were recorded still render, with fewer figures.
Nothing is re-estimated here. Every piece of text that comes from a run (targets, audit
names, cells, reasons, values) is escaped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from routeaudit.hookspecs import hookimpl
from routeaudit.report.files import check_target, write_atomic
from routeaudit.report.svg import (
    PALETTE,
    Band,
    Point,
    Ref,
    Row,
    Series,
    finite,
    histogram,
    interval_chart,
    text,
    xy_chart,
)
from routeaudit.report.terminal import config_text, effect_text, p_text, summary_line
from routeaudit.verdict import Report, Verdict

COLOURS = {"pass": "#d4edda", "fail": "#f8d7da", "inconclusive": "#fff3cd",
           "error": "#f5c6cb", "skip": "#e2e3e5"}
STATUSES = tuple(COLOURS)

STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin-bottom:1em}
td,th{border:1px solid #ccc;padding:3px 7px;vertical-align:top;text-align:left;font-size:13px}
th{background:#f4f4f4}.flt{display:none}
.bar{margin:.8em 0;display:flex;gap:6px;align-items:center;flex-wrap:wrap}
.chip{padding:2px 9px;border:1px solid #999;border-radius:10px;cursor:pointer;user-select:none}
.figs{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0}
figcaption{font-size:12px;color:#555;max-width:560px}
svg.fig{background:#fff;border:1px solid #ddd;display:block}
section.v{border-top:1px solid #ddd;padding:.4em 0 1em}
.reason{max-width:640px}.note{font-size:13px;color:#555}.src-default{color:#888}.nomatch{display:none}
details table{margin:.4em 0}code{font-size:12px}
"""

SCRIPT = """(function(){var q=document.getElementById('q');if(!q)return;
q.addEventListener('input',function(){var s=q.value.toLowerCase();
document.querySelectorAll('.v').forEach(function(e){
var k=(e.getAttribute('data-key')||'').toLowerCase();
e.classList.toggle('nomatch',s!==''&&k.indexOf(s)<0);});});})();"""


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    """One figure: its SVG, a caption saying how to read it, and a ``key`` when several
    verdicts record the same data (it is drawn once, at the first of them)."""

    svg: str
    caption: str
    key: str = ""
    title: str = ""
    """What a note says when the figure is drawn elsewhere (figures with a key)."""


def _f(x: Any) -> float | None:
    return float(x) if finite(x) else None


def _pair(x: Any) -> tuple[float | None, float | None]:
    if isinstance(x, (list, tuple)) and len(x) == 2:
        return _f(x[0]), _f(x[1])
    return None, None


def _dicts(x: Any) -> list[dict[str, Any]]:
    return [e for e in x if isinstance(e, dict)] if isinstance(x, list) else []


def _columns(table: Any, names: tuple[str, ...]) -> list[tuple[Any, ...]] | None:
    """The rows of a recorded column table (a dict of equally long lists), or None."""
    if not isinstance(table, dict):
        return None
    cols = [table.get(k) for k in names]
    if not all(isinstance(c, list) for c in cols) or len({len(c) for c in cols}) != 1:  # type: ignore[arg-type]
        return None
    return list(zip(*cols, strict=True))  # type: ignore[misc]


def _size(n: Any, biggest: float) -> float:
    return 2.0 + 4.0 * math.sqrt(max(float(n), 0.0) / biggest) if finite(n) and biggest > 0 else 3.0


def _strata_names(n: int) -> list[str]:
    if n == 3:
        return ["low", "middle", "high"]
    if n == 2:
        return ["low", "high"]
    return [f"stratum {k + 1}" for k in range(n)]


def _reliability_strata(v: Verdict) -> list[Figure]:
    """Reliability per routing stratum at matched confidence (stratification, permutation_null)."""
    rel = v.evidence.get("reliability")
    rows = _columns(rel, ("bin", "stratum", "count", "confidence", "accuracy"))
    if not rows:
        return []
    rows = [r for r in rows if all(finite(x) for x in r)]
    if not rows:
        return []
    n_strata = int(max(r[1] for r in rows)) + 1
    names = _strata_names(n_strata)
    summary = str(v.cell.get("summary", "routing summary"))
    biggest = float(max(r[2] for r in rows))
    rel_series, gap_series = [], []
    for t in range(n_strata):
        mine = [r for r in rows if int(r[1]) == t]
        label = f"{names[t]} {summary}"
        colour = PALETTE[t % len(PALETTE)]
        tips = [f"bin {int(b)}, {label}: confidence {c:.3f}, accuracy {a:.3f}, n = {int(n)}"
                for b, _, n, c, a in mine]
        rel_series.append(Series(label, [Point(c, a, tip=tip, size=_size(n, biggest))
                                         for (_, _, n, c, a), tip in zip(mine, tips, strict=True)],
                                 colour))
        gap_series.append(Series(label, [Point(c, a - c, tip=tip, size=_size(n, biggest))
                                         for (_, _, n, c, a), tip in zip(mine, tips, strict=True)],
                                 colour))
    seed = rel.get("seed", "?") if isinstance(rel, dict) else "?"
    where = "within each confidence bin" if (isinstance(rel, dict) and rel.get("strata") !=
                                             "global") else "over all examples"
    key = f"reliability|{v.target}|{json.dumps(v.cell, sort_keys=True, default=str)}|{seed}"
    caption = (f"Seed {seed}, evaluation split: one point per (confidence bin, {summary} "
               f"stratum) cell, strata cut {where}, point area growing with the examples in "
               "the cell. At matched confidence, strata that separate show a routing-conditional "
               "calibration gap; curves that overlap show none.")
    return [Figure(xy_chart(rel_series, f"reliability per {summary} stratum (seed {seed})",
                            "mean confidence", "accuracy", diagonal=True, square=True,
                            kind="reliability"), caption, key, "reliability per stratum"),
            Figure(xy_chart(gap_series, f"accuracy − confidence per {summary} stratum",
                            "mean confidence of the cell", "accuracy − confidence",
                            hlines=[Ref(0.0, "calibrated", "#777")], kind="reliability-gap"),
                   "The same cells as gaps: the distance between the strata at one confidence is "
                   "what the weighted gap averages.", key, "reliability per stratum")]


def _null(v: Verdict) -> list[Figure]:
    """The permutation null of each seed, with the observed statistic marked."""
    out = []
    for e in _dicts(v.per_seed):
        h = e.get("null_histogram")
        if not isinstance(h, dict):
            continue
        counts, edges = h.get("counts"), h.get("edges")
        if not isinstance(counts, list) or not isinstance(edges, list):
            continue
        observed = _f(h.get("statistic"))
        marks = [Ref(observed, f"observed T = {observed:.3g}")] if observed is not None else []
        if finite(e.get("null_mean")):
            marks.append(Ref(float(e["null_mean"]), "null mean", "#555"))
        p = e.get("p_value")
        title = f"permutation null, seed {e.get('seed', '?')}" + (f" (p = {p:.3g})" if finite(p)
                                                                  else "")
        svg = histogram(counts, edges, title, "weighted gap with routing permuted within bins",
                        marks=marks, kind="null")
        if svg:
            out.append(Figure(svg, f"{h.get('draws', sum(c for c in counts if finite(c)))} "
                              "permutation draws of the weighted gap (routing shuffled among "
                              "examples of the same confidence bin); the red line is the "
                              "observed value. Far to the right of the bars: routing carries "
                              "calibration signal beyond confidence."))
    return out


def _gain(v: Verdict) -> list[Figure]:
    """Candidate vs each control: worst-tertile ECE per seed, and the gains with intervals."""
    ps = [e for e in _dicts(v.per_seed)
          if isinstance(e.get("metrics"), dict) and isinstance(e.get("gains"), dict)]
    if not ps:
        return []
    metric = str(v.threshold.get("metric", "worst_tertile_ece"))
    controls = list(dict.fromkeys(c for e in ps for c in e["gains"]))
    probes = ["candidate", *controls, "raw"]
    rows: list[Row] = []
    bands: list[Band] = []
    for j, probe in enumerate(probes):
        colour = "#222" if probe == "candidate" else PALETTE[j % len(PALETTE)]
        first = len(rows)
        values = []
        for e in ps:
            x = e["metrics"].get(probe)
            value = _f(x.get(metric)) if isinstance(x, dict) else None
            if value is not None:
                values.append(value)
                rows.append(Row(f"{probe} · seed {e.get('seed', '?')}", value, colour=colour))
        if len(values) >= 2:
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
            bands.append(Band(first, len(rows) - 1, mean - sd, mean + sd))
    out = []
    svg = interval_chart(rows, f"{metric} per seed: candidate vs controls", metric,
                         bands=bands, kind="gain-ece", left=260)
    if svg:
        out.append(Figure(svg, "Each probe's metric in every seed (lower is better); the shaded "
                          "band is its mean ± sd over seeds (the seed band). The candidate (black) "
                          "should sit left of every control."))
    rows, bands = [], []
    level = v.threshold.get("interval_level", 0.9)
    for j, control in enumerate(controls):
        colour = PALETTE[(j + 1) % len(PALETTE)]
        first = len(rows)
        for e in ps:
            g = e["gains"].get(control)
            if isinstance(g, dict) and finite(g.get("gain")):
                rows.append(Row(f"{control} · seed {e.get('seed', '?')}", float(g["gain"]),
                                *_pair(g.get("ci")), colour=colour))
        ev = v.evidence.get(control)
        if isinstance(ev, dict) and finite(ev.get("estimate")):
            lo, hi = _pair(ev.get("interval"))
            rows.append(Row(f"{control} · pooled", float(ev["estimate"]), lo, hi, colour="#222"))
            if lo is not None and hi is not None:
                bands.append(Band(first, len(rows) - 1, lo, hi))
    refs = [Ref(0.0, "no gain", "#777")]
    if finite(v.threshold.get("margin")):
        refs.append(Ref(float(v.threshold["margin"]), "margin"))
    svg = interval_chart(rows, "gain over each control: per seed and pooled",
                         f"{metric}(control) − {metric}(candidate)", refs=refs, bands=bands,
                         kind="gain", left=260)
    if svg:
        out.append(Figure(svg, "Whiskers: each seed's paired-bootstrap interval; black and shaded: "
                          f"the pooled estimate and its {_level(level)} interval. Pass needs every "
                          "pooled interval above 0; a pooled interval below the margin refutes."))
    return out


def _level(x: Any) -> str:
    return f"{100 * float(x):g}%" if finite(x) else "reported"


def _causal(v: Verdict) -> list[Figure]:
    """Routing mass vs causal effect per slice (causal_ablation)."""
    ps = [e for e in _dicts(v.per_seed) if finite(e.get("mass")) and finite(e.get("delta_nll"))]
    if not ps:
        return []
    groups: dict[bool, list[Point]] = {True: [], False: []}
    for e in ps:
        lo, hi = _pair(e.get("ci"))
        name = str(e.get("slice", "?"))
        groups[bool(e.get("top_mass"))].append(Point(
            float(e["mass"]), float(e["delta_nll"]), lo, hi, label=name,
            tip=f"{name}: mass {e['mass']:.3f}, ΔNLL {e['delta_nll']:+.4f}"))
    series = [Series("top-mass slice", groups[True], PALETTE[1], line=False),
              Series("other slices", groups[False], PALETTE[0], line=False)]
    hlines = [Ref(0.0, "no effect", "#777")]
    margin = _f(v.threshold.get("nll_margin"))
    if margin:
        hlines.append(Ref(margin, "margin"))
    mass_min = _f(v.threshold.get("mass_min"))
    vlines = [Ref(mass_min, f"mass_min {mass_min:g}", "#555")] if mass_min is not None else []
    svg = xy_chart(series, f"routing mass vs causal effect ({v.cell.get('sublayer', 'all')})",
                   "routing mass", "ΔNLL when ablated (nats)", hlines=hlines, vlines=vlines,
                   kind="causal", width=520)
    return [Figure(svg, "One point per (sublayer, depth band, source family) slice, whiskers its "
                   "interval. If mass indicated importance, the top-mass slice would have the "
                   "largest ΔNLL and every slice right of mass_min would lie above the margin.")
            ] if svg else []


def _experts(v: Verdict) -> list[Figure]:
    """Per-expert and aggregate ECE, reliability, and the worst routing shift."""
    ps = _dicts(v.per_seed)
    out: list[Figure] = []
    rows: list[Row] = []
    for e in ps:
        seed = e.get("seed", "?")
        for x in _dicts(e.get("experts")):
            if finite(x.get("ece")):
                rows.append(Row(f"seed {seed} · expert {x.get('expert', '?')}", float(x["ece"]),
                                *_pair(x.get("interval")), colour=PALETTE[0]))
        if "experts" not in e and finite(e.get("ece")) and "expert_load" in e:
            what = "worst case" if "worst_cell_weights" in e else "aggregate"
            rows.append(Row(f"seed {seed} · {what}", float(e["ece"]), *_pair(e.get("interval")),
                            colour="#222"))
    tol = _f(v.threshold.get("ece_tol"))
    svg = interval_chart(rows, "ECE15 (debiased) with interval", "ECE15",
                         refs=[Ref(tol, "tolerance")] if tol is not None else [],
                         kind="expert-ece")
    if svg:
        out.append(Figure(svg, "Pass: every interval ends below the tolerance; fail: one lies "
                          "wholly above it."))
    rel = ps[0].get("reliability") if ps else None
    if isinstance(rel, dict):
        series = []
        for j, x in enumerate(_dicts(rel.get("experts"))):
            rows_x = _columns(x, ("count", "confidence", "accuracy"))
            if rows_x:
                series.append(Series(f"expert {x.get('expert', j)}", [
                    Point(c, a, tip=f"expert {x.get('expert', j)}: confidence {c:.3f}, accuracy "
                          f"{a:.3f}, n = {n}", size=2.5)
                    for n, c, a in rows_x if finite(c) and finite(a)],
                    PALETTE[j % len(PALETTE)], width=1.0, dash="3 2"))
        agg = _columns(rel.get("aggregate"), ("count", "confidence", "accuracy"))
        if agg:
            series.append(Series("aggregate", [Point(c, a, tip=f"aggregate: confidence {c:.3f}, "
                                                     f"accuracy {a:.3f}, n = {n}", size=3.5)
                                               for n, c, a in agg if finite(c) and finite(a)],
                                 "#222", width=2.5))
        svg = xy_chart(series, f"reliability: experts vs aggregate (seed {rel.get('seed', '?')})",
                       "mean confidence", "accuracy", diagonal=True, square=True,
                       kind="expert-reliability", width=480, height=380)
        if svg:
            who = "each expert's own prediction" if rel.get("expert_prediction") == "own" else \
                "the aggregate's prediction"
            total, shown = rel.get("experts_total"), len(_dicts(rel.get("experts")))
            some = (f" The {shown} most loaded of {total} experts are drawn."
                    if finite(total) and total > shown else "")
            out.append(Figure(svg, f"ECE15 bins (equal width) of the evaluation split: dashed, "
                              f"{who} on the tokens routed to that expert; solid, the routed "
                              f"aggregate. Below the diagonal: over-confident.{some}"))
    rows = []
    for e in ps:
        weights = e.get("worst_cell_weights")
        if not isinstance(weights, list) or not weights:
            continue
        load = e.get("expert_load") if isinstance(e.get("expert_load"), list) else []
        for j, w in enumerate(weights[:16]):
            share = f" (load {load[j]:.2f})" if j < len(load) and finite(load[j]) else ""
            rows.append(Row(f"seed {e.get('seed', '?')} · expert {j}{share}", _f(w) or 0.0,
                            colour=PALETTE[1], bar=True))
    refs = [Ref(1.0, "no shift", "#555")]
    ratio = _f(v.threshold.get("shift_ratio"))
    if ratio is not None and v.threshold.get("shift_kl") is None:
        refs.append(Ref(ratio, f"ratio bound {ratio:g}"))
    svg = interval_chart(rows, "worst routing-only shift: weight per routed expert",
                         "likelihood ratio w (1 = the evaluation mix)", refs=refs,
                         kind="worst-shift")
    if svg:
        out.append(Figure(svg, "The reweighting of the experts' regions under which the "
                          "aggregate's ECE is largest (the plug-in maximiser)."))
    return out


def _generic(v: Verdict) -> list[Figure]:
    """Any per-entry number with a ``ci`` beside it (e.g. content_dependence per layer)."""
    rows = []
    for i, e in enumerate(_dicts(v.per_seed)):
        lo, hi = _pair(e.get("ci"))
        keys = [k for k, x in e.items() if k not in ("seed", "se", "ci") and finite(x)]
        if lo is not None and keys:
            label = next((str(e[k]) if str(e[k]).startswith(k) else f"{k} {e[k]}"
                          for k in ("seed", "layer", "slice", "expert") if k in e), f"#{i}")
            rows.append(Row(f"{label}: {keys[0]}", float(e[keys[0]]), lo, hi))
    svg = interval_chart(rows, f"{v.audit}: recorded estimates with intervals", "")
    return [Figure(svg, "Each recorded estimate with its interval.")] if svg else []


def _pooled(v: Verdict) -> list[Figure]:
    if v.effect is None or v.ci is None:
        return []
    refs = [Ref(0.0, "0", "#777")]
    margin = _f(v.evidence.get("margin"))
    if margin:
        refs.append(Ref(margin, "margin"))
    svg = interval_chart([Row("pooled", v.effect, v.ci[0], v.ci[1], "#222")],
                         f"effect: {v.statistic or 'effect'}", "", refs=refs, kind="effect")
    return [Figure(svg, "The verdict's effect and interval, against 0 and the margin it is "
                   "judged with.")] if svg else []


def figures(v: Verdict) -> list[Figure]:
    """Every figure this verdict's recorded data allow (possibly none); a kind of figure is
    chosen by the data present, so a plugin audit that records the same shapes gets it too."""
    specific = _reliability_strata(v) + _null(v) + _gain(v) + _causal(v) + _experts(v)
    return (specific or _generic(v)) + _pooled(v)


def _value(x: Any, limit: int = 160) -> str:
    """A recorded value as short escaped text (long lists are counted, not printed)."""
    if isinstance(x, float):
        return text(f"{x:.4g}")
    if isinstance(x, list) and len(x) > 8:
        return text(f"({len(x)} values)")
    if isinstance(x, (dict, list)):
        return f"<code>{text(json.dumps(x, default=str), limit)}</code>"
    return text(x, limit)


def _small_table(entries: list[dict[str, Any]]) -> str:
    """Per-seed (or per-slice) entries as a table over the union of their keys."""
    keys: list[str] = []
    for e in entries:
        keys += [k for k in e if k not in keys]
    head = "".join(f"<th>{text(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_value(e.get(k, ''))}</td>" for k in keys) + "</tr>"
                   for e in entries)
    return f"<table><tr>{head}</tr>{body}</table>"


def _details(v: Verdict) -> str:
    parts = [f"<p>{text(v.claim)}</p>"]
    if v.statistic:
        parts.append(f"<p>statistic: {text(v.statistic)}</p>")
    if v.threshold:
        parts.append("<p>thresholds: " + "; ".join(f"{text(k)} = {_value(x)}"
                                                    for k, x in v.threshold.items()) + "</p>")
    if v.per_seed:
        parts.append(_small_table(v.per_seed))
    if v.evidence:
        parts.append("<p>evidence: " + "; ".join(f"{text(k)} = {_value(x)}"
                                                  for k, x in v.evidence.items()) + "</p>")
    if v.traceback:
        parts.append(f"<pre>{text(v.traceback)}</pre>")
    return f"<details><summary>claim, thresholds, seeds</summary>{''.join(parts)}</details>"


def _config(report: Report) -> str:
    sources = report.config_sources
    note = "" if sources else ("<p>This report does not record where each value came from "
                               "(written before config sources were recorded).</p>")
    rows = []
    for key, value in report.config.items():
        src = sources.get(key, "")
        cls = " class='src-default'" if src == "default" else ""
        rows.append(f"<tr><td>{text(key)}</td><td>{text(config_text(value), 300)}</td>"
                    f"<td{cls}>{text(src or '—')}</td></tr>")
    return (f"<h2 id='config'>Effective configuration</h2>{note}<table><tr><th>option</th>"
            f"<th>value</th><th>from</th></tr>{''.join(rows)}</table>")


def render(report: Report) -> str:
    rows, sections = [], []
    drawn: dict[str, tuple[str, str]] = {}  # figures several verdicts share: drawn once
    counts = report.summary.model_dump(by_alias=True)
    several = len({v.target for v in report.verdicts}) > 1  # else the header names it
    for i, v in enumerate(report.verdicts):
        status = v.status.value
        key = text(f"{v.nodeid} {status} {v.reason}", 2000)
        figs = []
        noted: set[str] = set()
        for fig in figures(v):
            if fig.key and fig.key in drawn and drawn[fig.key][0] != f"fig{i}":
                if fig.key not in noted:  # one note for the figures that share a key
                    noted.add(fig.key)
                    anchor, node = drawn[fig.key]
                    figs.append(f"<p class='note'>{text(fig.title)}: drawn with "
                                f"<a href='#{anchor}'>{text(node)}</a></p>")
                continue
            if fig.key:
                drawn.setdefault(fig.key, (f"fig{i}", v.nodeid))
            figs.append(f"<figure>{fig.svg}<figcaption>{text(fig.caption)}</figcaption></figure>")
        link = f" <a href='#fig{i}'>figures</a>" if figs else ""
        cell = ", ".join(f"{k}={x}" for k, x in v.cell.items())
        rows.append(
            f"<tr class='v st-{text(status)}' data-key='{key}' "
            f"style='background:{COLOURS.get(status, '#fff')}'>"
            + (f"<td>{text(v.target)}</td>" if several else "")
            + f"<td>{text(v.audit)}</td><td>{text(cell)}{link}</td>"
            f"<td>{text(status)}</td><td>{text(effect_text(v))}</td><td>{text(p_text(v))}</td>"
            f"<td class='reason'>{text(v.reason)}{_details(v)}</td></tr>")
        if figs:
            sections.append(f"<section class='v st-{text(status)}' id='fig{i}' data-key='{key}'>"
                            f"<h3>{text(v.nodeid)} — {text(status)}</h3>"
                            f"<div class='figs'>{''.join(figs)}</div></section>")
    boxes = "".join(f"<input type='checkbox' class='flt' id='f-{s}' checked>" for s in STATUSES)
    chips = "".join(f"<label class='chip' for='f-{s}' style='background:{COLOURS[s]}'>{s} "
                    f"({counts.get(s, 0)})</label>" for s in STATUSES)
    hide = "".join(f"#f-{s}:not(:checked)~main .st-{s}{{display:none}}"
                   f"#f-{s}:not(:checked)~.bar label[for=f-{s}]"
                   "{opacity:.45;text-decoration:line-through}" for s in STATUSES)
    targets = ", ".join(report.targets)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>routeaudit report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{STYLE}{hide}</style></head>
<body><h1>routeaudit report</h1>
<p>{text(summary_line(report).strip("= "))}; exit code {int(report.exit_code)}; routeaudit
{text(report.routeaudit_version)}; targets {text(targets)}; seeds {text(report.seeds)}</p>
{boxes}<div class="bar">show: {chips}
<input type="search" id="q" placeholder="filter by text" aria-label="filter by text">
<a href="#config">configuration</a></div>
<main><table><tr>{'<th>target</th>' if several else ''}<th>audit</th><th>cell</th><th>status</th>
<th>effect [CI]</th><th>p raw / corrected</th><th>reason</th></tr>{''.join(rows)}</table>
<h2>Figures</h2>{''.join(sections) or '<p>No verdict recorded data to draw.</p>'}
{_config(report)}</main>
<script>{SCRIPT}</script></body></html>
"""


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
