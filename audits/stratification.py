"""Audit: matched-confidence stratification (methods.md §2.4).

Within each confidence bin, examples are split into global routing strata (tertiles of the
summary) and the signed calibration gaps of the strata are compared. The max-minus-min gap
is positive even when routing carries nothing, so the claim is judged on the *excess* of the
weighted gap over its expectation under the within-bin null (the mean of the permutation
distribution). The excess CI is a basic (reverse-percentile) bootstrap over evaluation
examples: the percentile bootstrap would inherit the upward bias of a max-minus-min
statistic under resampling and pass null data, the basic bootstrap subtracts it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.audit import AuditContext
from routeaudit.hookspecs import hookimpl
from routeaudit.matched import matched_cell, stable
from routeaudit.stats import (
    bootstrap_gap,
    gap_statistics,
    seed_summary,
    within_bin_permutation_test,
)
from routeaudit.verdict import Status, Verdict


class StratificationAudit:
    name = "stratification"
    claim = ("At matched confidence, routing strata differ in calibration gap by more than "
             "the within-bin null explains.")
    needs = frozenset({"traces"})
    min_examples = 100
    routing_aware = True

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        return ctx.summary_cells()

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        return [self._one(ctx, cell) for cell in cells]

    def _one(self, ctx: AuditContext, cell: dict[str, Any]) -> Verdict:
        s = ctx.settings
        summary = cell["summary"]
        common = dict(audit=self.name, claim=self.claim, cell=cell,
                      statistic="weighted gap minus within-bin null mean",
                      threshold={"excess_ci_low": "> 0", "level": 1 - s.alpha,
                                 "stability": s.stability, "bins": s.n_bins,
                                 "bin_strategy": s.bin_strategy, "strata": s.n_strata,
                                 "min_count": s.min_count})
        per_seed: list[dict[str, Any]] = []
        for seed in ctx.seeds:
            prepared = matched_cell(seed, summary, s)
            if prepared.no_variation:
                return Verdict(status=Status.FAIL, reason=prepared.no_variation,
                               per_seed=[{"seed": seed.seed, "reason": prepared.no_variation}],
                               **common)
            args = (prepared.bin_idx, prepared.strata, prepared.residual)
            kw = dict(n_bins=prepared.n_bins, n_strata=prepared.n_strata, min_count=s.min_count)
            gaps = gap_statistics(*args, **kw)
            if not np.isfinite(gaps.weighted_gap):
                return Verdict(status=Status.INCONCLUSIVE, per_seed=per_seed, reason=(
                    f"too little data in seed {seed.seed}: no confidence bin has ≥ 2 strata "
                    f"with ≥ {s.min_count} examples"), **common)
            null = within_bin_permutation_test(
                *args, **kw, n_permutations=s.n_permutations, device=s.device,
                rng=ctx.rng(self.name + ":null", summary, seed.seed))
            _, _, replicates = bootstrap_gap(*args, **kw, n_boot=s.n_bootstrap, level=1 - s.alpha,
                                      rng=ctx.rng(self.name + ":boot", summary, seed.seed),
                                      device=s.device)
            excess = gaps.weighted_gap - null.null_mean
            ci = excess_interval(excess, replicates, 1 - s.alpha)
            per_seed.append({"seed": seed.seed, "weighted_gap": gaps.weighted_gap,
                             "max_gap": gaps.max_gap, "null_mean": null.null_mean,
                             "excess": excess, "ci": list(ci), "bins_used": gaps.n_used,
                             "holds": bool(excess > 0 and ci[0] > 0)})
        holds = [entry["holds"] for entry in per_seed]
        wg = seed_summary([e["weighted_gap"] for e in per_seed])
        mg = seed_summary([e["max_gap"] for e in per_seed])
        ex = seed_summary([e["excess"] for e in per_seed])
        envelope = (min(e["ci"][0] for e in per_seed), max(e["ci"][1] for e in per_seed))
        passed = stable(holds, s.stability)
        gaps_text = (f"weighted gap {wg['mean']:.4f} ± {_sd(wg)}, max gap {mg['mean']:.4f} ± "
                     f"{_sd(mg)} over {len(per_seed)} seeds")
        if passed:
            reason = (f"excess over the null holds in {sum(holds)}/{len(holds)} seeds "
                      f"(lowest CI bound {envelope[0]:.4f} > 0); {gaps_text}")
        else:
            reason = (f"excess over the null holds in only {sum(holds)}/{len(holds)} seeds "
                      f"(mean excess {ex['mean']:.4f}, CI envelope [{envelope[0]:.4f}, "
                      f"{envelope[1]:.4f}]); {gaps_text}")
        return Verdict(status=Status.PASS if passed else Status.FAIL, effect=ex["mean"],
                       ci=envelope, per_seed=per_seed, reason=reason, **common)


def excess_interval(excess: float, replicates: np.ndarray, level: float) -> tuple[float, float]:
    """Basic-bootstrap interval of the excess, with the bias handled once, by the null mean.

    The max-minus-min gap is biased upward by noise, and resampling inflates that bias again:
    the replicates sit above the estimate. The excess already removes the bias (it subtracts
    the within-bin null mean), so only the *spread* of the replicates around their own mean is
    used, reflected around the excess; reflecting around the raw gap as well would correct the
    bias twice and make the interval useless.
    """
    v = np.asarray(replicates, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return (np.nan, np.nan)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(v - v.mean(), [tail, 1.0 - tail])
    return (float(excess - hi), float(excess - lo))


def _sd(summary: dict[str, float]) -> str:
    return "n/a" if not np.isfinite(summary["sd"]) else f"{summary['sd']:.4f}"


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [StratificationAudit()]
