"""Audit: the calibrator's verdicts must not depend on its bandwidth (methods.md §2.6).

For a calibrator exposing ``sensitivity_grid()`` (Nadaraya–Watson: Scott × {0.25, 0.5, 1, 2,
4}, CV-NLL, the global-ECE oracle), every other calibrator verdict (capacity, shuffle,
probes) is recomputed with the candidate *and its controls* at each setting. The claim holds
when no pass/fail flips relative to the calibrator as registered. Calibrators without a grid
are skipped with the reason.
"""

from __future__ import annotations

from typing import Any

from routeaudit.audit import AuditContext
from routeaudit.comparison import resolve_spec
from routeaudit.gain_audit import GainAudit
from routeaudit.hookspecs import hookimpl
from routeaudit.verdict import Status, Verdict

from .baseline_gain import BaselineGainAudit
from .capacity_control import CapacityControlAudit
from .shuffled_profile import ShuffledProfileAudit


class BandwidthSensitivityAudit:
    name = "bandwidth_sensitivity"
    claim = ("The calibrator's verdicts do not flip across its bandwidth grid "
             "(Scott multiples, CV-NLL, ECE oracle).")
    needs = frozenset({"traces", "calibrator"})
    min_examples = 200
    routing_aware = True

    @property
    def control_kinds(self) -> tuple[str, ...]:
        return tuple(kind for audit in self.audits() for kind in audit.kinds)

    def audits(self) -> list[GainAudit]:
        return [CapacityControlAudit(), ShuffledProfileAudit(), BaselineGainAudit()]

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        return [{"calibrator": resolve_spec(ctx.calibrator).name}]

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        cell = cells[0]
        probe = resolve_spec(ctx.calibrator).make()
        grid = probe.sensitivity_grid() if hasattr(probe, "sensitivity_grid") else {}
        if not grid:
            return [Verdict(audit=self.name, claim=self.claim, cell=cell, status=Status.SKIP,
                            reason="the calibrator exposes no sensitivity_grid(), so there is "
                                   "no bandwidth to vary")]
        settings = [(name, value) for name, values in grid.items() for value in values]
        rows = []
        baseline: dict[str, str] = {}
        for setting in [None, *settings]:
            statuses = {}
            for audit in self.audits():
                for verdict in audit.evaluate(ctx, audit.cells(ctx), setting):
                    statuses[f"{verdict.audit}[{verdict.cell['feature']}]"] = verdict.status.value
            if setting is None:
                baseline = statuses
                continue
            flips = sorted(k for k, v in statuses.items() if v != baseline.get(k))
            rows.append({"setting": f"{setting[0]}={setting[1]}", "statuses": statuses,
                         "flips": flips})
        flipped = [r for r in rows if r["flips"]]
        threshold = {"grid": [f"{n}={v}" for n, v in settings], "rule": "no pass/fail flips"}
        base = ", ".join(f"{k} {v}" for k, v in baseline.items())
        if flipped:
            detail = "; ".join(f"{r['setting']}: {', '.join(r['flips'])} flip" for r in flipped)
            return [Verdict(audit=self.name, claim=self.claim, cell=cell, status=Status.FAIL,
                            effect=float(len(flipped)), threshold=threshold, per_seed=rows,
                            statistic="settings with a flipped verdict",
                            reason=f"verdicts depend on the bandwidth (as registered: {base}); "
                                   f"{detail}")]
        return [Verdict(audit=self.name, claim=self.claim, cell=cell, status=Status.PASS,
                        effect=0.0, threshold=threshold, per_seed=rows,
                        statistic="settings with a flipped verdict",
                        reason=f"no verdict flips across {len(rows)} settings ({base})")]


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [BandwidthSensitivityAudit()]
