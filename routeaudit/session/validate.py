"""``routeaudit validate``: the error rates of the selected audits at the user's own N, seeds,
α and margins, by simulation (docs/methods.md §5.2).

For every audit whose plugin answers ``routeaudit_planted_cases``, synthetic models shaped
like the target (its number of examples, routing layers and classes) are generated with a
planted effect of each size on the audit's grid (0: the audit's null), audited exactly as
``routeaudit run`` would (same settings, seeds and splits), and the outcomes tallied:

* **false pass**: the pass rate at planted size 0 (must be ≤ α + 2 SE);
* **false fail**: the largest fail rate among sizes whose true effect is at or above the
  margin (≤ α + 2 SE); the true effect of a size is the mean estimate over its replicates
  (the estimand of the test at this N), so sizes near the margin are classed with that
  estimate's noise;
* **power**: the pass rate at each size, and the minimal detectable effect at 80 % power
  (interpolated between sizes), next to the normal-theory one the inconclusive reasons use.

Replicates of one size share nothing but the settings; replicate r of every audit uses the
same traces (so audits that share a computation, like the two matched audits, share it).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any

import numpy as np

from routeaudit.audit import Audit, AuditContext, AuditSettings, PlantedCases, audit_member
from routeaudit.errors import UsageError
from routeaudit.session.config import Config
from routeaudit.session.runner import collect_audits, hooks, prepare_session
from routeaudit.session.targets import load_target
from routeaudit.stats.evidence import POWER
from routeaudit.stats.rates import bound, proportion_ci
from routeaudit.verdict import ExitCode, Status

#: ``--quick``: replicates per size and the permutation / bootstrap counts it caps.
QUICK = {"replicates": 25, "permutations": 199, "bootstrap": 200}
FULL_REPLICATES = 100


@dataclass
class Row:
    """One planted size of one audit: the outcomes of its replicates."""

    size: float
    statuses: list[str] = field(default_factory=list)
    effects: list[float] = field(default_factory=list)
    ses: list[float] = field(default_factory=list)

    def rate(self, status: str) -> float:
        return self.statuses.count(status) / max(len(self.statuses), 1)

    def text(self, status: str) -> str:
        k, n = self.statuses.count(status), len(self.statuses)
        lo, hi = proportion_ci(k, n)
        return f"{k / n:.2f} [{lo:.2f},{hi:.2f}]" if n else "n/a"

    @property
    def truth(self) -> float:
        return float(np.mean(self.effects)) if self.effects else float("nan")


@dataclass
class Study:
    audit: str
    cases: PlantedCases
    margin: float
    rows: list[Row]
    seconds: float = 0.0
    cell: str = ""


def shape_of(config: Config, targets: Sequence[str], modules: dict[str, Any]) -> dict[str, Any]:
    """N, routing layers, classes and seeds of the (first) target, and its calibrator."""
    if not targets:
        raise UsageError("validate needs a target (an adapter .py file or traces)")
    target = load_target(targets[0], config, modules)
    traces = target.traces[0]
    seeds = list(range(len(target.traces))) if len(target.traces) > 1 else config.options.seeds
    calibrator = config.calibrators.get("__cli__") or target.calibrator
    return {"name": target.name, "n": traces.n_examples, "n_layers": traces.n_layers,
            "n_classes": int(traces.logits.shape[1]), "seeds": list(seeds),
            "calibrator": calibrator}


def run_validation(config: Config, targets: Sequence[str], modules: dict[str, Any]) -> int:
    """The validate command: print the table, exit 0 when every bound holds, else 1."""
    started = time.perf_counter()
    o = config.options
    prepare_session(config)
    shape = shape_of(config, targets, modules)
    settings = config.settings()
    replicates = o.replicates or (QUICK["replicates"] if o.quick else FULL_REPLICATES)
    if o.quick:
        settings = replace(settings, n_permutations=min(settings.n_permutations,
                                                        QUICK["permutations"]),
                           n_bootstrap=min(settings.n_bootstrap, QUICK["bootstrap"]))
    audits = collect_audits(config)
    if o.audit:
        audits = [a for a in audits if a.name in o.audit]
    studies, cannot = plan(config, audits, shape, quick=o.quick)
    print(f"routeaudit validate {shape['name']}: N = {shape['n']} examples (N_eval = "
          f"{shape['n'] // 2}), {shape['n_layers']} routing layers, {shape['n_classes']} classes, "
          f"seeds {','.join(map(str, shape['seeds']))}; alpha = {settings.alpha}; "
          f"{replicates} replicates per size; permutations {settings.n_permutations} "
          f"(sequential h {settings.sequential_h or 'off'}), "
          f"bootstrap {settings.n_bootstrap}{' (--quick)' if o.quick else ''}")
    for name, why in cannot:
        print(f"  {name}: not simulated: {why}")
    if not studies:
        print("no selected audit can be simulated")
        return int(ExitCode.NO_AUDITS)
    simulate(studies, audits, shape, settings, replicates, summaries=config.summaries,
             options=config.options, requested=o.summary or (), progress=not o.quiet and sys.stderr.isatty())
    ok = all(report(study, settings.alpha, replicates) for study in studies)
    print(f"\n{'every bound holds' if ok else 'SOME BOUND IS EXCEEDED'} "
          f"({time.perf_counter() - started:.0f} s)")
    return int(ExitCode.OK if ok else ExitCode.VERDICT_FAILED)


def plan(config: Config, audits: Sequence[Audit], shape: dict[str, Any], *, quick: bool
         ) -> tuple[list[Study], list[tuple[str, str]]]:
    """The audits that can be simulated (their planted cases), and why the others cannot."""
    studies, cannot = [], []
    caller = hooks(config)
    for audit in audits:
        if "calibrator" in audit.needs and shape["calibrator"] is None:
            cannot.append((audit.name, "the target registers no calibrator"))
            continue
        if "calibrator" in audit.needs and quick:
            cannot.append((audit.name, "fits the calibrator and its controls in every "
                           "replicate (minutes); run without --quick"))
            continue
        answer = caller.call("routeaudit_planted_cases", firstresult=True, audit=audit,
                             config=config)
        own = audit_member(audit, "planted_cases")
        if answer is None and callable(own):
            answer = own()
        if answer is None:
            cannot.append((audit.name, "it provides no planted cases (a planted_cases() "
                           "method or the routeaudit_planted_cases hook)"))
        elif isinstance(answer, str):
            cannot.append((audit.name, answer))
        else:
            margin = answer.margin(config.settings()) if answer.margin else 0.0
            studies.append(Study(audit.name, answer, margin,
                                 [Row(size) for size in answer.effects]))
    return studies, cannot


def simulate(studies: list[Study], audits: Sequence[Audit], shape: dict[str, Any],
             settings: AuditSettings, replicates: int, *, summaries: Any, options: Any = None,
             requested: Sequence[str] = (), progress: bool = True) -> None:
    """Fill every study's rows. Studies whose planted cases are the same generator and grid
    (the two matched audits) share each replicate's traces and context, so they share its
    computations too, as in one ``routeaudit run``."""
    by_name = {a.name: a for a in audits}
    kinds = tuple(k for a in audits for k in audit_member(a, "control_kinds"))
    groups: dict[tuple[str, tuple[float, ...]], list[Study]] = {}
    for study in studies:
        key = (getattr(study.cases.generate, "__name__", repr(study.cases.generate)),
               study.cases.effects)
        groups.setdefault(key, []).append(study)
    for members in groups.values():
        cases = members[0].cases
        for i, size in enumerate(cases.effects):
            for rep in range(replicates):
                traces = cases.generate(size, n=shape["n"], seed=rep, n_layers=shape["n_layers"],
                                        n_classes=shape["n_classes"])
                ctx = AuditContext.for_traces(
                    traces, seeds=shape["seeds"], settings=settings, summaries=summaries,
                    target="validate", calibrator=shape.get("calibrator"), control_kinds=kinds,
                    options=options, audits=dict(by_name), requested_summaries=list(requested))
                for study in members:
                    began = time.perf_counter()
                    audit = by_name[study.audit]
                    cells = study.cases.cells(ctx) if study.cases.cells else audit.cells(ctx)[:1]
                    verdict = audit.run(ctx, cells)[0]
                    study.cell = verdict.cell_id
                    row = study.rows[i]
                    row.statuses.append(verdict.status.value)
                    if verdict.effect is not None:
                        row.effects.append(float(verdict.effect))
                    se = _se(verdict.evidence)
                    if se is not None:
                        row.ses.append(se)
                    study.seconds += time.perf_counter() - began
                if progress:
                    names = "+".join(m.audit for m in members)
                    print(f"\r  {names}: size {size:g}, replicate {rep + 1}/{replicates}   ",
                          end="", file=sys.stderr, flush=True)
    if progress:
        print("\r" + " " * 78 + "\r", end="", file=sys.stderr, flush=True)


def _se(evidence: dict[str, Any]) -> float | None:
    """The pooled standard error a verdict recorded (the largest, over its controls)."""
    if "se" in evidence:
        return float(evidence["se"])
    inner = [v["se"] for v in evidence.values() if isinstance(v, dict) and "se" in v]
    return float(max(inner)) if inner else None


def report(study: Study, alpha: float, replicates: int) -> bool:
    """Print one audit's table and its three figures; True when both error bounds hold."""
    limit = bound(alpha, replicates)
    print(f"\n{study.audit}[{study.cell}]: {study.cases.description} (margin "
          f"{study.margin:g}; {study.seconds:.0f} s)")
    print(f"  {'planted':>8}  {'effect':>8}  {'pass':>16}  {'inconclusive':>16}  {'fail':>16}")
    for row in study.rows:
        print(f"  {row.size:>8g}  {row.truth:>+8.4f}  {row.text('pass'):>16}  "
              f"{row.text('inconclusive'):>16}  {row.text('fail'):>16}")
    null = [r for r in study.rows if r.size == 0]
    genuine = [r for r in study.rows if r.size > 0 and r.truth >= study.margin]
    ok = True
    if null:
        rate = null[0].rate(Status.PASS.value)
        ok &= rate <= limit
        print(f"  false pass (planted 0): {null[0].text('pass')}   bound {limit:.3f}"
              f"{'' if rate <= limit else '   EXCEEDED'}")
    if genuine:
        worst = max(genuine, key=lambda r: r.rate(Status.FAIL.value))
        rate = worst.rate(Status.FAIL.value)
        ok &= rate <= limit
        print(f"  false fail (effect ≥ margin), worst size {worst.size:g}: "
              f"{worst.text('fail')}   bound {limit:.3f}{'' if rate <= limit else '   EXCEEDED'}")
    else:
        print("  false fail: no planted size has an effect at or above the margin")
    print(f"  minimal detectable effect at {POWER:.0%} power: simulated {_mde(study.rows)}; "
          f"normal theory {_mde_theory(study.rows, alpha)}")
    return bool(ok)


def _mde(rows: list[Row]) -> str:
    """The effect (mean estimate) at which the pass rate reaches 80 %, interpolated."""
    points = sorted((r.truth, r.rate(Status.PASS.value)) for r in rows if r.size > 0)
    for (e0, p0), (e1, p1) in zip([(0.0, 0.0), *points], points, strict=False):
        if p1 >= POWER:
            if p1 == p0:
                return f"{e1:.4f}"
            return f"{e0 + (POWER - p0) * (e1 - e0) / (p1 - p0):.4f}"
    return f"> {points[-1][0]:.4f} (not reached)" if points else "n/a"


def _mde_theory(rows: list[Row], alpha: float) -> str:
    """(z_{1−α} + z_{0.8}) × the median pooled standard error at planted size 0."""
    ses = [se for r in rows if r.size == 0 for se in r.ses]
    if not ses:
        return "n/a"
    z = NormalDist().inv_cdf(1 - alpha) + NormalDist().inv_cdf(POWER)
    return f"{z * float(np.median(ses)):.4f}"
