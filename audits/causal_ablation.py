"""Audit: routing mass indicates causal importance (docs/methods.md §3.4, §5.2).

A *slice* is (sublayer type × depth band × source family). For each slice the family's
sources are masked at the slice's routing sites (logits −∞ before the softmax, so the other
sources are renormalised; ``--no-renormalize`` zeroes the weights instead) through the
adapter's ``intervene``, and the evaluation examples are scored again. The per-example effect
is d_i = NLL_i(ablated) − NLL_i(clean); the slice's ΔNLL is their mean, with a bootstrap
variance (over sequences for token-level traces that carry a ``group``); Δaccuracy and
ΔECE15 are reported too. Routing mass is the family's mean routing weight over the same sites.

Per sublayer type the claim is "the slice with the most routing mass has the largest effect,
and every slice with appreciable mass (``--mass-min``, default 0.10) has an effect". Every
slice is scored on the same examples, so the top-mass slice m and another slice k are
compared by the *paired* difference D_k = mean_i(d_m,i − d_k,i), bootstrapped as one vector
(:func:`decide_slices`). One-sided tests at α decide (docs/methods.md §5.2):

* ``pass``: every D_k is shown > 0 and every appreciable-mass slice's ΔNLL is shown > 0
  (an intersection-union test: each at α, no correction needed for the conjunction);
* ``fail``: a contradiction is shown: some D_k is shown < 0 (another slice's effect is
  larger), or an appreciable-mass slice's ΔNLL is shown below ``--nll-margin`` (0.01 nats);
  Holm across all these tests;
* ``inconclusive`` otherwise, with about how much more evaluation data would decide.

The intervals reported are the matching 1 − 2α ones. Slices whose mass is within 0.0005 of
the largest (equal to 3 decimals) all count as top-mass: each is compared with every slice
outside the tie, not with each other, and the reason says so. Sites where the family is the only valid
source cannot be ablated and are left out of that slice (and said so). Fewer than two
ablatable slices: ``inconclusive``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import routeaudit.metrics as metrics
import routeaudit.optiontypes as optiontypes
from routeaudit.audit import AuditContext, BaseAudit
from routeaudit.hookspecs import hookimpl
from routeaudit.model.intervention import RoutingIntervention
from routeaudit.stats import cluster_bootstrap_mean, holm
from routeaudit.stats.evidence import Evidence, p_text, pool_seeds, scale_text
from routeaudit.traces import TraceSet
from routeaudit.verdict import Status, Verdict

#: Defaults of ``--mass-min``, ``--nll-margin`` and ``--depth-bands``.
MASS_MIN = 0.10
NLL_MARGIN = 0.01
DEPTH_BANDS = 2
#: Masses closer than this to the largest are tied with it (equal to 3 decimals).
MASS_TIE = 5e-4


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

#: The decision rule, as the verdict's threshold records it.
RULE = ("pass: the top-mass slice's ΔNLL is shown larger than every other slice's (paired "
        "difference > 0, one-sided at alpha each: an intersection-union test) and every slice "
        "with mass >= mass_min has a ΔNLL shown > 0; fail: another slice's ΔNLL is shown larger "
        "than the top-mass slice's, or an appreciable-mass slice's ΔNLL is shown below "
        "nll_margin (one-sided at alpha, Holm across all these tests); inconclusive otherwise")


@dataclass(frozen=True)
class SliceDecision:
    """What :func:`decide_slices` found: the outcome, its reason and the numbers behind it."""

    status: Status
    reason: str
    rows: list[dict[str, Any]]
    """One row per slice, in input order (mass, ΔNLL and its interval, the paired difference
    to the top-mass slice and its interval, the one-sided p-values)."""
    evidence: dict[str, Any]
    effect: float
    """D for the closest competitor: ΔNLL(top-mass slice) − ΔNLL(slice k), smallest over k."""
    ci: tuple[float, float]
    p_value: float
    p_value_corrected: float


def _seed_of(rng: np.random.Generator | int) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**63 - 1))
    return int(rng)


def _bootstrap_evidence(values: np.ndarray, n_boot: int, seed: int,
                        groups: np.ndarray | None) -> Evidence:
    """Mean of per-example values and its bootstrap variance (var of the replicates), as a
    one-"seed" :class:`Evidence`. Every call with the same seed resamples the same examples
    (or groups), so the bootstraps of the slices and of their differences are paired."""
    mean, _, reps = cluster_bootstrap_mean(values, n_boot=n_boot, groups=groups,
                                           rng=np.random.Generator(np.random.PCG64(seed)))
    return pool_seeds([mean], [float(np.var(reps, ddof=1))])


def decide_slices(names: Sequence[str], masses: Sequence[float], deltas: Sequence[np.ndarray],
                  *, mass_min: float = MASS_MIN, nll_margin: float = NLL_MARGIN,
                  alpha: float = 0.05, n_boot: int = 1000,
                  rng: np.random.Generator | int = 0, groups: np.ndarray | None = None
                  ) -> SliceDecision:
    """Decide "the top-mass slice has the largest effect, and every slice with mass ≥
    ``mass_min`` has an effect" from the per-example ΔNLL vectors ``deltas`` (one per slice,
    the same examples in the same order for every slice; ``groups``: the resampling unit of
    each example, e.g. its sequence). See the module docstring for the rule.

    Slices whose mass is within :data:`MASS_TIE` of the largest (equal to 3 decimals) all
    count as top-mass: each of them is compared with every slice outside that group, and
    the reason says so. Tied slices are not compared with each other (the masses do not
    order them)."""
    names = [str(n) for n in names]
    mass = [float(m) for m in masses]
    d = [np.asarray(v, dtype=np.float64).reshape(-1) for v in deltas]
    k_all = len(names)
    if k_all < 2 or len(mass) != k_all or len(d) != k_all:
        raise ValueError(f"need >= 2 slices with one mass and one ΔNLL vector each, got "
                         f"{k_all} names, {len(mass)} masses, {len(d)} vectors")
    if len({v.size for v in d}) != 1:
        raise ValueError("every slice must be scored on the same examples")
    if int(n_boot) < 2:
        raise ValueError(f"need >= 2 bootstrap replicates, got {n_boot}")
    n_eval = int(d[0].size)
    seed = _seed_of(rng)
    level = f"{100 * (1 - 2 * alpha):g}%"

    effects = [_bootstrap_evidence(v, n_boot, seed, groups) for v in d]
    top = int(np.argmax(mass))  # the first of equal masses
    tied = [k for k in range(k_all) if mass[top] - mass[k] < MASS_TIE]
    others = [k for k in range(k_all) if k not in tied]
    pairs = [(t, k) for t in tied for k in others]
    paired = {(t, k): _bootstrap_evidence(d[t] - d[k], n_boot, seed, groups) for t, k in pairs}
    appreciable = [k for k in range(k_all) if mass[k] >= mass_min]

    # pass: every component shown (intersection-union: the largest p is the test's p)
    pass_p = [paired[pair].p_positive() for pair in pairs] + \
        [effects[j].p_positive() for j in appreciable]
    p_pass = max(pass_p) if pairs else float("nan")
    # fail: any contradiction shown, Holm across every one-sided test of one
    fail_raw = [paired[pair].p_below(0.0) for pair in pairs] + \
        [effects[j].p_below(nll_margin) for j in appreciable]
    fail_holm = [float(p) for p in holm(fail_raw)] if fail_raw else []
    holm_paired = dict(zip(pairs, fail_holm[:len(pairs)], strict=True))
    holm_nll = dict(zip(appreciable, fail_holm[len(pairs):], strict=True))
    larger = [pair for pair in pairs if holm_paired[pair] <= alpha]
    below = [j for j in appreciable if holm_nll[j] <= alpha]
    closest = min(pairs, key=lambda pair: paired[pair].estimate) if pairs else None

    def iv(ev: Evidence) -> str:
        lo, hi = ev.interval(alpha)
        return f"{level} interval [{lo:+.4f}, {hi:+.4f}]"

    rows = []
    for k in range(k_all):
        ev = effects[k]
        row: dict[str, Any] = {
            "slice": names[k], "mass": mass[k], "delta_nll": ev.estimate,
            "ci": list(ev.interval(alpha)), "interval_level": 1 - 2 * alpha, "se": ev.se,
            "top_mass": k in tied, "appreciable": k in appreciable,
            "p_positive": ev.p_positive(), "p_below_margin": ev.p_below(nll_margin),
            "p_below_margin_holm": holm_nll.get(k), "paired_difference": None,
            "paired_interval": None, "paired_se": None, "paired_p_positive": None,
            "paired_p_negative": None, "paired_p_negative_holm": None}
        if k in others:  # the paired difference ΔNLL(top-mass slice) − ΔNLL(this slice)
            pe = paired[(top, k)]
            row.update(paired_difference=pe.estimate, paired_interval=list(pe.interval(alpha)),
                       paired_se=pe.se, paired_p_positive=pe.p_positive(),
                       paired_p_negative=pe.p_below(0.0),
                       paired_p_negative_holm=holm_paired[(top, k)])
            if len(tied) > 1:
                row["paired_to"] = {names[t]: {"difference": paired[(t, k)].estimate,
                                               "interval": list(paired[(t, k)].interval(alpha)),
                                               "holm_p_negative": holm_paired[(t, k)]}
                                    for t in tied}
        rows.append(row)

    table = "; ".join(f"{names[k]} mass {mass[k]:.3f} ΔNLL {effects[k].estimate:+.4f} "
                      f"[{effects[k].interval(alpha)[0]:+.4f}, "
                      f"{effects[k].interval(alpha)[1]:+.4f}]" for k in range(k_all))
    tail = f" (slices, ΔNLL with {level} intervals: {table})"
    if len(tied) > 1:
        tail += ("; note: the top masses are equal to 3 decimals ("
                 + ", ".join(f"{names[t]} {mass[t]:.5f}" for t in tied)
                 + "), so all of these count as top-mass slices: each is compared with every "
                 "other slice, not with each other")
    top_text = " and ".join(names[t] for t in tied)

    def vs(t: int, k: int) -> str:
        return (f"the top-mass slice {names[t]} (mass {mass[t]:.3f}) and slice {names[k]} "
                f"(mass {mass[k]:.3f}) have ΔNLL {effects[t].estimate:+.4f} and "
                f"{effects[k].estimate:+.4f}, paired difference {paired[(t, k)].estimate:+.4f}, "
                f"{iv(paired[(t, k)])}")

    if larger or below:
        status = Status.FAIL
        problems = [f"slice {names[k]} has a larger effect: {vs(t, k)} "
                    f"(Holm p {p_text(holm_paired[(t, k)])})" for t, k in larger]
        problems += [
            f"{names[j]} holds mass {mass[j]:.3f} ≥ {mass_min:g} but its ΔNLL "
            f"{effects[j].estimate:+.4f}, {iv(effects[j])}, is shown below the margin "
            f"{nll_margin:g} nats (Holm p {p_text(holm_nll[j])})" for j in below]
        reason = "mass and effect dissociate: " + "; ".join(problems) + tail
        p_value, p_corrected = min(fail_raw), min(fail_holm)
    elif closest is not None and p_pass <= alpha:
        status = Status.PASS
        t, k = closest
        if appreciable:
            weakest = min(appreciable, key=lambda j: effects[j].estimate)
            every = (f"every slice with mass ≥ {mass_min:g} has an effect (smallest: "
                     f"{names[weakest]} ΔNLL {effects[weakest].estimate:+.4f}, "
                     f"{iv(effects[weakest])})")
        else:
            every = f"no slice holds mass ≥ {mass_min:g}"
        who = (f"the top-mass slice {top_text} (mass {mass[top]:.3f}, ΔNLL "
               f"{effects[top].estimate:+.4f}) has" if len(tied) == 1 else
               f"the top-mass slices {top_text} (mass {mass[top]:.3f}) have")
        reason = (f"{who} the largest effect: the paired ΔNLL "
                  f"difference to every other slice is shown > 0 (closest: {names[t]} − "
                  f"{names[k]} {paired[closest].estimate:+.4f}, {iv(paired[closest])}; "
                  f"intersection-union p {p_text(p_pass)}), and " + every + tail)
        p_value = p_corrected = p_pass
    else:
        status = Status.INCONCLUSIVE
        items, more = [], []
        if not pairs:
            items.append(f"all {k_all} slices hold the same mass to 3 decimals "
                         f"({mass[top]:.3f}): the masses do not rank them")
        for t, k in pairs:
            pe = paired[(t, k)]
            if pe.p_positive() > alpha:
                items.append(f"{vs(t, k)}: not separated (p {p_text(pe.p_positive())} for > 0, "
                             f"Holm p {p_text(holm_paired[(t, k)])} for < 0)")
                text = scale_text(pe, 0.0, alpha, n_eval,
                                  goals=(f"show {names[t]}'s effect larger",
                                         f"show {names[k]}'s effect larger"))
                more.append(f"{names[t]} vs {names[k]}: {text}")
        for j in appreciable:
            ev = effects[j]
            if ev.p_positive() > alpha:
                items.append(f"{names[j]} holds mass {mass[j]:.3f} ≥ {mass_min:g} but its ΔNLL "
                             f"{ev.estimate:+.4f}, {iv(ev)}, is shown neither > 0 (p "
                             f"{p_text(ev.p_positive())}) nor below the margin {nll_margin:g} "
                             f"(Holm p {p_text(holm_nll[j])})")
                more.append(f"ΔNLL of {names[j]}: {scale_text(ev, nll_margin, alpha, n_eval)}")
        reason = "not decided: " + "; ".join(items)
        if more:
            reason += "; more data: " + "; ".join(more)
        reason += tail
        p_value = p_corrected = p_pass

    headline = paired[closest] if closest is not None else effects[top]
    evidence = {**headline.as_dict(0.0 if closest is not None else nll_margin, alpha),
                "compared": (f"{names[closest[0]]} − {names[closest[1]]}" if closest is not None
                             else f"ΔNLL of {names[top]}"),
                "top_mass_slices": [names[t] for t in tied], "p_pass_iut": p_pass,
                "p_fail_holm": min(fail_holm) if fail_holm else float("nan"), "n_eval": n_eval,
                "paired": {f"{names[t]} − {names[k]}": paired[(t, k)].as_dict(0.0, alpha)
                           for t, k in pairs},
                "delta_nll": {names[k]: effects[k].as_dict(nll_margin, alpha)
                              for k in range(k_all)}}
    return SliceDecision(status, reason, rows, evidence, headline.estimate,
                         headline.interval(alpha), float(p_value), float(p_corrected))


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
        traces = ctx.seeds[0].traces
        renormalize = not ctx.option("no_renormalize", False)
        wanted = {cell["sublayer"] for cell in cells}
        chosen = [sl for sl in slices(traces, int(ctx.option("depth_bands", DEPTH_BANDS)))
                  if sl.sublayer in wanted]
        labels = traces.labels
        clean_nll = per_example_nll(traces.logits, labels)
        conf, correct = metrics.confidence_and_correct(traces.logits, labels)
        clean_ece = metrics.ece(conf, correct, 15)
        alpha = np.where(traces.source_mask[None], traces.routing.astype(np.float64), 0.0)
        rows: dict[str, list[dict[str, Any]]] = {t: [] for t in wanted}
        deltas: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
        for sl in chosen:
            columns = list(traces.meta.source_families[sl.family])
            mass = float(alpha[:, list(sl.sites)][:, :, columns].sum(axis=2).mean())
            iv = RoutingIntervention(kind="mask", layers=sl.sites, family=sl.family,
                                     renormalize=renormalize, label=sl.name)
            ablated = ctx.forward(iv)
            if not np.array_equal(np.asarray(ablated["labels"]), labels):
                raise RuntimeError("the ablated pass returned examples in another order")
            logits = np.asarray(ablated["logits"])
            a_conf, a_correct = metrics.confidence_and_correct(logits, labels)
            deltas[sl.sublayer].append(per_example_nll(logits, labels) - clean_nll)
            rows[sl.sublayer].append({
                "slice": sl.name, "mass": mass,
                "delta_accuracy": float(a_correct.mean() - correct.mean()),
                "delta_ece15": float(metrics.ece(a_conf, a_correct, 15) - clean_ece),
                "sites": len(sl.sites), "unablatable_sites": sl.skipped_sites})
        return [self._verdict(ctx, cell, rows[cell["sublayer"]], deltas[cell["sublayer"]],
                              renormalize) for cell in cells]

    def _verdict(self, ctx: AuditContext, cell: dict[str, Any], rows: list[dict[str, Any]],
                 deltas: list[np.ndarray], renormalize: bool) -> Verdict:
        s = ctx.settings
        traces = ctx.seeds[0].traces
        mass_min = float(ctx.option("mass_min", MASS_MIN))
        nll_margin = float(ctx.option("nll_margin", NLL_MARGIN))
        threshold = {"alpha": s.alpha, "mass_min": mass_min, "nll_margin": nll_margin,
                     "interval_level": 1 - 2 * s.alpha, "rule": RULE,
                     "correction": "pass: intersection-union (none needed); fail: Holm across "
                                   "the paired comparisons and the appreciable-mass slices",
                     "ablation": "mask + renormalize" if renormalize else
                     "mask without renormalization"}
        statistic = ("paired ΔNLL difference: the top-mass slice minus its closest competitor "
                     "(smallest over the other slices)")
        if len(rows) < 2:
            return ctx.verdict(self, cell, Status.INCONCLUSIVE, (
                f"{len(rows)} ablatable slice(s) for sublayer {cell['sublayer']!r}: nothing to "
                "rank (the traces need layer_types, layer_depth and source_families)"),
                per_seed=rows, statistic=statistic, threshold=threshold)
        groups = traces.group if traces.meta.per_token else None
        decision = decide_slices(
            [r["slice"] for r in rows], [r["mass"] for r in rows], deltas, mass_min=mass_min,
            nll_margin=nll_margin, alpha=s.alpha, n_boot=s.n_bootstrap,
            rng=ctx.rng(self.name, cell["sublayer"], 0), groups=groups)
        per_seed = [{**decided, **extra}
                    for decided, extra in zip(decision.rows, rows, strict=True)]
        return ctx.verdict(self, cell, decision.status, decision.reason, statistic=statistic,
                           effect=decision.effect, ci=decision.ci, p_value=decision.p_value,
                           p_value_corrected=decision.p_value_corrected, threshold=threshold,
                           evidence=decision.evidence, per_seed=per_seed)






@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    group = parser.getgroup("causal_ablation")
    group.add_argument("--mass-min", type=float, default=MASS_MIN, metavar="M",
                       help=f"a slice holding routing mass >= M must have an effect ({MASS_MIN:g})")
    group.add_argument("--nll-margin", type=optiontypes.non_negative, default=NLL_MARGIN, metavar="M",
                       help="an appreciable-mass slice whose ΔNLL is shown below M nats refutes "
                            f"the claim ({NLL_MARGIN:g})")
    group.add_argument("--depth-bands", type=optiontypes.positive_int, default=DEPTH_BANDS, metavar="N",
                       help=f"depth bands per sublayer type ({DEPTH_BANDS}: early/late)")
    group.add_argument("--no-renormalize", action="store_true",
                       help="zero the masked weights instead of renormalizing the rest")


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [CausalAblationAudit()]
