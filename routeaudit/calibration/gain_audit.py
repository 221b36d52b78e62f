"""The shape shared by the calibrator audits: "the candidate beats these controls".

``capacity_control``, ``shuffled_profile`` and ``baseline_gain`` differ only in which controls
a cell compares against; the fitting, the paired bootstrap, the pooled decision rule and the wording
of the verdict live here (and in :mod:`routeaudit.calibration`), once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.audit import AuditContext, BaseAudit
from routeaudit.calibration.decision import GainCheck, gain_checks
from routeaudit.calibration.reasons import describe, label
from routeaudit.calibration.scores import HEADLINE
from routeaudit.calibration.study import Setting, Study, resolve_spec, routing_features, study
from routeaudit.simulation.plan import PlantedCases, calibrator_cases
from routeaudit.stats import holm
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

    def planted_cases(self) -> PlantedCases:
        return calibrator_cases()

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
        by_cell: dict[int, list[GainCheck]] = {}
        for (cell, _), check in zip(pairs, checks, strict=True):
            by_cell.setdefault(id(cell), []).append(check)
        # pass: every control beaten (intersection-union: the largest p), Holm across cells;
        # fail: any comparison shown below the margin, Holm across all comparisons
        p_pass = [max(c.evidence.p_positive() for c in by_cell[id(cell)]) for cell in cells]
        pass_holm = dict(zip([id(c) for c in cells], holm(p_pass), strict=True))
        below = holm([c.evidence.p_below(s.gain_margin) for c in checks])
        below_holm = {id(c): float(p) for c, p in zip(checks, below, strict=True)}
        return [self._verdict(ctx, st, cell, by_cell[id(cell)], float(pass_holm[id(cell)]),
                              below_holm) for cell in cells]

    def _verdict(self, ctx: AuditContext, st: Study, cell: dict[str, Any],
                 checks: list[GainCheck], p_pass: float, below_holm: dict[int, float]
                 ) -> Verdict:
        s = ctx.settings
        n_eval = int(ctx.seeds[0].eval_index.size) if ctx.seeds else None
        refuted = [c for c in checks if below_holm[id(c)] <= s.alpha]
        stable_sign = all(c.evidence.sign_stable(s.stability) for c in checks)
        if refuted:
            status = Status.FAIL
        elif p_pass <= s.alpha and stable_sign:
            status = Status.PASS
        else:
            status = Status.INCONCLUSIVE
        # the control that matters most: a refuting one, else the least-beaten one
        pool = refuted or checks
        lead = min(pool, key=lambda c: c.evidence.estimate)
        reason = describe(lead, status.value, label(lead.control), alpha=s.alpha,
                          margin=s.gain_margin, p_positive=p_pass,
                          p_below=below_holm[id(lead)], n_eval=n_eval)
        others = [c.control for c in refuted if c is not lead]
        if others:
            reason += f"; also refuted against: {', '.join(others)}"
        per_seed = []
        for j, seed in enumerate(st.seeds):
            entry: dict[str, Any] = {"seed": seed.seed, "tertile_summary": st.tertile_summary}
            entry["metrics"] = {key: seed.metrics[key] for key in
                                ("raw", "candidate", *[c.control for c in checks])}
            entry["n_parameters"] = {key: seed.n_parameters.get(key) for key in entry["metrics"]}
            entry["gains"] = {c.control: {"gain": c.gains[j], "ci": list(c.cis[j]),
                                          "bootstrap_sd": float(np.sqrt(c.variances[j]))}
                              for c in checks}
            per_seed.append(entry)
        return ctx.verdict(
            self, cell, status, reason,
            statistic=f"{HEADLINE}(control) − {HEADLINE}(candidate), pooled over seeds",
            effect=lead.evidence.estimate, ci=lead.evidence.interval(s.alpha),
            p_value=lead.evidence.p_below(s.gain_margin) if status is Status.FAIL
            else max(c.evidence.p_positive() for c in checks),
            p_value_corrected=below_holm[id(lead)] if status is Status.FAIL else p_pass,
            threshold={"metric": HEADLINE, "alpha": s.alpha, "margin": s.gain_margin,
                       "interval_level": 1 - 2 * s.alpha, "stability": s.stability,
                       "rule": "pass: gain > 0 over every control (one-sided, Holm across "
                               "cells) and in every seed; fail: gain < margin over some "
                               "control (one-sided, Holm across comparisons)",
                       "controls": [c.control for c in checks],
                       "setting": None if st.setting is None else list(st.setting)},
            evidence={c.control: c.evidence.as_dict(s.gain_margin, s.alpha)
                      | {"p_below_margin_holm": below_holm[id(c)]} for c in checks},
            per_seed=per_seed)
