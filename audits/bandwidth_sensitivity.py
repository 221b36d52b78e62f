"""Audit: the calibrator's verdicts must not depend on its bandwidth (docs/methods.md §2.6).

For a calibrator exposing ``sensitivity_grid()`` (Nadaraya–Watson: Scott × {0.25, 0.5, 1, 2,
4}, CV-NLL, the global-ECE oracle), the verdicts of the gain audits (capacity, shuffle,
probes: those of :data:`RERUNS` that this run collected) are recomputed with the candidate
*and its controls* at each setting. The claim holds when no pass/fail flips relative to the
calibrator as registered: a setting that turns a pass into a fail (or back) refutes it; one
that only moves a verdict to or from ``inconclusive`` (a change of power, not of direction)
makes the verdict inconclusive. Calibrators without a grid are skipped with the reason.
"""

from __future__ import annotations

from typing import Any

from routeaudit.audit import AuditContext, BaseAudit
from routeaudit.calibration.study import resolve_spec
from routeaudit.hookspecs import hookimpl
from routeaudit.verdict import Status, Verdict

#: The audits whose verdicts are recomputed at every bandwidth, found by name through the
#: run's collected audits: blocking one (``-p no:capacity_control``) removes it here too.
RERUNS = ("capacity_control", "shuffled_profile", "baseline_gain")
#: A flip between these two is a change of direction; to or from inconclusive is not.
DIRECTIONS = {"pass", "fail"}


class BandwidthSensitivityAudit(BaseAudit):
    name = "bandwidth_sensitivity"
    claim = ("The calibrator's verdicts do not flip across its bandwidth grid "
             "(Scott multiples, CV-NLL, ECE oracle).")
    needs = frozenset({"traces", "calibrator"})
    min_examples = 200
    routing_aware = True
    reruns = RERUNS

    def audits(self, ctx: AuditContext) -> list[Any]:
        """The gain audits this run collected, in :data:`RERUNS` order."""
        return [a for a in (ctx.audit(name) for name in self.reruns) if a is not None]

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        return [{"calibrator": resolve_spec(ctx.calibrator).name}]

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        cell = cells[0]
        probe = resolve_spec(ctx.calibrator).make()
        grid = probe.sensitivity_grid() if hasattr(probe, "sensitivity_grid") else {}
        if not grid:
            return [ctx.verdict(self, cell, Status.SKIP, "the calibrator exposes no "
                                "sensitivity_grid(), so there is no bandwidth to vary")]
        audits = self.audits(ctx)
        if not audits:
            return [ctx.verdict(self, cell, Status.SKIP, "none of the audits it re-runs ("
                                f"{', '.join(self.reruns)}) is collected in this run")]
        settings = [(name, value) for name, values in grid.items() for value in values]
        rows = []
        baseline: dict[str, str] = {}
        for setting in [None, *settings]:
            statuses = {}
            for audit in audits:
                for verdict in audit.evaluate(ctx, audit.cells(ctx), setting):
                    statuses[f"{verdict.audit}[{verdict.cell['feature']}]"] = verdict.status.value
            if setting is None:
                baseline = statuses
                continue
            flips = sorted(k for k, v in statuses.items() if {v, baseline.get(k)} == DIRECTIONS)
            shifts = sorted(k for k, v in statuses.items()
                            if v != baseline.get(k) and k not in flips)
            rows.append({"setting": f"{setting[0]}={setting[1]}", "statuses": statuses,
                         "flips": flips, "shifts": shifts})
        flipped = [r for r in rows if r["flips"]]
        shifted = [r for r in rows if r["shifts"]]
        threshold = {"grid": [f"{n}={v}" for n, v in settings], "rule": "no pass/fail flips",
                     "audits": [a.name for a in audits]}
        base = ", ".join(f"{k} {v}" for k, v in baseline.items())
        common = dict(threshold=threshold, per_seed=rows,
                      statistic="settings with a flipped verdict")
        if flipped:
            detail = "; ".join(f"{r['setting']}: {', '.join(r['flips'])} flip" for r in flipped)
            return [ctx.verdict(self, cell, Status.FAIL,
                                f"verdicts depend on the bandwidth (as registered: {base}); "
                                f"{detail}", effect=float(len(flipped)), **common)]
        if shifted:
            detail = "; ".join(f"{r['setting']}: " + ", ".join(
                f"{k} {r['statuses'][k]}" for k in r["shifts"]) for r in shifted)
            return [ctx.verdict(self, cell, Status.INCONCLUSIVE,
                                f"no pass/fail flip, but the evidence is not decisive at every "
                                f"setting (as registered: {base}); {detail}",
                                effect=0.0, **common)]
        return [ctx.verdict(self, cell, Status.PASS,
                            f"no verdict flips across {len(rows)} settings ({base})",
                            effect=0.0, **common)]


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [BandwidthSensitivityAudit()]
