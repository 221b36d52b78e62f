"""Audit: the within-confidence-bin routing-permutation null (docs/methods.md §2.5).

Claim per routing summary S: "S carries calibration signal beyond confidence", i.e. the
conditional null Y ⟂ S | C is rejected. T is the weighted gap of §2.4; its null distribution
comes from permuting S within each confidence bin, which keeps confidence, correctness and
every stratum size and only breaks the routing ↔ correctness link at matched confidence.
p-values are Holm-corrected across the summaries tested, separately in each seed, and the
claim passes only if it is rejected in every seed (``--stability majority`` relaxes this).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.audit import AuditContext, BaseAudit, SeedOutcome, SeedTally
from routeaudit.hookspecs import hookimpl
from routeaudit.stats import PermutationResult, holm, within_bin_permutation_test
from routeaudit.verdict import Verdict


class PermutationNullAudit(BaseAudit):
    name = "permutation_null"
    claim = "The routing summary carries calibration signal beyond confidence."
    needs = frozenset({"traces"})
    min_examples = 100
    routing_aware = True

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        return ctx.summary_cells()

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        # results[cell][seed]: the test, or why the summary cannot carry signal
        results = [[self._test(ctx, cell["summary"], seed) for seed in ctx.seeds]
                   for cell in cells]
        raw = np.array([[r.p_value if isinstance(r, PermutationResult) and np.isfinite(r.statistic)
                         else np.nan for r in row] for row in results],
                       dtype=float).reshape(len(cells), -1)
        corrected = np.column_stack([holm(raw[:, j]) for j in range(raw.shape[1])]) \
            if raw.size else raw
        return [self._verdict(ctx, cell, results[i], raw[i], corrected[i])
                for i, cell in enumerate(cells)]

    def _test(self, ctx: AuditContext, summary: str, seed: Any) -> PermutationResult | str:
        s = ctx.settings
        part = seed.matched(summary, s)
        if part.no_variation:
            return part.no_variation
        return within_bin_permutation_test(
            *part.cells(), n_bins=part.n_bins, n_strata=part.n_strata,
            n_permutations=s.n_permutations, min_count=s.min_count,
            rng=ctx.rng(self.name, summary, seed.seed), sequential_h=s.sequential_h,
            device=s.device)

    def _verdict(self, ctx: AuditContext, cell: dict[str, Any], row: list[Any],
                 raw: np.ndarray, corrected: np.ndarray) -> Verdict:
        s = ctx.settings
        outcomes = []
        for seed, result, p, pc in zip(ctx.seeds, row, raw, corrected, strict=True):
            if isinstance(result, str):
                outcomes.append(SeedOutcome(seed.seed, holds=False, reason=result,
                                            premise_violated=True))
                continue
            details = dict(statistic=result.statistic, null_mean=result.null_mean,
                           null_sd=result.null_sd, p_value=float(p), p_value_corrected=float(pc),
                           n_permutations=result.n_permutations,
                           stopped_early=result.stopped_early, rejects=bool(pc <= s.alpha))
            undecided = not np.isfinite(p)
            outcomes.append(SeedOutcome(
                seed.seed, holds=None if undecided else bool(pc <= s.alpha),
                effect=result.statistic - result.null_mean, p_value=float(p),
                p_value_corrected=float(pc), details=details,
                reason=(f"too little data: no confidence bin has ≥ 2 strata with ≥ "
                        f"{s.min_count} examples in some seed") if undecided else None))

        def passed(t: SeedTally) -> str:
            ps = ", ".join(f"{o.p_value_corrected:.3g}" for o in t.outcomes)
            return (f"rejects the within-bin null in {t.holds}/{t.n} seeds "
                    f"(Holm p: {ps} ≤ {s.alpha}); mean excess gap {t.mean_effect():.4f}")

        def failed(t: SeedTally) -> str:
            ps = ", ".join(f"{o.p_value_corrected:.3g}" for o in t.outcomes)
            return (f"rejects in only {t.holds}/{t.n} seeds (Holm p: {ps}; needs ≤ {s.alpha} "
                    f"in {t.need}): no stable signal beyond confidence")

        return ctx.verdict_from_seeds(
            self, cell, outcomes, statistic="weighted gap minus its within-bin null mean",
            threshold={"alpha": s.alpha, "correction": "holm across summaries",
                       "stability": s.stability, "permutations": s.n_permutations},
            passed=passed, failed=failed)


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [PermutationNullAudit()]
