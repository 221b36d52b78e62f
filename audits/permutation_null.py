"""Audit: the within-confidence-bin routing-permutation null (methods.md §2.5).

Claim per routing summary S: "S carries calibration signal beyond confidence", i.e. the
conditional null Y ⟂ S | C is rejected. T is the weighted gap of §2.4; its null distribution
comes from permuting S within each confidence bin, which keeps confidence, correctness and
every stratum size and only breaks the routing ↔ correctness link at matched confidence.
p-values are Holm-corrected across the summaries tested, separately in each seed, and the
claim passes only if it is rejected in every seed (``--stability majority`` relaxes this).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.audit import AuditContext
from routeaudit.hookspecs import hookimpl
from routeaudit.matched import matched_cell, stable
from routeaudit.stats import holm, within_bin_permutation_test
from routeaudit.verdict import Status, Verdict


class PermutationNullAudit:
    name = "permutation_null"
    claim = "The routing summary carries calibration signal beyond confidence."
    needs = frozenset({"traces"})
    min_examples = 100
    routing_aware = True

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        return ctx.summary_cells()

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        s = ctx.settings
        # results[cell][seed] = (PermutationResult | None, no-variation reason | None)
        results: list[list[tuple[Any, str | None]]] = []
        for cell in cells:
            row = []
            for seed in ctx.seeds:
                prepared = matched_cell(seed, cell["summary"], s)
                if prepared.no_variation:
                    row.append((None, prepared.no_variation))
                    continue
                result = within_bin_permutation_test(
                    prepared.bin_idx, prepared.strata, prepared.residual,
                    n_bins=prepared.n_bins, n_strata=prepared.n_strata,
                    n_permutations=s.n_permutations, min_count=s.min_count,
                    rng=ctx.rng(self.name, cell["summary"], seed.seed),
                    sequential_h=s.sequential_h, device=s.device)
                row.append((result, None))
            results.append(row)
        raw = np.array([[r.p_value if r is not None and np.isfinite(r.statistic) else np.nan
                         for r, _ in row] for row in results], dtype=float).reshape(len(cells), -1)
        corrected = np.column_stack([holm(raw[:, j]) for j in range(raw.shape[1])]) \
            if raw.size else raw
        return [self._verdict(ctx, cell, results[i], raw[i], corrected[i])
                for i, cell in enumerate(cells)]

    def _verdict(self, ctx: AuditContext, cell: dict[str, Any], row: list[tuple[Any, str | None]],
                 raw: np.ndarray, corrected: np.ndarray) -> Verdict:
        s = ctx.settings
        per_seed = []
        for seed, (result, why), p, pc in zip(ctx.seeds, row, raw, corrected, strict=True):
            entry: dict[str, Any] = {"seed": seed.seed}
            if result is None:
                entry["reason"] = why
            else:
                entry.update(statistic=result.statistic, null_mean=result.null_mean,
                             null_sd=result.null_sd, p_value=float(p), p_value_corrected=float(pc),
                             n_permutations=result.n_permutations,
                             stopped_early=result.stopped_early,
                             rejects=bool(pc <= s.alpha))
            per_seed.append(entry)
        common = dict(audit=self.name, claim=self.claim, cell=cell,
                      statistic="weighted gap minus its within-bin null mean",
                      threshold={"alpha": s.alpha, "correction": "holm across summaries",
                                 "stability": s.stability, "permutations": s.n_permutations},
                      per_seed=per_seed)
        frozen = [why for result, why in row if result is None]
        if frozen:
            return Verdict(status=Status.FAIL, reason=frozen[0], **common)
        if not np.isfinite(raw).all():
            return Verdict(status=Status.INCONCLUSIVE, reason=(
                f"too little data: no confidence bin has ≥ 2 strata with ≥ {s.min_count} "
                "examples in some seed"), **common)
        excess = [r.statistic - r.null_mean for r, _ in row]
        rejects = [bool(pc <= s.alpha) for pc in corrected]
        reducer = np.max if s.stability == "all" else np.median
        p_raw, p_corr = float(reducer(raw)), float(reducer(corrected))
        n_rej = sum(rejects)
        passed = stable(rejects, s.stability)
        ps = ", ".join(f"{p:.3g}" for p in corrected)
        need = "every seed" if s.stability == "all" else "a majority of seeds"
        if passed:
            reason = (f"rejects the within-bin null in {n_rej}/{len(rejects)} seeds "
                      f"(Holm p: {ps} ≤ {s.alpha}); mean excess gap {np.mean(excess):.4f}")
        else:
            reason = (f"rejects in only {n_rej}/{len(rejects)} seeds (Holm p: {ps}; "
                      f"needs ≤ {s.alpha} in {need}): no stable signal beyond confidence")
        return Verdict(status=Status.PASS if passed else Status.FAIL, effect=float(np.mean(excess)),
                       p_value=p_raw, p_value_corrected=p_corr, reason=reason, **common)


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [PermutationNullAudit()]
