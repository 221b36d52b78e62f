"""Error rates of the causal_ablation decision, by simulation (docs/methods.md §3.4, §5.2).

The decision (``decide_slices`` in ``audits/causal_ablation.py``, the code the audit runs) is
fed synthetic per-example ΔNLL vectors, no model: three slices with masses 0.5 (the top-mass
slice), 0.3 and 0.2 (all appreciable at ``--mass-min`` 0.10), scored on the same n examples,

    d_k,i = μ_k + σ_k (√ρ z_i + √(1 − ρ) e_k,i),   z, e ~ N(0, 1),  ρ = 0.5,

so the slices share per-example difficulty (the pairing the paired differences exploit).
σ = 1 for slices with an effect; a slice with no (or a marginal) effect has σ = 0.2. Cases:

(a) genuine: μ = (0.5, 0.5 − gap, 0.2), all above the margin: false-fail rate (must be
    ≤ α + 2 SE) and pass rate (power) over gaps and n;
(b) exact tie between the top-mass slice and another, μ = (0.5, 0.5, 0.2): false-pass rate
    (≤ α + 2 SE) and fail rate;
(c) the 0.3-mass slice has zero true effect, μ = (0.5, 0, 0.2): false-pass rate (≤ α + 2 SE)
    and fail rate (power to refute);
(d) the 0.3-mass slice sits exactly at the margin, μ = (0.5, 0.01, 0.2): false-fail rate
    (≤ α + 2 SE).

Rates carry 95 % Wilson intervals; SE = √(α(1 − α)/R). At an exact α an error
figure exceeds α + 2 SE with probability about 0.025, so with some 20 figures one may by
chance: a flagged figure is re-checked on ``--confirm`` fresh replicates. Then, unless
``--no-fixtures``, the real audit runs once on the two digits fixtures (the Block model and
the Block model plus a zero-valued ``constant`` source family) through ``routeaudit run``.
Replicates run in ``--processes`` worker processes, one thread each.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/validity_causal.py [--replicates 400]
[--bootstrap 200] [--processes 2] [--confirm 2000] [--out benchmarks/results/validity_causal.txt]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np

from benchmarks._output import Tee
from routeaudit.audits.causal_ablation import NLL_MARGIN, decide_slices
from routeaudit.stats.rates import bound, rate_text

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.05
MASSES = (0.5, 0.3, 0.2)
NAMES = ("attn/early/top", "attn/early/second", "attn/late/third")
RHO = 0.5
SIZES = (100, 300, 1000)
GAPS = (0.05, 0.1, 0.2)
#: case -> (label, μ as a function of the gap, σ per slice)
CASES = {
    "genuine": ("top-mass slice largest by gap", lambda gap: (0.5, 0.5 - gap, 0.2), (1, 1, 1)),
    "tie": ("exact tie top vs second", lambda gap: (0.5, 0.5, 0.2), (1, 1, 1)),
    "zero": ("mass 0.3 slice, zero effect", lambda gap: (0.5, 0.0, 0.2), (1, 0.2, 1)),
    "margin": ("mass 0.3 slice, effect = margin", lambda gap: (0.5, NLL_MARGIN, 0.2),
               (1, 0.2, 1)),
}


def rate(flags: list[bool]) -> str:
    """A rate with its 95% Wilson interval (the one implementation, routeaudit.stats.rates)."""
    return rate_text(flags)


def limit(replicates: int) -> float:
    """α + 2 SE, SE the standard error of a rate α over this many replicates."""
    return bound(ALPHA, replicates)


def replicate(job: tuple[str, float, int, int, int]) -> tuple[str, float, int, int, str]:
    """One decision on fresh synthetic ΔNLL vectors; returns (case, gap, n, rep, status)."""
    case, gap, n, rep, n_boot = job
    _, mu_of, sigma = CASES[case]
    gen = np.random.default_rng([list(CASES).index(case), int(gap * 1000), n, rep])
    shared = gen.standard_normal(n)
    deltas = [m + s * (np.sqrt(RHO) * shared + np.sqrt(1 - RHO) * gen.standard_normal(n))
              for m, s in zip(mu_of(gap), sigma, strict=True)]
    out = decide_slices(NAMES, MASSES, deltas, mass_min=0.10, nll_margin=NLL_MARGIN,
                        alpha=ALPHA, n_boot=n_boot, rng=gen)
    return case, gap, n, rep, out.status.value


#: Each case's error figure (the outcome that is an error) and its other figure.
FIGURES = {"genuine": (("false-fail", "fail"), ("pass (power)", "pass")),
           "tie": (("false-pass", "pass"), ("fail", "fail")),
           "zero": (("false-pass", "pass"), ("fail (refuted)", "fail")),
           "margin": (("false-fail", "fail"), ("pass", "pass"))}
HEADINGS = {
    "genuine": "(a) genuine: top-mass slice truly largest, every effect above the margin",
    "tie": "(b) exact tie between the top-mass slice and the second slice",
    "zero": "(c) an appreciable-mass slice (0.3) with zero true effect (σ 0.2)",
    "margin": f"(d) an appreciable-mass slice whose true effect is exactly the margin "
              f"{NLL_MARGIN:g} (σ 0.2)"}


def run_jobs(jobs: list[tuple[str, float, int, int, int]], processes: int
             ) -> dict[tuple[str, float, int], list[str]]:
    with ProcessPoolExecutor(max_workers=processes) as pool:
        results = list(pool.map(replicate, jobs, chunksize=20))
    status: dict[tuple[str, float, int], list[str]] = {}
    for case, gap, n, _, s in results:
        status.setdefault((case, gap, n), []).append(s)
    return status


def simulate(replicates: int, n_boot: int, processes: int, confirm: int) -> None:
    jobs = [(case, gap, n, rep, n_boot)
            for case in CASES for gap in (GAPS if case == "genuine" else (0.0,))
            for n in SIZES for rep in range(replicates)]
    status = run_jobs(jobs, processes)
    flagged = []
    bound = limit(replicates)
    for case in CASES:
        print("\n" + HEADINGS[case])
        (err_name, err), (other_name, other) = FIGURES[case]
        for (c, gap, n), got in status.items():
            if c != case:
                continue
            errors = [s == err for s in got]
            ok = np.mean(errors) <= bound
            if not ok:
                flagged.append((case, gap, n))
            where = f"gap {gap:<4g} n {n:>5}" if case == "genuine" else f"n {n:>5}"
            line = (f"  {where}: {err_name} {rate(errors)} {'ok' if ok else 'EXCEEDS'} "
                    f"(≤ {bound:.3f}); {other_name} {rate([s == other for s in got])}")
            if case == "tie":  # a fail at an exact tie is an error too
                fails = [s == "fail" for s in got]
                line += " " + ("ok" if np.mean(fails) <= bound else "EXCEEDS")
                if np.mean(fails) > bound:
                    flagged.append((case, gap, n))
            print(line)
    n_checked = sum(len(SIZES) * (len(GAPS) if c == "genuine" else 1) for c in CASES) + len(SIZES)
    print(f"\n{n_checked} error figures checked against α + 2 SE; at an exact α each exceeds "
          f"it with probability about 0.025, so a flag is re-checked on {confirm} fresh "
          "replicates (later replicate indices, same design)")
    for case, gap, n in dict.fromkeys(flagged):
        more = run_jobs([(case, gap, n, rep, n_boot)
                         for rep in range(replicates, replicates + confirm)], processes)
        got = more[(case, gap, n)]
        (err_name, err), _ = FIGURES[case]
        names = [(err_name, err)] + ([("fail", "fail")] if case == "tie" else [])
        for name, outcome in names:
            errors = [s == outcome for s in got]
            verdict = "ok" if np.mean(errors) <= limit(confirm) else "EXCEEDS"
            print(f"  re-check {HEADINGS[case][:3]} gap {gap:g} n {n}: {name} {rate(errors)} "
                  f"{verdict} (≤ {limit(confirm):.3f})")
    if not flagged:
        print("  (nothing flagged)")


def fixtures(n_boot: int) -> None:
    """The real audit on the digits fixtures, as ``routeaudit run`` runs it."""
    from routeaudit.cli import main

    print(f"\ndigits fixtures through `routeaudit run --audit causal_ablation --bootstrap "
          f"{n_boot} --no-cache` (10,000 evaluation images, alpha {ALPHA}, margin "
          f"{NLL_MARGIN:g} nats):")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("block_adapter", "constant_source_adapter"):
            started = time.perf_counter()
            out = Path(tmp) / f"{name}.json"
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(["run", str(ROOT / "fixtures" / "digits" / f"{name}.py"), "--audit",
                             "causal_ablation", "--bootstrap", str(n_boot), "--no-cache",
                             "--json", str(out), "-q"])
            print(f"  {name}.py: exit {code} ({time.perf_counter() - started:.0f} s)")
            for v in json.loads(out.read_text())["verdicts"]:
                head = v["reason"].split(" (slices, ")[0]
                print(f"    [{v['cell']['sublayer']}] {v['status'].upper()}: {head[:400]}"
                      + ("…" if len(head) > 400 else ""))
                for r in v["per_seed"]:
                    pd = r.get("paired_difference")
                    pair = "" if pd is None else \
                        (f"  top−this {pd:+.4f} [{r['paired_interval'][0]:+.4f}, "
                         f"{r['paired_interval'][1]:+.4f}]")
                    print(f"      {r['slice']:<22} mass {r['mass']:.3f}  ΔNLL "
                          f"{r['delta_nll']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]" + pair)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=400)
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="bootstrap replicates per decision in the simulation (200)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--confirm", type=int, default=2000,
                        help="fresh replicates for re-checking a flagged error figure (2000)")
    parser.add_argument("--no-fixtures", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    args = parser.parse_args()
    stream = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115
    with contextlib.redirect_stdout(Tee(sys.stdout, stream) if stream else sys.stdout):
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        print(f"routeaudit causal_ablation validity study, {now}")
        print("command: OMP_NUM_THREADS=1 python benchmarks/validity_causal.py "
              + " ".join(sys.argv[1:]))
        print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, 1 thread per "
              f"process, {args.processes} processes; {args.replicates} replicates per cell; "
              f"bootstrap B = {args.bootstrap} (simulation), 1000 (fixtures); alpha = {ALPHA} "
              f"(90% intervals); nll margin {NLL_MARGIN:g}; masses {MASSES}; ρ = {RHO}; "
              f"n in {SIZES}")
        started = time.perf_counter()
        simulate(args.replicates, args.bootstrap, args.processes, args.confirm)
        print(f"\nsimulation {time.perf_counter() - started:.0f} s")
        if not args.no_fixtures:
            fixtures(1000)
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if stream:
        stream.close()


if __name__ == "__main__":
    main()
