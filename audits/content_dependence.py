"""Audit: routing depends on the input (and follows the schedule the model declares).

Cell ``routing``: the claim "routing is content-dependent" passes when some layer's mean
total-variation distance from the mean routing, TV_l, is at least ``--tv-min`` (default 1e-4)
with its bootstrap CI (over examples, or sequences of tokens) above it. Only the layer with the
largest mean TV is bootstrapped (the claim rests on it; the other layers' means are reported),
so the cost does not grow with depth. Content-independent routing (e.g. a vanilla
model wrapped with a fixed recency-bias schedule) fails here, and the runner then fails every
routing-aware claim of the target with the reason "routing is content-independent".

Cell ``schedule`` (only when the traces declare ``meta.schedule``): the observed routing
matches the declared analytic schedule within ``--schedule-tol`` (default 1e-6).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.audit import AuditContext, BaseAudit
from routeaudit.hookspecs import hookimpl
from routeaudit.stats import cluster_bootstrap_mean
from routeaudit.summaries import per_example_tv, schedule_deviation
from routeaudit.verdict import Status, Verdict

#: Default tolerance of the declared-schedule check (``--schedule-tol``).
SCHEDULE_TOL = 1e-6


class ContentDependenceAudit(BaseAudit):
    name = "content_dependence"
    claim = "Routing varies with the input (it is content-dependent)."
    needs = frozenset({"traces"})
    min_examples = 10

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        cells = [{"check": "routing"}]
        if ctx.seeds and ctx.seeds[0].traces.meta.schedule is not None:
            cells.append({"check": "schedule"})
        return cells

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        traces = ctx.seeds[0].traces  # the model's routing; it does not depend on the split
        out = []
        for cell in cells:
            if cell["check"] == "routing":
                out.append(self._variation(ctx, traces, cell))
            else:
                out.append(self._schedule(ctx, traces, cell))
        return out

    def _variation(self, ctx: AuditContext, traces: Any, cell: dict[str, Any]) -> Verdict:
        s = ctx.settings
        tv_min = float(s.tv_min)
        tv = per_example_tv(traces)
        groups = traces.group if traces.meta.per_token else None
        names = traces.meta.layer_names or [f"layer {i}" for i in range(traces.n_layers)]
        layers = [layer for layer in range(traces.n_layers)
                  if traces.source_mask[layer].sum() >= 2]  # a single source cannot vary
        means = tv[:, layers].mean(axis=0) if layers else np.zeros(0)
        rows: list[dict[str, Any]] = [{"layer": names[layer], "tv": float(m)}
                                      for layer, m in zip(layers, means, strict=True)]
        if rows:  # the claim rests on the layer that varies most: its bootstrap CI decides
            top = rows[int(np.argmax(means))]
            layer = layers[int(np.argmax(means))]
            ctx.step(f"bootstrap of {top['layer']}")
            _, (lo, hi), _ = cluster_bootstrap_mean(
                tv[:, layer], n_boot=s.n_bootstrap, groups=groups, level=1 - s.alpha,
                rng=ctx.rng(self.name, names[layer], 0))
            top["ci"] = [lo, hi]
        common = dict(statistic="largest per-layer mean TV distance from the mean routing",
                      threshold={"tv_min": tv_min, "level": 1 - s.alpha}, per_seed=rows)
        if not rows:
            return ctx.verdict(self, cell, Status.FAIL, "routing is content-independent (no "
                               "routing variation): no layer has two or more sources", **common)
        top = next(r for r in rows if "ci" in r)
        passed = top["ci"][0] >= tv_min
        text = (f"largest TV {top['tv']:.3g} [{top['ci'][0]:.3g}, {top['ci'][1]:.3g}] at "
                f"{top['layer']}; {sum(r['tv'] >= tv_min for r in rows)}/{len(rows)} layers "
                f"vary by ≥ {tv_min:g}")
        reason = (f"routing is content-dependent: {text}" if passed else
                  f"routing is content-independent (no routing variation): {text}")
        return ctx.verdict(self, cell, Status.PASS if passed else Status.FAIL, reason,
                           effect=top["tv"], ci=tuple(top["ci"]), **common)

    def _schedule(self, ctx: AuditContext, traces: Any, cell: dict[str, Any]) -> Verdict:
        tol = float(ctx.option("schedule_tol", SCHEDULE_TOL))
        deviation, (i, layer, source) = schedule_deviation(traces)  # type: ignore[misc]
        names = traces.meta.layer_names or [f"layer {k}" for k in range(traces.n_layers)]
        passed = deviation <= tol
        where = f"example {i}, {names[layer]}, source {source}"
        reason = (f"routing matches the declared schedule: max |observed − schedule| = "
                  f"{deviation:.2g} ≤ {tol:g} ({where})" if passed else
                  f"routing departs from the declared schedule: max deviation {deviation:.3g} "
                  f"> {tol:g} at {where}")
        return ctx.verdict(self, cell, Status.PASS if passed else Status.FAIL, reason,
                           claim="Routing follows the analytic schedule the model declares.",
                           statistic="max |observed − declared schedule|", effect=deviation,
                           threshold={"tolerance": tol})


@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    group = parser.getgroup("content_dependence")
    group.add_argument("--schedule-tol", type=float, default=SCHEDULE_TOL, metavar="TOL",
                       help=f"tolerance of the declared-schedule check ({SCHEDULE_TOL:g})")


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [ContentDependenceAudit()]
