"""The routing-robust calibrator against its baselines, on held-out halves (paper 4, §4).

Rows: ``uncalibrated`` (the model's confidence), ``temperature`` (top-label temperature
scaling on the logits, :class:`~routeaudit.calibrators.TemperatureScaling`), ``per_cell``
(per-expert Platt with shrinkage, no adversary: ``RoutingRobustCalibrator(lam=0)``) and
``robust`` (the same model fitted against the worst routing shift, λ = 1, ratio 5).
Columns: ECE15 and worst-case ECE over routing-only shifts with likelihood ratio ≤ 5
(:func:`routeaudit.stats.shift.worst_case_ece`, the ``expert_calibration`` audit's class)
on the evaluation half, mean ± sd over seeds; each seed redraws the traces (synthetic) or
the 50/50 split (``stratified_split``, whole sequences for token-level traces).

Data:

* **synthetic** (:func:`shifted_moe`): 6 experts with imbalanced load, each miscalibrated
  its own way (some over-, some under-confident), hard routing (the top-1 expert alone sets
  the confidence) or soft (the top-2 experts' distortions mixed by a random gate weight, so
  the top-1 cell only summarises the routing);
* **fixtures**: the traces of ``fixtures/moe/{hard,soft}/adapter.py`` when those adapters
  exist (skipped with a message otherwise): fitted on half the sequences of the ``eval``
  split, scored on the other half and on the ``shift`` split (held-out prose).

A last block varies the shrinkage κ: in this model the adversary acts only through it (the
cells are otherwise separable), so it shows what the adversary is worth at each κ.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/robust_calibrator.py [--seeds 3]
[--sizes 4000,40000] [--out benchmarks/results/robust_calibrator.txt]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import numpy as np  # noqa: E402

import routeaudit.metrics as metrics  # noqa: E402
from routeaudit.calibrators.robust import RoutingRobustCalibrator  # noqa: E402
from routeaudit.calibrators.simple import TemperatureScaling  # noqa: E402
from routeaudit.stats.shift import worst_case_ece  # noqa: E402

RATIO = 5.0
#: Load of each expert (a few rarely used ones, as in trained MoEs) and its distortion of the
#: true log-odds of being right: confidence logit = slope · true logit + offset.
LOAD = np.array([0.34, 0.24, 0.16, 0.12, 0.08, 0.06])
SLOPE = np.array([1.0, 1.7, 0.6, 1.5, 0.5, 2.0])
OFFSET = np.array([0.0, 0.6, -0.5, -0.7, 0.8, 0.4])
METHODS = ("uncalibrated", "temperature", "per_cell", "robust")
FIXTURES = ("fixtures/moe/hard/adapter.py", "fixtures/moe/soft/adapter.py")


def shifted_moe(n: int, seed: int, *, soft: bool = False, n_classes: int = 10
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits [n, K], labels [n], top-1 expert [n])`` of a synthetic MoE whose experts are
    miscalibrated in opposite directions.

    The probability of being right is q = 1/K + (1 − 1/K) σ(u), u ~ N(1, 1.5²). Hard routing:
    the confidence logit is ``SLOPE[e] · logit(q) + OFFSET[e]`` for the routed expert e.
    Soft: two distinct experts drawn by load, mixed with gate weight g ~ U(0.5, 1) for the
    first (the top-1 cell), and the confidence logit is the g-mix of their two distortions.
    The top-label confidence is clipped to [1/K + 1e-3, 1 − 1e-9]; the other K − 1 classes
    share the rest equally; the label is the top class with probability q, else uniform
    over the others.
    """
    rng = np.random.default_rng(seed)
    k = n_classes
    q = 1.0 / k + (1.0 - 1.0 / k) / (1.0 + np.exp(-rng.normal(1.0, 1.5, n)))
    lq = np.log(q) - np.log1p(-q)
    first = rng.choice(len(LOAD), size=n, p=LOAD)
    z = SLOPE[first] * lq + OFFSET[first]
    if soft:
        other = (first + 1 + rng.choice(len(LOAD) - 1, size=n)) % len(LOAD)
        g = rng.uniform(0.5, 1.0, n)
        z = g * z + (1.0 - g) * (SLOPE[other] * lq + OFFSET[other])
    c = np.clip(1.0 / (1.0 + np.exp(-z)), 1.0 / k + 1e-3, 1.0 - 1e-9)
    top = rng.integers(0, k, n)
    probs = np.repeat(((1.0 - c) / (k - 1))[:, None], k, axis=1)
    probs[np.arange(n), top] = c
    wrong = (top + 1 + rng.integers(0, k - 1, n)) % k
    labels = np.where(rng.random(n) < q, top, wrong)
    return np.log(probs), labels.astype(np.int64), first.astype(np.float64)


def predictions(logits: np.ndarray, conf: np.ndarray, cells: np.ndarray, y: np.ndarray,
                cal: np.ndarray, ev: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
    """Evaluation-half predictions of every method and its fit time (s), fitted on ``cal``."""
    out: dict[str, tuple[np.ndarray, float]] = {"uncalibrated": (conf[ev], 0.0)}
    fits: dict[str, tuple[Callable[[], object], np.ndarray]] = {
        "temperature": (TemperatureScaling, logits),
        "per_cell": (lambda: RoutingRobustCalibrator(lam=0.0), np.column_stack([conf, cells])),
        "robust": (RoutingRobustCalibrator, np.column_stack([conf, cells])),
    }
    for name, (make, X) in fits.items():
        t0 = time.perf_counter()
        est = make().fit(X[cal], y[cal])  # type: ignore[attr-defined]
        seconds = time.perf_counter() - t0
        out[name] = (np.asarray(est.predict(X[ev])), seconds)  # type: ignore[attr-defined]
    return out


def scores(p: np.ndarray, y: np.ndarray, cells: np.ndarray) -> tuple[float, float]:
    """(ECE15, worst-case ECE at ratio 5) of one method on the evaluation half."""
    return metrics.ece(p, y), worst_case_ece(p, y, cells, ratio=RATIO, n_bins=15).value


def table(title: str, runs: list[dict[str, tuple[float, float, float]]]) -> list[str]:
    """Lines of one block: a row per method, mean ± sd over the runs (seeds)."""
    lines = [title, f"  {'method':<13} {'ECE15':>17} {'worst-case ECE (5)':>20} {'fit s':>7}"]
    for m in METHODS:
        e = np.array([r[m][0] for r in runs])
        w = np.array([r[m][1] for r in runs])
        t = np.array([r[m][2] for r in runs])
        lines.append(f"  {m:<13} {e.mean():.4f} ± {_sd(e):.4f}    {w.mean():.4f} ± {_sd(w):.4f}"
                     f"    {t.mean():6.3f}")
    return lines


def _sd(a: np.ndarray) -> float:
    return float(a.std(ddof=1)) if len(a) > 1 else 0.0


def evaluate(logits, labels, cells, cal, ev) -> dict[str, tuple[float, float, float]]:
    conf, y = metrics.confidence_and_correct(logits, labels)
    preds = predictions(logits, conf, cells, y, cal, ev)
    return {m: (*scores(p, y[ev], cells[ev]), s) for m, (p, s) in preds.items()}


def synthetic_blocks(sizes: list[int], seeds: int) -> list[str]:
    lines: list[str] = []
    for soft in (False, True):
        for n in sizes:
            runs = []
            for seed in range(seeds):
                logits, labels, cells = shifted_moe(n, seed, soft=soft)
                idx = np.arange(n)
                runs.append(evaluate(logits, labels, cells, idx[: n // 2], idx[n // 2:]))
            kind = "soft" if soft else "hard"
            lines += table(f"synthetic {kind} routing, N = {n} ({n // 2} fit / {n // 2} held out)",
                           runs)
            lines.append("")
    return lines


def shrinkage_block(n: int, seeds: int, kappas: tuple[float, ...] = (5.0, 20.0, 100.0)
                    ) -> list[str]:
    """What the adversary does in this model: it sets how far each cell is shrunk. Per-cell
    Platt with and without it, over the shrinkage strength κ (synthetic hard routing)."""
    lines = [f"shrinkage κ (synthetic hard routing, N = {n}, held-out half; mean over {seeds} "
             "seeds): ECE15 / worst-case ECE (5)",
             f"  {'κ':>6} {'per_cell (λ = 0)':>22} {'robust (λ = 1)':>22}"]
    data = []
    for seed in range(seeds):
        logits, labels, cells = shifted_moe(n, seed)
        conf, y = metrics.confidence_and_correct(logits, labels)
        data.append((np.column_stack([conf, cells]), y, cells))
    h = n // 2
    for kappa in kappas:
        row = []
        for lam in (0.0, 1.0):
            got = []
            for X, y, cells in data:
                p = RoutingRobustCalibrator(lam=lam, shrinkage=kappa).fit(X[:h], y[:h]).predict(X[h:])
                got.append(scores(p, y[h:], cells[h:]))
            e, w = np.mean(got, axis=0)
            row.append(f"{e:.4f} / {w:.4f}")
        lines.append(f"  {kappa:6.0f} {row[0]:>22} {row[1]:>22}")
    return [*lines, ""]


def fixture_blocks(seeds: int) -> list[str]:
    """Each MoE fixture: fitted on half of its ``eval`` split (whole sequences), scored on
    the other half and on its ``shift`` split (held-out prose: a real distribution shift)."""
    from routeaudit.model.adapter import find_adapters
    from routeaudit.model.extract import ModelSession
    from routeaudit.session.plugins import import_user_file
    from routeaudit.stats.partitions import stratified_split
    from routeaudit.summaries import top1_expert

    lines: list[str] = []
    for rel in FIXTURES:
        path = ROOT / rel
        if not path.exists():
            lines += [f"{rel}: not there yet, skipped", ""]
            continue
        (found,) = find_adapters(import_user_file(str(path)))
        session = ModelSession(found, progress=False)
        ts = session.traces()
        shift = session.for_split("shift").traces() if "shift" in session.extra_splits else None
        conf, y = metrics.confidence_and_correct(ts.logits, ts.labels)
        cells = top1_expert(ts)
        in_domain, shifted = [], []
        for seed in range(seeds):
            cal, ev = stratified_split(conf, y, seed, groups=ts.group)
            in_domain.append(evaluate(ts.logits, ts.labels, cells, cal, ev))
            if shift is not None:
                shifted.append(evaluate_on(ts, cells, cal, shift))
        load = np.bincount(cells.astype(np.int64)) / cells.size
        lines += table(f"{rel}: {ts.n_examples} tokens, top-1 load "
                       f"{np.array2string(load, precision=2)}; fit on half the sequences, "
                       "scored on the other half", in_domain)
        if shifted:
            lines += table(f"{rel}: same fits scored on the 'shift' split ({shift.n_examples} "
                           "tokens of held-out prose)", shifted)
        lines.append("")
    return lines


def evaluate_on(ts, cells, cal, shift) -> dict[str, tuple[float, float, float]]:
    """Fitted on ``cal`` of ``ts``, scored on all of ``shift`` (another split of the model)."""
    from routeaudit.summaries import top1_expert

    conf, y = metrics.confidence_and_correct(ts.logits, ts.labels)
    s_conf, s_y = metrics.confidence_and_correct(shift.logits, shift.labels)
    s_cells = top1_expert(shift)
    n = len(conf)
    logits = np.concatenate([ts.logits, shift.logits])
    preds = predictions(logits, np.concatenate([conf, s_conf]), np.concatenate([cells, s_cells]),
                        np.concatenate([y, s_y]), cal, n + np.arange(len(s_conf)))
    return {m: (*scores(p, s_y, s_cells), t) for m, (p, t) in preds.items()}


def timing(n: int = 50_000) -> str:
    logits, labels, cells = shifted_moe(n, 0)
    conf, y = metrics.confidence_and_correct(logits, labels)
    X = np.column_stack([conf, cells])
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        RoutingRobustCalibrator().fit(X, y)
        best.append(time.perf_counter() - t0)
    return f"fit time of RoutingRobustCalibrator() on N = {n}, 6 cells: {min(best):.3f} s (best of 3)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sizes", default="4000,40000")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/robust_calibrator.txt"))
    parser.add_argument("--no-fixtures", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    lines = synthetic_blocks(sizes, args.seeds)
    lines += shrinkage_block(min(sizes), args.seeds)
    lines += [] if args.no_fixtures else fixture_blocks(args.seeds)
    lines.append(timing())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=False).stdout.strip()
    head = (f"# {date.today()} command: OMP_NUM_THREADS=1 python benchmarks/robust_calibrator.py "
            f"--seeds {args.seeds} --sizes {args.sizes} (git {commit or '?'}; 1 thread; "
            f"{time.perf_counter() - t0:.0f} s)")
    text = "\n".join([head, *lines]) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
