"""Audit: routing mass indicates causal importance (docs/methods.md §3.4).

A *slice* is (sublayer type × depth band × source family). For each slice the family's
sources are masked at the slice's routing sites (logits −∞ before the softmax, so the other
sources are renormalised; ``--no-renormalize`` zeroes the weights instead) through the
adapter's ``intervene``, and the evaluation examples are scored again. The causal effect is
ΔNLL = mean NLL(ablated) − mean NLL(clean) on the same examples, with a bootstrap CI (over
sequences for token-level traces that carry a ``group``); Δaccuracy and ΔECE15 are reported
too. Routing mass is the family's mean routing weight over the same sites.

Per sublayer type, the claim "routing mass indicates causal importance" fails when the
largest-mass slice is not the largest-effect slice, or when a slice holding appreciable mass
(``--mass-min``, default 0.10) has an effect whose CI includes 0. Sites where the family is
the only valid source cannot be ablated and are left out of that slice (and said so).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np

import routeaudit.metrics as metrics
from routeaudit.audit import AuditContext, BaseAudit
from routeaudit.hookspecs import hookimpl
from routeaudit.model.intervention import RoutingIntervention
from routeaudit.stats import cluster_bootstrap_mean
from routeaudit.traces import TraceSet
from routeaudit.verdict import Status, Verdict

#: Defaults of ``--mass-min`` and ``--depth-bands``.
MASS_MIN = 0.10
DEPTH_BANDS = 2


@dataclass(frozen=True)
class Slice:
    sublayer: str
    band: str
    family: str
    sites: tuple[int, ...]  # routing layers that can be ablated
    skipped_sites: int  # sites where the family is the only valid source

    @property
    def name(self) -> str:
        return f"{self.sublayer}/{self.band}/{self.family}"


def depth_bands(depths: list[int], n_bands: int) -> dict[int, str]:
    """Contiguous, equal-size bands of the distinct transformer depths: early / late by
    default (n_bands = 2), band0..band{n-1} otherwise."""
    distinct = sorted(set(depths))
    n_bands = max(1, min(int(n_bands), len(distinct)))
    names = {1: ["all"], 2: ["early", "late"]}.get(n_bands, [f"band{i}" for i in range(n_bands)])
    return {d: names[min(n_bands - 1, (i * n_bands) // len(distinct))]
            for i, d in enumerate(distinct)}


def slices(traces: TraceSet, n_bands: int = 2) -> list[Slice]:
    """Every ablatable (sublayer type, band, family) of a model, from its trace metadata."""
    meta = traces.meta
    n_layers = traces.n_layers
    types = meta.layer_types or ["all"] * n_layers
    depth = meta.layer_depth or list(range(n_layers))
    families = meta.source_families or {}
    valid = traces.source_mask
    out = []
    for sublayer in dict.fromkeys(types):
        layers = [layer for layer in range(n_layers) if types[layer] == sublayer]
        bands = depth_bands([depth[layer] for layer in layers], n_bands)
        for band in dict.fromkeys(bands.values()):
            in_band = [layer for layer in layers if bands[depth[layer]] == band]
            for family, columns in families.items():
                cols = np.zeros(traces.n_sources, dtype=bool)
                cols[list(columns)] = True
                present = [layer for layer in in_band if (valid[layer] & cols).any()]
                ablatable = tuple(layer for layer in present if (valid[layer] & ~cols).any())
                if ablatable:
                    out.append(Slice(sublayer, band, family, ablatable,
                                     len(present) - len(ablatable)))
    return out


per_example_nll = metrics.per_example_nll  # kept importable from here


class CausalAblationAudit(BaseAudit):
    name = "causal_ablation"
    claim = "Routing mass indicates causal importance: the slice with the most routing mass " \
            "has the largest effect, and every slice with appreciable mass has an effect."
    needs = frozenset({"traces", "model"})
    min_examples = 10

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        types = ctx.seeds[0].traces.meta.layer_types or ["all"]
        return [{"sublayer": t} for t in dict.fromkeys(types)]

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        s = ctx.settings
        traces = ctx.seeds[0].traces
        renormalize = not ctx.option("no_renormalize", False)
        mass_min = float(ctx.option("mass_min", MASS_MIN))
        wanted = {cell["sublayer"] for cell in cells}
        chosen = [sl for sl in slices(traces, int(ctx.option("depth_bands", DEPTH_BANDS)))
                  if sl.sublayer in wanted]
        labels = traces.labels
        clean_nll = per_example_nll(traces.logits, labels)
        conf, correct = metrics.confidence_and_correct(traces.logits, labels)
        clean_ece = metrics.ece(conf, correct, 15)
        groups = traces.group if traces.meta.per_token else None
        alpha = np.where(traces.source_mask[None], traces.routing.astype(np.float64), 0.0)
        rows: dict[str, list[dict[str, Any]]] = {t: [] for t in wanted}
        for sl in chosen:
            columns = list(traces.meta.source_families[sl.family])
            mass = float(alpha[:, list(sl.sites)][:, :, columns].sum(axis=2).mean())
            iv = RoutingIntervention(kind="mask", layers=sl.sites, family=sl.family,
                                     renormalize=renormalize, label=sl.name)
            ablated = ctx.forward(iv)
            if not np.array_equal(np.asarray(ablated["labels"]), labels):
                raise RuntimeError("the ablated pass returned examples in another order")
            logits = np.asarray(ablated["logits"])
            delta, (lo, hi), _ = cluster_bootstrap_mean(
                per_example_nll(logits, labels) - clean_nll, n_boot=s.n_bootstrap,
                groups=groups, level=1 - s.alpha, rng=ctx.rng(self.name, sl.name, 0))
            a_conf, a_correct = metrics.confidence_and_correct(logits, labels)
            rows[sl.sublayer].append({
                "slice": sl.name, "mass": mass, "delta_nll": delta, "ci": [lo, hi],
                "delta_accuracy": float(a_correct.mean() - correct.mean()),
                "delta_ece15": float(metrics.ece(a_conf, a_correct, 15) - clean_ece),
                "sites": len(sl.sites), "unablatable_sites": sl.skipped_sites})
        return [self._verdict(ctx, cell, rows[cell["sublayer"]], mass_min, renormalize)
                for cell in cells]

    def _verdict(self, ctx: AuditContext, cell: dict[str, Any], rows: list[dict[str, Any]],
                 mass_min: float, renormalize: bool) -> Verdict:
        common = dict(per_seed=rows,
                      statistic="ΔNLL of the largest-mass slice minus the largest ΔNLL",
                      threshold={"mass_min": mass_min, "level": 1 - ctx.settings.alpha,
                                 "ablation": "mask + renormalize" if renormalize else
                                 "mask without renormalization"})
        if len(rows) < 2:
            return ctx.verdict(self, cell, Status.INCONCLUSIVE, (
                f"{len(rows)} ablatable slice(s) for sublayer {cell['sublayer']!r}: nothing to "
                "rank (the traces need layer_types, layer_depth and source_families)"), **common)
        top_mass = max(rows, key=lambda r: r["mass"])
        top_effect = max(rows, key=lambda r: r["delta_nll"])
        silent = [r for r in rows if r["mass"] >= mass_min and r["ci"][0] <= 0 <= r["ci"][1]]
        table = "; ".join(f"{r['slice']} mass {r['mass']:.3f} ΔNLL {r['delta_nll']:+.4f} "
                          f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]" for r in rows)
        problems = []
        if top_mass is not top_effect:
            problems.append(f"the largest-mass slice {top_mass['slice']} (mass "
                            f"{top_mass['mass']:.3f}, ΔNLL {top_mass['delta_nll']:+.4f}) is not "
                            f"the largest-effect slice {top_effect['slice']} (mass "
                            f"{top_effect['mass']:.3f}, ΔNLL {top_effect['delta_nll']:+.4f})")
        for r in silent:
            problems.append(f"{r['slice']} holds mass {r['mass']:.3f} ≥ {mass_min:g} but its "
                            f"ΔNLL {r['delta_nll']:+.4f} [{r['ci'][0]:+.4f}, "
                            f"{r['ci'][1]:+.4f}] includes 0")
        effect = top_mass["delta_nll"] - top_effect["delta_nll"]
        if problems:
            return ctx.verdict(self, cell, Status.FAIL,
                               "mass and effect dissociate: " + "; ".join(problems)
                               + f" (slices: {table})", effect=effect, **common)
        return ctx.verdict(self, cell, Status.PASS, effect=effect, reason=(
            f"the largest-mass slice {top_mass['slice']} (mass {top_mass['mass']:.3f}) has the "
            f"largest effect (ΔNLL {top_mass['delta_nll']:+.4f}) and every slice with mass ≥ "
            f"{mass_min:g} has an effect (slices: {table})"), **common)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text}")
    return value


@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    group = parser.getgroup("causal_ablation")
    group.add_argument("--mass-min", type=float, default=MASS_MIN, metavar="M",
                       help=f"a slice holding routing mass >= M must have an effect ({MASS_MIN:g})")
    group.add_argument("--depth-bands", type=_positive_int, default=DEPTH_BANDS, metavar="N",
                       help=f"depth bands per sublayer type ({DEPTH_BANDS}: early/late)")
    group.add_argument("--no-renormalize", action="store_true",
                       help="zero the masked weights instead of renormalizing the rest")


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [CausalAblationAudit()]
