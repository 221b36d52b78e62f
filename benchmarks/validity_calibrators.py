"""Error rates of the calibrator audits on all three outcomes, by simulation (issue [6/9]).

Each replicate draws a fresh synthetic model and audits the full-vector MLP over
(confidence, H_1..H_L) of docs/methods.md §2.7 on it, exactly as ``routeaudit run`` would
(three seeds, each redrawing the 50/50 calibration/evaluation split; twins with three
restarts; the pooled decision rule of §5.2 with the default margin 0.005). Cases:

* **nulls**, where the claim must not pass (false pass ≤ α + 2 SE):
  - ``capacity``: routing strongly correlated with confidence, correctness a non-linear
    function of confidence only: the MLP's gain over a linear map is capacity;
  - ``shuffled``: the genuine traces with routing rows shuffled across examples: routing
    carries nothing at all, so the gain is the MLP's alone.
* **genuine** cases (routing-conditional miscalibration of decreasing strength, and one with
  6 routing layers and 3 classes), where the claim must not be refuted: false fail ≤ α + 2 SE
  whenever the true gain (the mean over replicates) is at or above the margin, and the
  strong case must pass in ≥ 0.95 of replicates.

N is the size of the evaluation split (the traces hold 2N examples). Replicates run in
``--processes`` worker processes, one thread each.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/validity_calibrators.py [--replicates 50]
[--n-eval 10000] [--processes 2] [--cases capacity,shuffled,...]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
import torch

from routeaudit.audit import AuditContext, AuditSettings
from routeaudit.audits.capacity_control import CapacityControlAudit
from routeaudit.audits.shuffled_profile import ShuffledProfileAudit
from routeaudit.calibration.scores import HEADLINE
from routeaudit.calibrators.mlp import mlp_profile
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.stats.rates import bound, rate_text
from routeaudit.traces import TraceSet

AUDITS = (CapacityControlAudit(), ShuffledProfileAudit())
#: The case of the power target: worst-tertile ECE about half its capacity twin's.
POWER_CASE = "medium"

#: name → (kind, traces keyword arguments, is a null, shuffle the routing rows)
CASES: dict[str, tuple[str, dict[str, float], bool, bool]] = {
    "capacity": ("null", {}, True, False),
    "shuffled": ("planted", {"effect": 0.5, "confound": 0.3}, True, True),
    "strong": ("planted", {"effect": 0.5, "confound": 0.3}, False, False),
    "medium": ("planted", {"effect": 0.3, "confound": 1.5}, False, False),
    "weak": ("planted", {"effect": 0.2, "confound": 1.5}, False, False),
    "faint": ("planted", {"effect": 0.1, "confound": 1.5}, False, False),
    "layers6_classes3": ("planted", {"effect": 0.4, "confound": 1.0, "n_layers": 6,
                                     "n_classes": 3}, False, False),
}


def audit_context(traces: TraceSet, seeds=(0, 1, 2), n_boot: int = 1000) -> AuditContext:
    """The context ``routeaudit run`` builds for one target (seeds redraw the split), with
    the full-vector MLP of ``mlp_profile`` registered and only these audits' twins fitted."""
    kinds = tuple(k for a in AUDITS for k in a.control_kinds)
    return AuditContext.for_traces(traces, seeds=seeds, settings=AuditSettings(n_bootstrap=n_boot),
                                   target="simulation", calibrator=mlp_profile,
                                   control_kinds=kinds)


def case_traces(case: str, rep: int, n_eval: int) -> TraceSet:
    kind, kwargs, _, shuffle = CASES[case]
    traces = make_traces(kind, 2 * n_eval, seed=50_000 + rep, **kwargs)
    if shuffle:
        order = np.random.default_rng(90_000 + rep).permutation(traces.n_examples)
        traces = TraceSet(traces.logits, traces.labels, traces.routing[order],
                          source_mask=traces.source_mask, meta=traces.meta.model_dump())
    return traces


def replicate(args: tuple[str, int, int, int]) -> dict[str, object]:
    """Audit one fresh synthetic model; returns each audit's status, gain and the mean
    worst-tertile ECE of the candidate and its zeros twin."""
    case, rep, n_eval, n_boot = args
    torch.set_num_threads(1)
    ctx = audit_context(case_traces(case, rep, n_eval), n_boot=n_boot)
    out: dict[str, object] = {"case": case, "rep": rep}
    for audit in AUDITS:
        (verdict,) = audit.run(ctx, audit.cells(ctx))
        out[audit.name] = verdict.status.value
        out[audit.name + "_gain"] = verdict.effect
        if audit.name == "capacity_control":
            seeds = verdict.per_seed
            out["candidate_ece"] = float(np.mean([s["metrics"]["candidate"][HEADLINE]
                                                  for s in seeds]))
            twin = next(k for k in seeds[0]["metrics"] if k.startswith("zeros:"))
            out["twin_ece"] = float(np.mean([s["metrics"][twin][HEADLINE]
                                             for s in seeds]))
    return out


def summarise(case: str, rows: list[dict[str, object]], margin: float, alpha: float) -> bool:
    """Print one case's three rates per audit; True when its bounds hold."""
    _, kwargs, null, shuffle = CASES[case]
    n = len(rows)
    limit = bound(alpha, n)
    cand = np.mean([r["candidate_ece"] for r in rows])
    twin = np.mean([r["twin_ece"] for r in rows])
    print(f"\n{case} ({'null' if null else 'genuine'}; {kwargs}{', routing shuffled' if shuffle else ''}): "
          f"worst-tertile ECE candidate {cand:.4f} vs zeros twin {twin:.4f} (ratio {cand / twin:.2f})")
    ok = True
    for audit in AUDITS:
        statuses = [r[audit.name] for r in rows]
        gains = np.array([r[audit.name + "_gain"] for r in rows], dtype=float)
        truth = float(np.nanmean(gains))
        print(f"  {audit.name}: mean gain {truth:+.4f} (sd {np.nanstd(gains):.4f})")
        for status in ("pass", "inconclusive", "fail"):
            print(f"    {status:>12}: {rate_text([s == status for s in statuses])}")
        if null:
            k = statuses.count("pass") / n
            ok &= k <= limit
            print(f"    false pass {k:.3f}, bound {limit:.3f}: {'ok' if k <= limit else 'EXCEEDED'}")
        elif truth >= margin:
            k = statuses.count("fail") / n
            ok &= k <= limit
            print(f"    false fail {k:.3f} (true gain {truth:+.4f} ≥ margin {margin}), bound "
                  f"{limit:.3f}: {'ok' if k <= limit else 'EXCEEDED'}")
        else:
            print(f"    true gain {truth:+.4f} < margin {margin}: a fail is not an error here")
    return bool(ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=50)
    parser.add_argument("--n-eval", type=int, default=10_000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of: {', '.join(CASES)}")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    settings = AuditSettings()
    started = time.perf_counter()
    print(f"threads: 1 per process, {args.processes} processes; N = {args.n_eval} evaluation "
          f"examples (2N traces); {args.replicates} replicates per case; 3 seeds; "
          f"MLP [d→64→64→1], 3 restarts; bootstrap B = {args.bootstrap}; alpha = "
          f"{settings.alpha}; gain margin {settings.gain_margin}")
    jobs = [(case, rep, args.n_eval, args.bootstrap) for case in cases
            for rep in range(args.replicates)]
    results = []
    with ProcessPoolExecutor(max_workers=args.processes) as pool:
        for i, result in enumerate(pool.map(replicate, jobs, chunksize=1), 1):
            results.append(result)
            print(f"\r  {i}/{len(jobs)} replicates, {time.perf_counter() - started:.0f} s",
                  end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ok = True
    for case in cases:
        ok &= summarise(case, [r for r in results if r["case"] == case],
                        settings.gain_margin, settings.alpha)
    print()
    for case in cases:
        if CASES[case][2]:
            continue
        rows = [r for r in results if r["case"] == case]
        both = [r["capacity_control"] == "pass" and r["shuffled_profile"] == "pass" for r in rows]
        ratio = np.mean([r["candidate_ece"] for r in rows]) / np.mean([r["twin_ece"] for r in rows])
        target = "   target ≥ 0.95" if case == POWER_CASE else ""
        if case == POWER_CASE:
            ok &= sum(both) / len(both) >= 0.95
        print(f"power, {case} (candidate/twin worst-tertile ECE {ratio:.2f}), both audits pass: "
              f"{rate_text(both)}{target}")
    print(f"\n{'every bound holds' if ok else 'SOME BOUND IS EXCEEDED'}; total "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
