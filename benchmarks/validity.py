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

Usage: ``OMP_NUM_THREADS=1 python benchmarks/validity.py [--replicates 500] [--quick]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from scipy.stats import beta as beta_dist
from scipy.stats import chi2_contingency

from routeaudit.audits.stratification import excess_interval
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.metrics import confidence_and_correct
from routeaudit.stats import (
    bootstrap_gap,
    confidence_bins,
    gap_statistics,
    quantile_strata,
    rng_for,
    within_bin_permutation_test,
    within_bin_strata,
)
from routeaudit.summaries import FeatureCache, default_registry

torch.set_num_threads(1)
REGISTRY = default_registry()


def replicate_data(kind: str, n: int, effect: float, rep: int, summary: str = "r_agg"):
    ts = make_traces(kind, n, seed=10_000 + rep, effect=effect)
    conf, correct = confidence_and_correct(ts.logits, ts.labels)
    r = FeatureCache(ts, REGISTRY)[summary]
    return conf, correct, r


def matched_strata(bins, r, mode: str = "within_bin"):
    """The audit's routing strata: tertiles inside each confidence bin, or global tertiles."""
    return within_bin_strata(bins, r, 3) if mode == "within_bin" else quantile_strata(r, 3)


def permutation_rejects(conf, correct, r, *, alpha: float, permutations: int, seed: int,
                        strata_mode: str = "within_bin") -> bool:
    bins = confidence_bins(conf, 15, strategy="equal_mass")
    strata = matched_strata(bins, r, strata_mode)
    result = within_bin_permutation_test(bins, strata, correct - conf, n_bins=15, n_strata=3,
                                         n_permutations=permutations, rng=rng_for("val", seed))
    return bool(result.p_value <= alpha)


def naive_rejects(correct, r, *, alpha: float) -> bool:
    """Accuracy differs across global routing tertiles (no confidence matching)."""
    strata = quantile_strata(r, 3)
    table = np.array([[np.sum((strata == t) & (correct == 1)), np.sum((strata == t) & (correct == 0))]
                      for t in range(3)])
    return bool(chi2_contingency(table)[1] <= alpha)


def stratification_holds(conf, correct, r, *, permutations: int, n_boot: int, seed: int) -> bool:
    bins = confidence_bins(conf, 15, strategy="equal_mass")
    strata = matched_strata(bins, r)
    kw = dict(n_bins=15, n_strata=3)
    res = correct - conf
    wg = gap_statistics(bins, strata, res, **kw).weighted_gap
    null = within_bin_permutation_test(bins, strata, res, **kw, n_permutations=permutations,
                                       rng=rng_for("val-null", seed))
    _, _, replicates = bootstrap_gap(bins, strata, res, **kw, n_boot=n_boot,
                                     rng=rng_for("val-b", seed))
    excess = wg - null.null_mean
    ci_low, _ = excess_interval(excess, replicates, 0.95)
    return bool(excess > 0 and ci_low > 0)


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
        conf, correct, r = replicate_data("null", n, 0.0, rep)
        perm.append(permutation_rejects(conf, correct, r, alpha=alpha,
                                        permutations=permutations, seed=rep))
        naive.append(naive_rejects(correct, r, alpha=alpha))
        if rep < strat_reps:
            strat.append(stratification_holds(conf, correct, r, permutations=permutations,
                                              n_boot=200, seed=rep))
    return perm, naive, strat


def power_study(effects, sizes, replicates: int, permutations: int, alpha: float):
    table = {}
    for n in sizes:
        for effect in effects:
            flags = []
            for rep in range(replicates):
                conf, correct, r = replicate_data("planted", n, effect, rep)
                flags.append(permutation_rejects(conf, correct, r, alpha=alpha,
                                                 permutations=permutations, seed=rep))
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
    print(f"threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}; N = {args.n}; B = {args.permutations}; "
          f"alpha = {args.alpha}; summary r_agg; 15 equal-mass bins x 3 tertiles")
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
