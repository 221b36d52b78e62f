"""Statistical validity of the permutation audit, by simulation.

Prints, in one run:
1. the false-positive rate of the within-bin permutation test on the confounded null
   (routing strongly correlated with confidence; Y ⟂ R | C), with a Clopper-Pearson 95% CI
   that must cover the nominal alpha;
2. the false-positive rate of a naive test without confidence matching (chi-square test of
   accuracy across global routing tertiles) on the same data: near 1, which is why the tool
   exists;
3. the stratification audit's false-positive rate (excess-gap CI above 0) on the null;
4. power against planted routing-conditional miscalibration, over effect size and N.

Every rate is of the shipped audits (``PermutationNullAudit.run``, ``StratificationAudit.run``)
on the context ``routeaudit run`` builds (``AuditContext.for_traces``: the same split,
summaries, bins and strata), one seed per replicate, so the figures validate the audit itself.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/validity.py [--replicates 500] [--quick]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import chi2_contingency

from routeaudit.audit import AuditContext, AuditSettings
from routeaudit.audits.permutation_null import PermutationNullAudit
from routeaudit.audits.stratification import StratificationAudit
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.stats import quantile_strata
from routeaudit.traces import TraceSet
from routeaudit.verdict import Status

SUMMARY = "r_agg"


def replicate_traces(kind: str, n_eval: int, effect: float, rep: int) -> TraceSet:
    """One synthetic model with 2N examples, so its evaluation split holds N."""
    return make_traces(kind, 2 * n_eval, seed=10_000 + rep, effect=effect)


def audit_context(traces: TraceSet, seed: int, *, permutations: int, n_boot: int = 1000,
                  alpha: float = 0.05, strata: str = "within_bin") -> AuditContext:
    """The context ``routeaudit run`` builds for these traces, with one seed (one split)."""
    settings = AuditSettings(alpha=alpha, n_permutations=permutations, n_bootstrap=n_boot,
                             strata=strata)
    return AuditContext.for_traces(traces, seeds=[seed], settings=settings, target="simulation")


def permutation_rejects(traces: TraceSet, *, seed: int, permutations: int, alpha: float = 0.05,
                        strata: str = "within_bin") -> bool:
    """The shipped ``permutation_null`` audit passes (rejects Y ⟂ R | C) on one split."""
    ctx = audit_context(traces, seed, permutations=permutations, alpha=alpha, strata=strata)
    (verdict,) = PermutationNullAudit().run(ctx, [{"summary": SUMMARY}])
    return verdict.status is Status.PASS


def stratification_holds(traces: TraceSet, *, seed: int, permutations: int, n_boot: int) -> bool:
    """The shipped ``stratification`` audit passes (excess CI above 0) on one split."""
    ctx = audit_context(traces, seed, permutations=permutations, n_boot=n_boot)
    (verdict,) = StratificationAudit().run(ctx, [{"summary": SUMMARY}])
    return verdict.status is Status.PASS


def naive_rejects(traces: TraceSet, *, seed: int, alpha: float) -> bool:
    """The test without confidence matching: accuracy differs across global routing tertiles
    (chi-square), on the same evaluation split the audits use."""
    data = audit_context(traces, seed, permutations=1).seeds[0]
    _, correct = data.conf_correct("eval")
    strata = quantile_strata(data.summary(SUMMARY, "eval"), 3)
    table = np.array([[np.sum((strata == t) & (correct == 1)), np.sum((strata == t) & (correct == 0))]
                      for t in range(3)])
    return bool(chi2_contingency(table)[1] <= alpha)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    a = 1 - level
    lo = 0.0 if k == 0 else float(beta_dist.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta_dist.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def rate(flags: list[bool]) -> str:
    k, n = int(sum(flags)), len(flags)
    lo, hi = clopper_pearson(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}] ({k}/{n})"


def null_study(replicates: int, n: int, permutations: int, alpha: float, strat_reps: int):
    perm, naive, strat = [], [], []
    for rep in range(replicates):
        traces = replicate_traces("null", n, 0.0, rep)
        perm.append(permutation_rejects(traces, seed=rep, permutations=permutations, alpha=alpha))
        naive.append(naive_rejects(traces, seed=rep, alpha=alpha))
        if rep < strat_reps:
            strat.append(stratification_holds(traces, seed=rep, permutations=permutations,
                                              n_boot=200))
    return perm, naive, strat


def power_study(effects, sizes, replicates: int, permutations: int, alpha: float):
    table = {}
    for n in sizes:
        for effect in effects:
            flags = [permutation_rejects(replicate_traces("planted", n, effect, rep), seed=rep,
                                         permutations=permutations, alpha=alpha)
                     for rep in range(replicates)]
            table[(n, effect)] = float(np.mean(flags))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=500)
    parser.add_argument("--power-replicates", type=int, default=100)
    parser.add_argument("--n", type=int, default=5000, help="evaluation examples per replicate")
    parser.add_argument("--permutations", type=int, default=199)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="100 replicates, small power grid")
    args = parser.parse_args()
    if args.quick:
        args.replicates, args.power_replicates = 100, 30
    started = time.perf_counter()
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} (numpy kernels); "
          f"N = {args.n} evaluation examples (2N traces, one 50/50 split per replicate); "
          f"B = {args.permutations}; alpha = {args.alpha}; summary {SUMMARY}; 15 equal-mass bins "
          "x 3 within-bin tertiles; the shipped permutation_null and stratification audits")
    perm, naive, strat = null_study(args.replicates, args.n, args.permutations, args.alpha,
                                    strat_reps=min(args.replicates, 200))
    print("\nConfounded null (Y independent of R given C; corr(R, C) strong):")
    print(f"  within-bin permutation test, false-positive rate: {rate(perm)}")
    print(f"  naive global-tertile chi-square, false-positive rate: {rate(naive)}")
    print(f"  stratification audit (excess CI > 0), false-positive rate: {rate(strat)}")
    effects = [0.0, 0.05, 0.1, 0.15, 0.2]
    sizes = [2000, 5000, 10000] if not args.quick else [2000, 5000]
    table = power_study(effects, sizes, args.power_replicates, args.permutations, args.alpha)
    print(f"\nPower of the permutation test (rejection rate, {args.power_replicates} replicates):")
    print("  N \\ effect " + " ".join(f"{e:>6}" for e in effects))
    for n in sizes:
        print(f"  {n:>10} " + " ".join(f"{table[(n, e)]:>6.2f}" for e in effects))
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
