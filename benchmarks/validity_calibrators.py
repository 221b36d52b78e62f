"""Error rates of the calibrator audits, by simulation (issue [2/6], item 6).

Each replicate draws a fresh synthetic model and audits the full-vector MLP over
(confidence, H_1..H_L) of docs/methods.md §2.7 on it, exactly as ``routeaudit run`` would (three
seeds, each redrawing the 50/50 calibration/evaluation split; twins with three restarts):

* **capacity-only** (``make_traces("null")``): routing strongly correlated with confidence,
  correctness a non-linear function of confidence only. The MLP's gain over a linear map is
  capacity. The battery must *reject the claim*: ``capacity_control`` or
  ``shuffled_profile`` fails, in ≥ 95% of replicates.
* **genuine** (``make_traces("planted", effect=0.5, confound=0.3)``, the planted effect of
  ``fixtures/calibrator_genuine.py``): routing-conditional miscalibration. The claim must
  *survive*: both audits pass, in ≥ 90% of replicates.

N is the size of the evaluation split (the traces hold 2N examples). Replicates run in
``--processes`` worker processes, one thread each.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/validity_calibrators.py [--replicates 200]
[--n-eval 10000] [--processes 2]``
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

from benchmarks.validity import rate
from routeaudit.audit import AuditContext, AuditSettings
from routeaudit.audits.capacity_control import CapacityControlAudit
from routeaudit.audits.shuffled_profile import ShuffledProfileAudit
from routeaudit.calibrators.mlp import mlp_profile
from routeaudit.fixtures.synthetic import make_traces


def audit_context(traces, seeds=(0, 1, 2), n_boot: int = 1000) -> AuditContext:
    """The context ``routeaudit run`` builds for one target (seeds redraw the split), with
    the full-vector MLP of ``mlp_profile`` registered and only these audits' twins fitted."""
    audits = (CapacityControlAudit(), ShuffledProfileAudit())
    kinds = tuple(k for a in audits for k in a.control_kinds)
    return AuditContext.for_traces(traces, seeds=seeds, settings=AuditSettings(n_bootstrap=n_boot),
                                   target="simulation", calibrator=mlp_profile,
                                   control_kinds=kinds)


#: The genuine case: the planted effect of fixtures/calibrator_genuine.py.
GENUINE = {"effect": 0.5, "confound": 0.3}


def replicate(args: tuple[str, int, int, int, dict[str, float]]) -> dict[str, object]:
    """Audit one fresh synthetic model; returns the two statuses and gains."""
    kind, rep, n_eval, n_boot, genuine = args
    torch.set_num_threads(1)
    extra = genuine if kind == "planted" else {}
    traces = make_traces(kind, 2 * n_eval, seed=50_000 + rep, **extra)
    ctx = audit_context(traces, n_boot=n_boot)
    out: dict[str, object] = {"kind": kind, "rep": rep}
    for audit in (CapacityControlAudit(), ShuffledProfileAudit()):
        (verdict,) = audit.run(ctx, audit.cells(ctx))
        out[audit.name] = verdict.status.value
        out[audit.name + "_gain"] = verdict.effect
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--n-eval", type=int, default=10_000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--effect", type=float, default=GENUINE["effect"],
                        help="planted effect of the genuine case (0.5)")
    parser.add_argument("--confound", type=float, default=GENUINE["confound"],
                        help="routing-confidence confounding of the genuine case (0.3)")
    parser.add_argument("--cases", choices=["both", "null", "genuine"], default="both")
    args = parser.parse_args()
    genuine = {"effect": args.effect, "confound": args.confound}
    kinds = {"both": ("null", "planted"), "null": ("null",), "genuine": ("planted",)}[args.cases]
    started = time.perf_counter()
    print(f"threads: 1 per process, {args.processes} processes; N = {args.n_eval} evaluation "
          f"examples (2N traces); {args.replicates} replicates per case; 3 seeds; "
          f"MLP [d→64→64→1], 3 restarts; bootstrap B = {args.bootstrap}; alpha = 0.05")
    jobs = [(kind, rep, args.n_eval, args.bootstrap, genuine)
            for kind in kinds for rep in range(args.replicates)]
    with ProcessPoolExecutor(max_workers=args.processes) as pool:
        results = list(pool.map(replicate, jobs, chunksize=1))
    null = [r for r in results if r["kind"] == "null"]
    planted = [r for r in results if r["kind"] == "planted"]
    if null:
        rejected = [r["capacity_control"] != "pass" or r["shuffled_profile"] != "pass"
                    for r in null]
        print("\ncapacity-only MLP (confounded null): claim rejected (capacity_control or "
              f"shuffled_profile fails): {rate(rejected)}   target >= 0.95")
        for name in ("capacity_control", "shuffled_profile"):
            print(f"  {name} fails alone: {rate([r[name] != 'pass' for r in null])}")
    if planted:
        survived = [r["capacity_control"] == "pass" and r["shuffled_profile"] == "pass"
                    for r in planted]
        print(f"genuine routing-aware MLP (planted, effect {args.effect}, confound "
              f"{args.confound}): both pass: {rate(survived)}   target >= 0.90")
        for name in ("capacity_control", "shuffled_profile"):
            gains = np.array([r[name + "_gain"] for r in planted], dtype=float)
            print(f"  {name} passes alone: {rate([r[name] == 'pass' for r in planted])}; "
                  f"mean gain {np.nanmean(gains):+.4f}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
