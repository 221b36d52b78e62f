"""Statistical validity of the permutation audit, by simulation.

Prints, in one run:
1. the false-positive rate of the within-bin permutation test on the confounded null
   (routing strongly correlated with confidence; Y ⟂ R | C), with a 95% Wilson interval
   that must cover the nominal alpha;
2. the false-positive rate of a naive test without confidence matching (chi-square test of
   accuracy across global routing tertiles) on the same data: near 1, which is why the tool
   exists;
3. the stratification audit's false-positive rate (excess-gap CI above 0) on the null;
4. power against planted routing-conditional miscalibration, over effect size and N;
5. the three-outcome study (issue [6/9]): for several generators of planted cases
   (logit-linear, quadratic and step confounding of routing with confidence; 4 routing
   layers and 10 classes, 6 layers and 3 classes, 2 layers and 2 classes), both audits run
   as ``routeaudit run`` does (three seeds, pooled decision of docs/methods.md §5.2), with the
   false-pass rate (planted 0), the false-fail rate (true effect ≥ margin) and the power per
   planted size, through the machinery of ``routeaudit validate``.

Every rate is of the shipped audits (``PermutationNullAudit.run``, ``StratificationAudit.run``)
on the context ``routeaudit run`` builds (``AuditContext.for_traces``: the same split,
summaries, bins and strata), one seed per replicate, so the figures validate the audit itself.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/validity.py [--replicates 500] [--quick]
[--outcome-replicates 100] [--only outcomes]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from dataclasses import replace

import numpy as np
from scipy.stats import chi2_contingency

import routeaudit.session.validate as validate
from routeaudit.audit import AuditContext, AuditSettings
from routeaudit.audits.permutation_null import PermutationNullAudit
from routeaudit.audits.stratification import StratificationAudit
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.stats import quantile_strata
from routeaudit.stats.rates import rate_text
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


def rate(flags: list[bool]) -> str:
    """A rate with its 95% Wilson interval (the one implementation, routeaudit.stats.rates)."""
    return rate_text(flags)


#: The generators of the three-outcome study: (shape, routing layers, classes).
OUTCOME_CASES = (("logit_linear", 4, 10), ("quadratic", 6, 3), ("step", 2, 2))


def outcome_study(replicates: int, n_eval: int, permutations: int, n_boot: int,
                  cases=OUTCOME_CASES) -> bool:
    """The three error figures of both matched audits for every generator; True when every
    bound holds."""
    from functools import partial

    from routeaudit.simulation.plan import matched_cases
    from routeaudit.summaries import default_registry

    audits = [PermutationNullAudit(), StratificationAudit()]
    settings = AuditSettings(n_permutations=permutations, n_bootstrap=n_boot)
    ok = True
    for shape, n_layers, n_classes in cases:
        base = matched_cases()
        cases_of_shape = replace(base, generate=_named(partial(_planted, shape), shape),
                                 description=f"{shape} confounding, {n_layers} layers, "
                                             f"{n_classes} classes")
        studies = [validate.Study(a.name, cases_of_shape, settings.gap_margin,
                                  [validate.Row(size) for size in base.effects]) for a in audits]
        target = {"n": 2 * n_eval, "n_layers": n_layers, "n_classes": n_classes,
                  "seeds": [0, 1, 2], "calibrator": None}
        validate.simulate(studies, audits, target, settings, replicates,
                          summaries=default_registry(), progress=False)
        for study in studies:
            ok &= validate.report(study, settings.alpha, replicates)
    return bool(ok)


def _planted(shape: str, effect: float, *, n: int, seed: int, n_layers: int, n_classes: int):
    from routeaudit.simulation.cases import generate

    return generate(shape, n, effect=effect, seed=20_000 + seed, n_layers=n_layers,
                    n_classes=n_classes)


def _named(fn, shape: str):
    fn.__name__ = f"planted_{shape}"
    return fn


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


def _engine() -> str:
    import routeaudit.stats._kernels as kernels

    return "compiled numba kernels" if kernels.available() else "numpy kernels (no numba)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=500)
    parser.add_argument("--power-replicates", type=int, default=100)
    parser.add_argument("--n", type=int, default=5000, help="evaluation examples per replicate")
    parser.add_argument("--permutations", type=int, default=199)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="100 replicates, small power grid")
    parser.add_argument("--outcome-replicates", type=int, default=100,
                        help="replicates per planted size in the three-outcome study")
    parser.add_argument("--outcome-n", type=int, default=5000,
                        help="evaluation examples in the three-outcome study")
    parser.add_argument("--only", choices=["all", "outcomes"], default="all")
    args = parser.parse_args()
    if args.quick:
        args.replicates, args.power_replicates, args.outcome_replicates = 100, 30, 20
    started = time.perf_counter()
    if args.only == "outcomes":
        outcomes(args, started)
        return
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} ({_engine()}); "
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
    outcomes(args, started)


def outcomes(args: argparse.Namespace, started: float) -> None:
    print(f"\nThree outcomes (pooled over 3 seeds; N = {args.outcome_n} evaluation examples; "
          f"{args.outcome_replicates} replicates per size; permutations {args.permutations}, "
          f"bootstrap 200; gap margin {AuditSettings().gap_margin}):")
    ok = outcome_study(args.outcome_replicates, args.outcome_n, args.permutations, 200)
    print(f"\n{'every bound holds' if ok else 'SOME BOUND IS EXCEEDED'}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
