"""Error rates of the expert_calibration audit, by simulation (docs/methods.md §4, §5.2).

Synthetic MoE traces with known truth (``routeaudit.simulation.experts``; 4 experts, 10
classes, one routing layer) go through the real audit (all three cells, 3 seeds, the
default ``--ece-tol`` 0.02 and ``--shift-ratio`` 5). For each case the population value of
each claim's ECE is known (``moe_truth``: the worst expert's ECE, the aggregate's, and the
worst case over routing-only shifts), so every outcome is right or wrong:

* a claim whose true ECE is ≤ tol must not **fail** (false fail ≤ α + 2 SE);
* a claim whose true ECE is > tol must not **pass** (false pass ≤ α + 2 SE);

and the other outcome's rate is the power. Cases: ``calibrated`` (hard routing, every
expert calibrated: all truths 0) at several N; every expert over-confident by a graded
amount (``over m``: truths about 0.018 just below the tolerance, 0.021 just above, then
larger); the ``soft`` mixture of the calibrated experts (aggregate under-confident); experts
miscalibrated in opposite directions (``shift γ``: aggregate calibrated on P, the worst
routing-only shift miscalibrated by a graded amount). Rates carry 95 % Wilson intervals
(``routeaudit.stats.rates``); SE = √(α(1 − α)/R). At an exact α an error figure exceeds
α + 2 SE with probability about 0.025, so a flagged figure is re-checked on ``--confirm``
fresh replicates. Then the audit's run time on 100,000 tokens × 3 seeds is measured.
Replicates run in ``--processes`` worker processes, one thread each.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/validity_experts.py [--replicates 200]
[--bootstrap 200] [--processes 2] [--confirm 400] [--out benchmarks/results/validity_experts.txt]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np

from benchmarks._output import Tee
from routeaudit.audit import AuditContext, AuditSettings
from routeaudit.audits.expert_calibration import ECE_TOL, ExpertCalibrationAudit
from routeaudit.simulation.experts import KINDS, generate_moe, moe_truth
from routeaudit.stats.rates import bound, rate_text

ALPHA = 0.05
CLAIMS = ("experts", "aggregate", "shift")
#: label -> (kind, expert_miscalibration, shift_gap)
CASES: dict[str, tuple[str, float | None, float | None]] = {
    "calibrated": ("hard", None, None),
    "over 0.0235": ("overconfident", 0.0235, None),
    "over 0.027": ("overconfident", 0.027, None),
    "over 0.04": ("overconfident", 0.04, None),
    "over 0.06": ("overconfident", 0.06, None),
    "soft": ("soft", None, None),
    "shift 0.027": ("shift", None, 0.027),
    "shift 0.04": ("shift", None, 0.04),
    "shift 0.08": ("shift", None, 0.08),
}
#: (case, N, replicates as a fraction of --replicates)
PLAN = [("calibrated", 5_000, 1.0), ("calibrated", 20_000, 1.0), ("calibrated", 50_000, 0.5),
        ("calibrated", 100_000, 0.25),
        *[(case, 20_000, 1.0) for case in CASES if case != "calibrated"],
        ("over 0.027", 100_000, 0.5), ("shift 0.027", 100_000, 0.5)]


def truths(case: str) -> dict[str, float]:
    """Population ECE of each claim for a case."""
    kind, mis, gap = CASES[case]
    routing, default_mis, default_gap, _ = KINDS[kind]
    t = moe_truth(4, 10, routing, default_mis if mis is None else mis,
                  default_gap if gap is None else gap, 1.0, 1.5)
    return {"experts": float(np.nanmax(t["expert_ece"])), "aggregate": t["aggregate_ece"],
            "shift": t["worst_case_ece_ratio5"]}


def replicate(job: tuple[str, int, int, int]) -> tuple[str, int, dict[str, str]]:
    """One audit run on fresh traces; returns (case, N, status per claim)."""
    case, n, rep, n_boot = job
    kind, mis, gap = CASES[case]
    traces = generate_moe(kind, n, seed=10_000 + rep, expert_miscalibration=mis, shift_gap=gap,
                          truth=False)
    audit = ExpertCalibrationAudit()
    ctx = AuditContext.for_traces(traces, settings=AuditSettings(n_bootstrap=n_boot))
    return case, n, {v.cell["claim"]: v.status.value for v in audit.run(ctx, audit.cells(ctx))}


def run_jobs(jobs: list[tuple[str, int, int, int]], processes: int
             ) -> dict[tuple[str, int], list[dict[str, str]]]:
    if processes > 1:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            results = list(pool.map(replicate, jobs, chunksize=4))
    else:
        results = [replicate(job) for job in jobs]
    out: dict[tuple[str, int], list[dict[str, str]]] = {}
    for case, n, statuses in results:
        out.setdefault((case, n), []).append(statuses)
    return out


def figures(case: str, got: list[dict[str, str]]) -> list[tuple[str, str, list[bool], str, list[bool]]]:
    """Per claim: (claim, error name, error flags, other name, other flags)."""
    out = []
    for claim in CLAIMS:
        truth = truths(case)[claim]
        statuses = [g[claim] for g in got]
        if truth <= ECE_TOL:
            out.append((claim, "false fail", [s == "fail" for s in statuses], "pass",
                        [s == "pass" for s in statuses]))
        else:
            out.append((claim, "false pass", [s == "pass" for s in statuses], "fail",
                        [s == "fail" for s in statuses]))
    return out


def simulate(replicates: int, n_boot: int, processes: int, confirm: int) -> None:
    jobs = [(case, n, rep, n_boot) for case, n, frac in PLAN
            for rep in range(max(1, round(replicates * frac)))]
    results = run_jobs(jobs, processes)
    flagged = []
    print(f"\ntolerance {ECE_TOL:g}; truth = population ECE15 (expert: the worst expert's; "
          "shift: worst case at likelihood ratio ≤ 5)")
    for case, n, _ in PLAN:
        got = results[(case, n)]
        t = truths(case)
        print(f"\n{case} (N = {n:,} tokens, {len(got)} replicates); truth: "
              + ", ".join(f"{c} {t[c]:.4f}" for c in CLAIMS))
        limit = bound(ALPHA, len(got))
        for claim, err_name, err, other_name, other in figures(case, got):
            ok = np.mean(err) <= limit
            if not ok:
                flagged.append((case, n, claim))
            print(f"  {claim:<9} {err_name}: {rate_text(err)} {'ok' if ok else 'EXCEEDS'} "
                  f"(≤ {limit:.3f}); {other_name}: {rate_text(other)}")
    n_checked = len(PLAN) * len(CLAIMS)
    print(f"\n{n_checked} error figures checked against α + 2 SE; a flag is re-checked on "
          f"{confirm} fresh replicates (later replicate indices, same design)")
    for case, n, claim in dict.fromkeys(flagged):
        start = replicates * 10
        more = run_jobs([(case, n, rep, n_boot) for rep in range(start, start + confirm)],
                        processes)[(case, n)]
        for c, err_name, err, _, _ in figures(case, more):
            if c == claim:
                verdict = "ok" if np.mean(err) <= bound(ALPHA, confirm) else "EXCEEDS"
                print(f"  re-check {case} N {n:,} {claim}: {err_name} {rate_text(err)} "
                      f"{verdict} (≤ {bound(ALPHA, confirm):.3f})")
    if not flagged:
        print("  (nothing flagged)")


def speed() -> None:
    """The audit as ``routeaudit run`` runs it (default --bootstrap 1000) on 100,000 tokens."""
    print("\nrun time, 100,000 tokens (50,000 evaluation tokens per seed), 3 seeds, "
          "--bootstrap 1000, all three cells, one thread:")
    audit = ExpertCalibrationAudit()
    for kind in ("hard", "soft"):
        traces = generate_moe(kind, 100_000, seed=1, truth=False)
        ctx = AuditContext.for_traces(traces, settings=AuditSettings(n_bootstrap=1000))
        started = time.perf_counter()
        audit.run(ctx, audit.cells(ctx))
        print(f"  {kind}: {time.perf_counter() - started:.1f} s")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="bootstrap replicates per seed in the simulation (200)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--confirm", type=int, default=400,
                        help="fresh replicates for re-checking a flagged error figure (400)")
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    args = parser.parse_args()
    stream = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115
    with contextlib.redirect_stdout(Tee(sys.stdout, stream) if stream else sys.stdout):
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        print(f"routeaudit expert_calibration validity study, {now}")
        print("command: OMP_NUM_THREADS=1 python benchmarks/validity_experts.py "
              + " ".join(sys.argv[1:]))
        print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, 1 thread per "
              f"process, {args.processes} processes; {args.replicates} replicates per cell "
              f"at N <= 20,000, {args.replicates // 2} at N = 50,000 and at N = 100,000 near "
              f"the tolerance, {args.replicates // 4} for the calibrated model at N = 100,000; "
              f"bootstrap B = {args.bootstrap}; "
              f"3 seeds; alpha = {ALPHA} (90% intervals); 4 experts, 10 classes")
        started = time.perf_counter()
        simulate(args.replicates, args.bootstrap, args.processes, args.confirm)
        print(f"\nsimulation {time.perf_counter() - started:.0f} s")
        speed()
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if stream:
        stream.close()


if __name__ == "__main__":
    main()
