"""The shape shared by the calibrator audits: "the candidate beats these controls".

``capacity_control``, ``shuffled_profile`` and ``baseline_gain`` differ only in which controls
a cell compares against; the fitting, the paired bootstrap, the decision rule and the wording
of the verdict live here (and in :mod:`routeaudit.calibration`), once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.audit import AuditContext, BaseAudit
from routeaudit.calibration.decision import gain_checks
from routeaudit.calibration.reasons import describe, label
from routeaudit.calibration.scores import HEADLINE
from routeaudit.calibration.study import Setting, Study, resolve_spec, routing_features, study
from routeaudit.verdict import Status, Verdict


class GainAudit(BaseAudit):
    """Base class: subclasses set ``name``, ``claim``, ``kinds`` and ``per_feature``."""

    name = "gain"
    claim = ""
    needs = frozenset({"traces", "calibrator"})
    min_examples = 200
    routing_aware = True
    #: Control variants each cell is compared against.
    kinds: tuple[str, ...] = ()
    #: One cell per routing feature (twins replace that feature) or one for all of them.
    per_feature = True

    @property
    def control_kinds(self) -> tuple[str, ...]:
        """The variants this audit needs fitted (the runner fits the union once)."""
        return self.kinds

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        spec = resolve_spec(ctx.calibrator)
        feats = routing_features(ctx)
        if not feats:
            return [{"calibrator": spec.name, "feature": "none"}]
        if self.per_feature:
            return [{"calibrator": spec.name, "feature": f} for f in feats]
        return [{"calibrator": spec.name, "feature": "+".join(feats)}]

    def controls_of(self, cell: dict[str, Any]) -> list[str]:
        if self.per_feature:
            return [f"{kind}:{cell['feature']}" for kind in self.kinds]
        return list(self.kinds)

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        return self.evaluate(ctx, cells, None)

    def evaluate(self, ctx: AuditContext, cells: list[dict[str, Any]], setting: Setting
                 ) -> list[Verdict]:
        """Verdicts of the given cells with the calibrator at ``setting`` (None: as given)."""
        s = ctx.settings
        if any(cell["feature"] == "none" for cell in cells):
            return [ctx.verdict(self, cell, Status.SKIP,
                                "the calibrator declares no routing feature, so there is "
                                "no routing-specific gain to audit") for cell in cells]
        st = study(ctx, setting)
        pairs = [(cell, control) for cell in cells for control in self.controls_of(cell)]
        checks = gain_checks(st, [control for _, control in pairs], s.alpha)
        by_cell: dict[int, list[Any]] = {}
        for (cell, _), check in zip(pairs, checks, strict=True):
            by_cell.setdefault(id(cell), []).append(check)
        return [self._verdict(ctx, st, cell, by_cell[id(cell)]) for cell in cells]

    def _verdict(self, ctx: AuditContext, st: Study, cell: dict[str, Any], checks: list[Any]
                 ) -> Verdict:
        s = ctx.settings
        decisions = [c.decide(s.alpha, s.stability) for c in checks]
        # the strongest control: the one the candidate beats by the least
        weakest = int(np.argmin([c.mean_gain for c in checks]))
        passed = all(d["passed"] for d in decisions)
        failing = [i for i, d in enumerate(decisions) if not d["passed"]]
        # detail the control that matters most (the least-beaten failing one, or the
        # strongest control when all are beaten); name the other failures
        lead = min(failing, key=lambda i: checks[i].mean_gain) if failing else weakest
        reason = describe(checks[lead], decisions[lead], label(checks[lead].control))
        others = [checks[i].control for i in failing if i != lead]
        if others:
            reason += f"; also not beaten: {', '.join(others)}"
        strongest = checks[weakest]
        per_seed = []
        for j, seed in enumerate(st.seeds):
            entry: dict[str, Any] = {"seed": seed.seed, "tertile_summary": st.tertile_summary}
            entry["metrics"] = {key: seed.metrics[key] for key in
                                ("raw", "candidate", *[c.control for c in checks])}
            entry["n_parameters"] = {key: seed.n_parameters.get(key) for key in entry["metrics"]}
            entry["gains"] = {c.control: {"gain": c.gains[j], "ci": list(c.cis[j]),
                                          "p_value": c.p_raw[j],
                                          "p_value_corrected": c.p_corrected[j]}
                              for c in checks}
            per_seed.append(entry)
        return ctx.verdict(
            self, cell, Status.PASS if passed else Status.FAIL, reason,
            statistic=f"{HEADLINE}(strongest control) − {HEADLINE}(candidate)",
            effect=strongest.mean_gain,
            ci=(min(lo for lo, _ in strongest.cis), max(hi for _, hi in strongest.cis)),
            p_value=float(np.max(strongest.p_raw)),
            p_value_corrected=float(np.max(strongest.p_corrected)),
            threshold={"metric": HEADLINE, "alpha": s.alpha, "stability": s.stability,
                       "correction": "holm across the audit's comparisons, per seed",
                       "band": "mean gain > sd across seeds of the control",
                       "controls": [c.control for c in checks],
                       "setting": None if st.setting is None else list(st.setting)},
            per_seed=per_seed)
