"""Audit: matched-confidence stratification (docs/methods.md §2.4).

Within each confidence bin, examples are split into routing strata (tertiles of the summary
inside the bin by default, ``--strata global`` for global tertiles) and the signed
calibration gaps of the strata are compared. The max-minus-min gap is positive even when
routing carries nothing, so the claim is judged on the *excess* of the weighted gap over its
expectation under the within-bin null (the mean of the permutation distribution). Its
interval comes from a bootstrap over evaluation examples whose spread is reflected around
the excess; the bias is corrected once, by the null mean (see :func:`excess_interval`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.audit import AuditContext, BaseAudit, SeedOutcome, SeedTally
from routeaudit.hookspecs import hookimpl
from routeaudit.stats import bootstrap_gap, gap_statistics, seed_summary, within_bin_permutation_test
from routeaudit.verdict import Verdict


class StratificationAudit(BaseAudit):
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
        outcomes: list[SeedOutcome] = []
        for seed in ctx.seeds:
            outcome = self._seed(ctx, summary, seed)
            outcomes.append(outcome)
            if outcome.holds is None or outcome.premise_violated:
                break  # the verdict is decided: nothing the other seeds say changes it

        def text(t: SeedTally) -> str:
            entries = [o.details for o in t.outcomes]
            wg = seed_summary([e["weighted_gap"] for e in entries])
            mg = seed_summary([e["max_gap"] for e in entries])
            lo = min(e["ci"][0] for e in entries)
            hi = max(e["ci"][1] for e in entries)
            gaps = (f"weighted gap {wg['mean']:.4f} ± {_sd(wg)}, max gap {mg['mean']:.4f} ± "
                    f"{_sd(mg)} over {t.n} seeds")
            if t.passed:
                return (f"excess over the null holds in {t.holds}/{t.n} seeds "
                        f"(lowest CI bound {lo:.4f} > 0); {gaps}")
            return (f"excess over the null holds in only {t.holds}/{t.n} seeds (mean excess "
                    f"{t.mean_effect():.4f}, CI envelope [{lo:.4f}, {hi:.4f}]); {gaps}")

        return ctx.verdict_from_seeds(
            self, cell, outcomes, statistic="weighted gap minus within-bin null mean",
            threshold={"excess_ci_low": "> 0", "level": 1 - s.alpha, "stability": s.stability,
                       "bins": s.n_bins, "bin_strategy": s.bin_strategy, "strata": s.n_strata,
                       "min_count": s.min_count},
            passed=text, failed=text)

    def _seed(self, ctx: AuditContext, summary: str, seed: Any) -> SeedOutcome:
        s = ctx.settings
        part = seed.matched(summary, s)
        if part.no_variation:
            return SeedOutcome(seed.seed, holds=False, reason=part.no_variation,
                               premise_violated=True)
        kw = dict(n_bins=part.n_bins, n_strata=part.n_strata, min_count=s.min_count)
        gaps = gap_statistics(*part.cells(), **kw)
        if not np.isfinite(gaps.weighted_gap):
            return SeedOutcome(seed.seed, holds=None, reason=(
                f"too little data in seed {seed.seed}: no confidence bin has ≥ 2 strata "
                f"with ≥ {s.min_count} examples"))
        null = within_bin_permutation_test(
            *part.cells(), **kw, n_permutations=s.n_permutations, device=s.device,
            rng=ctx.rng(self.name + ":null", summary, seed.seed))
        _, _, replicates = bootstrap_gap(*part.cells(), **kw, n_boot=s.n_bootstrap,
                                         level=1 - s.alpha, device=s.device,
                                         rng=ctx.rng(self.name + ":boot", summary, seed.seed))
        excess = gaps.weighted_gap - null.null_mean
        ci = excess_interval(excess, replicates, 1 - s.alpha)
        holds = bool(excess > 0 and ci[0] > 0)
        return SeedOutcome(seed.seed, holds=holds, effect=excess, ci=ci, details={
            "weighted_gap": gaps.weighted_gap, "max_gap": gaps.max_gap,
            "null_mean": null.null_mean, "excess": excess, "ci": list(ci),
            "bins_used": gaps.n_used, "holds": holds})


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
