"""Routing-defined groups: tertiles of each scalar routing summary, each value of a label.

A group is defined by routing alone (never by the outcome), on each seed's evaluation
half: the tertiles of a scalar summary (``routeaudit.metrics.quantile_tiles``, cut points
from that half) or the examples sharing one value of a label summary (the top-1 expert of
MoE traces, ``top1_expert``; the source with the largest weight at the last layer of
depth-routing traces, ``top_source``, which this plugin registers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import routeaudit
from routeaudit import metrics

#: The label summary this plugin adds for depth routing (MoE traces have ``top1_expert``).
TOP_SOURCE = "top_source"
TERTILES = ("low", "mid", "high")


def top_source(traces: routeaudit.TraceSet) -> np.ndarray:
    """Index of the source with the largest routing weight at the last routing layer (the
    first of equal weights), one value per example."""
    last = traces.routing[:, -1, :].astype(np.float64)
    scores = np.where(traces.source_mask[-1][None, :], last, -np.inf)
    return scores.argmax(axis=1).astype(np.float64)


def is_label(ctx: routeaudit.AuditContext, name: str) -> bool:
    """Whether the summary ``name`` is a label (its values name groups; no order)."""
    return bool(ctx.summaries.get(name).categorical)


def groupings(ctx: routeaudit.AuditContext) -> list[str]:
    """The summaries whose groups are claimed: the ``--summary`` names (else the routing
    features the registered calibrator declares, else every built-in scalar routing
    summary), plus every label summary that applies, unless ``--summary`` names some."""
    names = [cell["summary"] for cell in ctx.summary_cells()]
    if not ctx.requested_summaries and ctx.seeds:
        traces = ctx.seeds[0].traces
        names += [s.name for s in ctx.summaries if s.kind == "routing" and s.categorical
                  and s.shape == "scalar" and s.applies(traces)]
    return list(dict.fromkeys(names))


def seed_groups(ctx: routeaudit.AuditContext, seed: routeaudit.SeedData, by: str
                ) -> dict[str, np.ndarray]:
    """Group label → boolean mask over ``seed``'s evaluation half."""
    values = seed.summary(by, "eval")
    if is_label(ctx, by):
        return {f"{by}={int(v)}": values == v for v in np.unique(values)}
    tiles = metrics.quantile_tiles(values, len(TERTILES))
    return {f"{by} tertile {t + 1}/3 ({word})": tiles == t for t, word in enumerate(TERTILES)}


def describe(ctx: routeaudit.AuditContext, by: str) -> str:
    return "each value of the label" if is_label(ctx, by) else \
        "tertiles of the summary on each seed's evaluation half"


def units(seed: routeaudit.SeedData) -> Any:
    """Resampling units of the evaluation half (sequences of token traces), or None."""
    return seed.groups("eval")
