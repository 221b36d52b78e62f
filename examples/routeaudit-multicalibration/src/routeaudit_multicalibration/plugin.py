"""The ``multicalibration`` audit: calibrated on every routing-defined group of some size.

One cell per grouping (a routing summary's tertiles, or a label's values; see
:mod:`.groups`); a group is claimed when it has at least ``--multical-min-size`` evaluation
examples in every seed. Outcomes (bounds from :mod:`.estimate`, at level α):

* ``fail``: some claimed group's ECE15 is shown above ``--multical-tol``: its lower bound
  exceeds the tolerance, Holm-corrected across every claimed group of every cell;
* ``pass``: every claimed group's upper bound is below the tolerance (an
  intersection-union test; Holm across cells) and each plug-in lies below its boundary in
  every seed (``--stability``);
* ``inconclusive`` otherwise, saying which group is undecided and about how much more
  evaluation data would decide, or that no group is large enough yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import routeaudit
import routeaudit.optiontypes as optiontypes
from routeaudit.stats import holm
from routeaudit.stats.evidence import data_needed, p_text, scale_text

from routeaudit_multicalibration import groups as grouping
from routeaudit_multicalibration.estimate import N_BINS, GroupBounds, estimate

#: Defaults of ``--multical-tol`` and ``--multical-min-size``.
TOLERANCE = 0.05
MIN_SIZE = 200
#: Groups listed in a verdict's evidence (least calibrated first), to keep it small.
LISTED = 16


@dataclass
class CellGroups:
    """One cell's groups: the claimed ones pooled over seeds, and the ones too small."""

    by: str
    claimed: list[GroupBounds]
    small: dict[str, int]
    """Label → smallest size over seeds, of the groups below the minimum size."""
    n_eval: int
    n_examples: int


class MulticalibrationAudit(routeaudit.BaseAudit):
    name = "multicalibration"
    claim = ("The model is calibrated on every routing-defined group of at least the minimum "
             "size: each group's ECE15 is within the tolerance.")
    needs = frozenset({"traces"})
    min_examples = 20

    def planted_cases(self) -> str:
        return ("its claim holds at ECE <= --multical-tol, so there is no planted effect of "
                "size 0 to refute; its tests simulate its error rates")

    def cells(self, ctx: routeaudit.AuditContext) -> list[dict[str, Any]]:
        return [{"groups": by} for by in grouping.groupings(ctx)]

    def run(self, ctx: routeaudit.AuditContext, cells: list[dict[str, Any]]
            ) -> list[routeaudit.Verdict]:
        tol = float(ctx.option("multical_tol", TOLERANCE))
        min_size = int(ctx.option("multical_min_size", MIN_SIZE))
        alpha = ctx.settings.alpha
        found = [self._groups(ctx, cell["groups"], tol, min_size) for cell in cells]
        # fail: every claimed group of every cell is one comparison, one Holm across all
        p_fail = [g.p_fail() for cg in found for g in cg.claimed]
        adjusted = iter(holm(p_fail) if p_fail else [])
        fail_adj = [[float(next(adjusted)) for _ in cg.claimed] for cg in found]
        # pass: every group of a cell (intersection-union: its largest p), Holm across cells
        p_cell = [max(g.p_pass() for g in cg.claimed) if cg.claimed else float("nan")
                  for cg in found]
        decidable = [i for i, p in enumerate(p_cell) if math.isfinite(p)]
        pass_adj = dict(zip(decidable, holm([p_cell[i] for i in decidable]) if decidable else [],
                            strict=True))
        threshold = {"multical_tol": tol, "multical_min_size": min_size, "alpha": alpha,
                     "bins": N_BINS, "bin_strategy": "equal_width", "closed": "right",
                     "interval_level": 1 - 2 * alpha, "stability": ctx.settings.stability,
                     "correction": "fail: Holm across every claimed group of every cell; "
                                   "pass: every group of the cell (intersection-union), Holm "
                                   "across cells"}
        return [self._verdict(ctx, cell, cg, fail_adj[i], pass_adj.get(i, float("nan")),
                              {**threshold, "groups": grouping.describe(ctx, cg.by)})
                for i, (cell, cg) in enumerate(zip(cells, found, strict=True))]

    def _groups(self, ctx: routeaudit.AuditContext, by: str, tol: float, min_size: int
                ) -> CellGroups:
        # per seed: label -> its estimate, or its size when below the minimum
        per_seed: list[dict[str, Any]] = []
        for seed in ctx.seeds:
            conf, correct = seed.conf_correct("eval")
            units = grouping.units(seed)
            found: dict[str, Any] = {}
            for label, mask in grouping.seed_groups(ctx, seed, by).items():
                size = int(mask.sum())
                found[label] = size if size < min_size else estimate(
                    conf[mask], correct[mask], None if units is None else units[mask])
            per_seed.append(found)
        labels = list(dict.fromkeys(label for found in per_seed for label in found))
        claimed, small = [], {}
        for label in labels:
            rows = [found.get(label, 0) for found in per_seed]  # absent in a seed: size 0
            if not any(isinstance(r, int) for r in rows):
                claimed.append(GroupBounds(label, tuple(rows), tol, ctx.settings.alpha))
            else:
                small[label] = min(r if isinstance(r, int) else r.n for r in rows)
        first = ctx.seeds[0]
        return CellGroups(by, claimed, small, int(first.eval_index.size),
                          int(first.traces.n_examples))

    def _verdict(self, ctx: routeaudit.AuditContext, cell: dict[str, Any], cg: CellGroups,
                 p_fail: list[float], p_pass: float, threshold: dict[str, Any]
                 ) -> routeaudit.Verdict:
        alpha, min_size = ctx.settings.alpha, threshold["multical_min_size"]
        common: dict[str, Any] = {
            "threshold": threshold, "per_seed": [{"seed": s.seed, "n_eval": int(s.eval_index.size)}
                                                 for s in ctx.seeds],
            "statistic": "calibration slack: --multical-tol minus the largest debiased group "
                         "ECE15, pooled over seeds"}
        excluded = _excluded_text(cg, min_size)
        if not cg.claimed:
            largest = max(cg.small.values(), default=0)
            reason = (f"no group of {cg.by} has {min_size} evaluation examples in every seed "
                      f"(largest: {largest}); " + _more_data(min_size, largest, cg.n_examples))
            return ctx.verdict(self, cell, routeaudit.Status.INCONCLUSIVE, reason,
                               evidence=_evidence(cg, p_fail), **common)
        worst = max(cg.claimed, key=lambda g: g.point)
        refuted = [(g, p) for g, p in zip(cg.claimed, p_fail, strict=True) if p <= alpha]
        stable = all(g.stable(ctx.settings.stability) for g in cg.claimed)
        level = f"{100 * (1 - 2 * alpha):g}%"
        if refuted:
            status = routeaudit.Status.FAIL
            head, p_head = min(refuted, key=lambda gp: gp[1])
            items = "; ".join(f"{_describe(g, level)} (Holm p {p_text(p)})"
                              for g, p in sorted(refuted, key=lambda gp: gp[1])[:3])
            more = f" and {len(refuted) - 3} more" if len(refuted) > 3 else ""
            reason = (f"refuted: {len(refuted)} of {len(cg.claimed)} groups of {cg.by} have "
                      f"their ECE15 shown above the tolerance {threshold['multical_tol']:g}: "
                      f"{items}{more}")
            p_raw, p_adj = head.p_fail(), p_head
        else:
            head = worst
            if p_pass <= alpha and stable:
                status = routeaudit.Status.PASS
                top = max(cg.claimed, key=lambda g: g.ucb)
                reason = (f"calibrated on all {len(cg.claimed)} groups of {cg.by}: every ECE15 "
                          f"upper bound is below the tolerance {threshold['multical_tol']:g} "
                          f"(largest: {_describe(top, level)}; Holm p {p_text(p_pass)})")
            else:
                status = routeaudit.Status.INCONCLUSIVE
                reason = _undecided(cg, p_pass, p_fail, stable, alpha, level,
                                    threshold["multical_tol"])
            p_raw, p_adj = max(g.p_pass() for g in cg.claimed), p_pass
        return ctx.verdict(self, cell, status, reason + excluded, effect=worst.tol - worst.point,
                           ci=(worst.tol - worst.ucb, worst.tol - worst.lcb), p_value=p_raw,
                           p_value_corrected=p_adj, evidence=_evidence(cg, p_fail), **common)


def _describe(g: GroupBounds, level: str) -> str:
    return (f"{g.label}: ECE15 {g.point:.4f} (debiased; plug-in {g.upper:.4f}), {level} "
            f"interval [{g.lcb:.4f}, {g.ucb:.4f}], n {g.n:,}")


def _undecided(cg: CellGroups, p_pass: float, p_fail: list[float], stable: bool,
               alpha: float, level: str, tol: float) -> str:
    """Which group keeps the cell open, and about how much more data would decide it: the
    nearest refutation when some group leans above the tolerance, else the group that
    needs the most data to be shown below it."""
    open_groups = [g for g, p in zip(cg.claimed, p_fail, strict=True) if p > alpha]
    above = [g for g in open_groups if g.point > tol]
    factor = lambda g: data_needed(g.directed(), 0.0, alpha)[0]  # noqa: E731
    if above:
        head = min(above, key=factor)
    else:
        below = [g for g in open_groups if g.ucb >= tol] or open_groups
        head = max(below, key=factor)
    text = (f"not decided at tolerance {tol:g}: {_describe(head, level)}; shown neither "
            f"below (Holm p {p_text(p_pass)}) nor above (Holm p "
            f"{p_text(min(p_fail))}) the tolerance; "
            + scale_text(head.directed(), 0.0, alpha, cg.n_eval,
                         goals=("show every group's ECE below the tolerance",
                                f"show the ECE of {head.label} above the tolerance")))
    if not stable and p_pass <= alpha:
        text = ("every group's ECE is shown below the tolerance pooled over seeds, but not in "
                "every seed (--stability); " + text)
    return text


def _more_data(need: int, have: int, n_examples: int) -> str:
    if have <= 0:
        return "more data may never fill a group"
    factor = need / have
    return (f"about {factor:.1f}× the data (N ≈ {math.ceil(factor * n_examples):,}) would "
            "let the claim be tested, or lower --multical-min-size")


def _excluded_text(cg: CellGroups, min_size: int) -> str:
    if not cg.small or not cg.claimed:
        return ""
    return (f"; {len(cg.small)} group(s) below --multical-min-size {min_size} are not claimed "
            f"({', '.join(sorted(cg.small)[:4])}{', ...' if len(cg.small) > 4 else ''})")


def _evidence(cg: CellGroups, p_fail: list[float]) -> dict[str, Any]:
    rows = [{**g.as_dict(), "p_fail_holm": round(float(p), 6)}
            for g, p in zip(cg.claimed, p_fail, strict=True)]
    rows.sort(key=lambda row: -row["ece"])
    small = sorted(cg.small.items())
    return {"groups": rows[:LISTED], "groups_claimed": len(rows),
            "groups_small": [{"group": k, "n": int(v)} for k, v in small[:LISTED]],
            "groups_small_total": len(small), "n_eval": cg.n_eval,
            "p_fail_holm": float(np.min(p_fail)) if p_fail else None}


@routeaudit.hookimpl
def routeaudit_addoption(parser: Any) -> None:
    group = parser.getgroup("multicalibration")
    group.add_argument("--multical-tol", type=optiontypes.positive_number, default=TOLERANCE,
                       metavar="T", help="a group is calibrated when its ECE15 is <= T "
                       f"({TOLERANCE:g})")
    group.add_argument("--multical-min-size", type=optiontypes.positive_int, default=MIN_SIZE,
                       metavar="N", help="groups with fewer evaluation examples than N (in "
                       f"some seed) are not claimed ({MIN_SIZE})")


@routeaudit.hookimpl
def routeaudit_register_summaries(registry: Any) -> None:
    registry.register(grouping.TOP_SOURCE, grouping.top_source,
                      "source with the largest routing weight at the last layer (a label)",
                      applies_to="depth", categorical=True)


@routeaudit.hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [MulticalibrationAudit()]
