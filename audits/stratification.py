"""Audit: matched-confidence stratification (docs/methods.md §2.4, §5.2).

Within each confidence bin, examples are split into routing strata (tertiles of the summary
inside the bin by default, ``--strata global`` for global tertiles) and the signed
calibration gaps of the strata are compared. The max-minus-min gap is positive even when
routing carries nothing, so the claim is judged on the *excess* of the weighted gap over its
expectation under the within-bin null (the mean of the permutation distribution), with a
bootstrap variance over evaluation examples (:mod:`routeaudit.stats.excess`).

The seeds' excesses are pooled (:mod:`routeaudit.stats.evidence`) and two one-sided tests,
Holm-corrected across the summaries tested, decide: ``pass`` when the excess is shown
positive (and positive in every seed), ``fail`` when it is shown below ``--gap-margin``,
``inconclusive`` otherwise, with about how much more data would decide.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.audit import AuditContext, BaseAudit
from routeaudit.hookspecs import hookimpl
from routeaudit.simulation.plan import PlantedCases, matched_cases
from routeaudit.stats import holm, seed_summary
from routeaudit.stats.evidence import Evidence, outcome, p_text, scale_text
from routeaudit.stats.excess import MatchedExcess, Undecided, excess_row, pooled_excess
from routeaudit.stats.gaps import stratum_reliability
from routeaudit.verdict import Status, Verdict


class StratificationAudit(BaseAudit):
    name = "stratification"
    claim = ("At matched confidence, routing strata differ in calibration gap by more than "
             "the within-bin null explains.")
    needs = frozenset({"traces"})
    min_examples = 100
    routing_aware = True

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        return ctx.summary_cells()

    def planted_cases(self) -> PlantedCases:
        return matched_cases()

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        s = ctx.settings
        seeds = {id(cell): [ctx.matched_excess(cell["summary"], seed) for seed in ctx.seeds]
                 for cell in cells}
        pooled = {key: pooled_excess(rows) for key, rows in seeds.items()}
        decidable = [c for c in cells if isinstance(pooled[id(c)], Evidence)]
        p_pos = dict(zip([id(c) for c in decidable],
                         holm([pooled[id(c)].p_positive() for c in decidable]), strict=True))
        p_below = dict(zip([id(c) for c in decidable],
                           holm([pooled[id(c)].p_below(s.gap_margin) for c in decidable]),
                           strict=True))
        out = []
        for cell in cells:
            ev = pooled[id(cell)]
            if isinstance(ev, Undecided):
                status = Status.FAIL if ev.premise_violated else Status.INCONCLUSIVE
                rel = first_seed_reliability(ctx, cell["summary"])
                out.append(ctx.verdict(self, cell, status, ev.reason,
                                       per_seed=per_seed_rows(ctx, seeds[id(cell)], s.alpha),
                                       threshold=self.threshold(ctx),
                                       evidence={"reliability": rel} if rel else {}))
                continue
            out.append(self._verdict(ctx, cell, seeds[id(cell)], ev,
                                     float(p_pos[id(cell)]), float(p_below[id(cell)])))
        return out

    def threshold(self, ctx: AuditContext) -> dict[str, Any]:
        s = ctx.settings
        return {"alpha": s.alpha, "margin": s.gap_margin, "interval_level": 1 - 2 * s.alpha,
                "correction": "holm across summaries", "stability": s.stability,
                "bins": s.n_bins, "bin_strategy": s.bin_strategy, "strata": s.n_strata,
                "min_count": s.min_count}

    def _verdict(self, ctx: AuditContext, cell: dict[str, Any], rows: list[Any], ev: Evidence,
                 p_pos: float, p_below: float) -> Verdict:
        s = ctx.settings
        status = Status(outcome(ev, s.gap_margin, s.alpha, s.stability, p_positive=p_pos,
                                p_below=p_below))
        lo, hi = ev.interval(s.alpha)
        wg = seed_summary([r.weighted_gap for r in rows])
        mg = seed_summary([r.max_gap for r in rows])
        level = f"{100 * (1 - 2 * s.alpha):g}%"
        head = (f"pooled excess {ev.estimate:+.4f}, {level} interval [{lo:+.4f}, {hi:+.4f}], "
                f"> 0 in {ev.n_positive}/{ev.n_seeds} seeds")
        gaps = (f"weighted gap {wg['mean']:.4f} ± {_sd(wg)}, max gap {mg['mean']:.4f} ± "
                f"{_sd(mg)} over {ev.n_seeds} seeds")
        if status is Status.PASS:
            reason = f"excess over the within-bin null shown: {head} (Holm p {p_text(p_pos)}); {gaps}"
        elif status is Status.FAIL:
            reason = (f"no excess worth the name: {head} lies below the margin "
                      f"{s.gap_margin:g} (Holm p {p_text(p_below)}); {gaps}")
        else:
            shown = (f"> 0 pooled (Holm p {p_text(p_pos)}) but not in every seed (--stability)"
                     if p_pos <= s.alpha else f"shown neither > 0 (Holm p {p_text(p_pos)}) nor "
                     f"below the margin {s.gap_margin:g} (p {p_text(p_below)})")
            reason = (f"not decided: {head}; {shown}; "
                      + scale_text(ev, s.gap_margin, s.alpha, int(ctx.seeds[0].eval_index.size)))
        return ctx.verdict(
            self, cell, status, reason, statistic="weighted gap minus within-bin null mean, "
            "pooled over seeds", effect=ev.estimate, ci=(lo, hi),
            p_value=ev.p_below(s.gap_margin) if status is Status.FAIL else ev.p_positive(),
            p_value_corrected=p_below if status is Status.FAIL else p_pos,
            threshold=self.threshold(ctx), evidence=ev.as_dict(s.gap_margin, s.alpha)
            | _reliability_entry(ctx, cell["summary"]), per_seed=per_seed_rows(ctx, rows, s.alpha))


def _sd(summary: dict[str, float]) -> str:
    return "n/a" if not np.isfinite(summary["sd"]) else f"{summary['sd']:.4f}"


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [StratificationAudit()]


def per_seed_rows(ctx: AuditContext, rows: list[MatchedExcess | str], alpha: float
                  ) -> list[dict[str, Any]]:
    return [{"seed": seed.seed, **excess_row(row, alpha)}
            for seed, row in zip(ctx.seeds, rows, strict=True)]


def first_seed_reliability(ctx: AuditContext, summary: str) -> dict[str, Any] | None:
    """Mean confidence, accuracy and count per (confidence bin, routing stratum) in the first
    seed: the data of the HTML report's reliability diagrams (nothing is decided from it).
    None when the summary does not vary (no strata to draw)."""
    if not ctx.seeds:
        return None
    seed = ctx.seeds[0]
    part = seed.matched(summary, ctx.settings)
    if part.no_variation:
        return None
    conf, correct = seed.conf_correct("eval")
    return {"seed": seed.seed, "strata": ctx.settings.strata,
            **stratum_reliability(part.bin_idx, part.strata, conf, correct,
                                  n_bins=part.n_bins, n_strata=part.n_strata)}


def _reliability_entry(ctx: AuditContext, summary: str) -> dict[str, Any]:
    rel = first_seed_reliability(ctx, summary)
    return {"reliability": rel} if rel else {}
