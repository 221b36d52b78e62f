"""Audit: the within-confidence-bin routing-permutation null (docs/methods.md §2.5).

Claim per routing summary S: "S carries calibration signal beyond confidence", i.e. the
conditional null Y ⟂ S | C is rejected. T is the weighted gap of §2.4; its null distribution
comes from permuting S within each confidence bin, which keeps confidence, correctness and
every stratum size and only breaks the routing ↔ correctness link at matched confidence.
p-values are Holm-corrected across the summaries tested, separately in each seed, and the
claim passes only if it is rejected in every seed (``--stability majority`` relaxes this).
A test that does not reject is not a refutation: the claim fails only when the excess gap
(pooled over seeds, :mod:`routeaudit.stats.excess`) is shown below ``--gap-margin``, and is
``inconclusive`` otherwise, with about how much more data would decide (§5.2).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.audit import AuditContext, BaseAudit
from routeaudit.audits.stratification import first_seed_reliability
from routeaudit.hookspecs import hookimpl
from routeaudit.simulation.plan import PlantedCases, matched_cases
from routeaudit.stats import holm, stable
from routeaudit.stats.evidence import Evidence, p_text, scale_text
from routeaudit.stats.excess import MatchedExcess, Undecided, excess_row, pooled_excess
from routeaudit.stats.seeds import need_text
from routeaudit.verdict import Status, Verdict


class PermutationNullAudit(BaseAudit):
    name = "permutation_null"
    claim = "The routing summary carries calibration signal beyond confidence."
    needs = frozenset({"traces"})
    min_examples = 100
    routing_aware = True

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        return ctx.summary_cells()

    def planted_cases(self) -> PlantedCases:
        return matched_cases()

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        s = ctx.settings
        # rows[cell][seed]: the test and excess gap, or why the summary cannot carry signal
        rows = [[ctx.matched_excess(cell["summary"], seed) for seed in ctx.seeds]
                for cell in cells]
        raw = np.array([[r.test.p_value if isinstance(r, MatchedExcess) and r.usable
                         else np.nan for r in row] for row in rows],
                       dtype=float).reshape(len(cells), -1)
        corrected = np.column_stack([holm(raw[:, j]) for j in range(raw.shape[1])]) \
            if raw.size else raw
        pooled = [pooled_excess(row) for row in rows]
        decidable = [i for i, ev in enumerate(pooled) if isinstance(ev, Evidence)]
        below = dict(zip(decidable, holm([pooled[i].p_below(s.gap_margin)  # type: ignore[union-attr]
                                          for i in decidable]), strict=True))
        return [self._verdict(ctx, cell, rows[i], raw[i], corrected[i], pooled[i],
                              float(below.get(i, np.nan)))
                for i, cell in enumerate(cells)]

    def _verdict(self, ctx: AuditContext, cell: dict[str, Any], rows: list[Any],
                 raw: np.ndarray, corrected: np.ndarray, ev: Evidence | Undecided,
                 p_below: float) -> Verdict:
        s = ctx.settings
        threshold = {"alpha": s.alpha, "correction": "holm across summaries",
                     "stability": s.stability, "permutations": s.n_permutations,
                     "sequential_h": s.sequential_h,
                     "margin": s.gap_margin, "interval_level": 1 - 2 * s.alpha}
        per_seed = []
        for seed, row, p, pc in zip(ctx.seeds, rows, raw, corrected, strict=True):
            entry = {"seed": seed.seed, **excess_row(row, s.alpha)}
            if isinstance(row, MatchedExcess) and row.usable:
                entry.update(p_value=float(p), p_value_corrected=float(pc),
                             rejects=bool(pc <= s.alpha))
            if isinstance(row, MatchedExcess):
                hist = null_histogram(row.test.null, row.test.statistic)
                if hist:
                    entry["null_histogram"] = hist
            per_seed.append(entry)
        common = dict(statistic="weighted gap minus its within-bin null mean",
                      threshold=threshold, per_seed=per_seed)
        rel = first_seed_reliability(ctx, cell["summary"])
        extra = {"reliability": rel} if rel else {}
        if isinstance(ev, Undecided):
            return ctx.verdict(self, cell, Status.FAIL if ev.premise_violated
                               else Status.INCONCLUSIVE, ev.reason, evidence=extra, **common)
        rejects = [bool(pc <= s.alpha) for pc in corrected]
        ps = ", ".join(p_text(float(pc)) for pc in corrected)
        lo, hi = ev.interval(s.alpha)
        level = f"{100 * (1 - 2 * s.alpha):g}%"
        excess = f"pooled excess gap {ev.estimate:+.4f}, {level} interval [{lo:+.4f}, {hi:+.4f}]"
        n_eval = int(ctx.seeds[0].eval_index.size)
        if p_below <= s.alpha:
            status = Status.FAIL
            reason = (f"no signal beyond confidence worth the name: {excess} lies below the "
                      f"margin {s.gap_margin:g} (Holm p {p_text(p_below)}); the within-bin null "
                      f"is rejected in {sum(rejects)}/{len(rejects)} seeds (Holm p: {ps})")
        elif stable(rejects, s.stability):
            status = Status.PASS
            reason = (f"rejects the within-bin null in {sum(rejects)}/{len(rejects)} seeds "
                      f"(Holm p: {ps} ≤ {s.alpha}); {excess}")
        else:
            status = Status.INCONCLUSIVE
            reason = (f"rejects the within-bin null in {sum(rejects)}/{len(rejects)} seeds "
                      f"(Holm p: {ps}; a pass needs ≤ {s.alpha} in {need_text(s.stability)}), "
                      f"and the excess is not shown below the margin {s.gap_margin:g} "
                      f"({excess}, p {p_text(p_below)}); "
                      + scale_text(ev, s.gap_margin, s.alpha, n_eval))
        reduce = np.max if s.stability == "all" else np.median
        return ctx.verdict(self, cell, status, reason, effect=ev.estimate, ci=(lo, hi),
                           p_value=float(reduce(raw)), p_value_corrected=float(reduce(corrected)),
                           evidence=ev.as_dict(s.gap_margin, s.alpha) |
                           {"p_below_margin_holm": p_below} | extra, **common)


#: Bins of the recorded null histogram (the draws themselves are not recorded).
NULL_HISTOGRAM_BINS = 30


def null_histogram(null: np.ndarray, statistic: float) -> dict[str, Any] | None:
    """A compact picture of the permutation null for the report: ``counts`` of the finite
    draws T* in ``NULL_HISTOGRAM_BINS`` equal-width bins between ``edges``, and the observed
    ``statistic`` T. None when no draw is finite."""
    draws = np.asarray(null, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return None
    lo, hi = float(draws.min()), float(draws.max())
    if hi <= lo:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-9), hi + 0.5 * max(abs(hi), 1e-9)
    counts, edges = np.histogram(draws, bins=NULL_HISTOGRAM_BINS, range=(lo, hi))
    return {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges],
            "statistic": float(statistic), "draws": int(draws.size)}


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [PermutationNullAudit()]
