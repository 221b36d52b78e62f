"""Audit: calibrated experts, a calibrated routed aggregate, and calibration under routing
shift (docs/methods.md §4: paper 4, calibrated mixtures of experts).

Each token's *routed region* is its top-1 expert at ``meta.expert_layer`` (default: the last
routing layer). Three claims, one cell each, about the population ECE15 (15 equal-width
(lo, hi] bins, docs/methods.md §2.2) against a tolerance ``--ece-tol`` (0.02):

* ``experts``: every expert is calibrated on its routed region (each expert's own
  prediction, ``expert_logits``, on the tokens routed to it; under hard top-1 routing the
  aggregate *is* that prediction, so ``expert_logits`` are not needed);
* ``aggregate``: the routed aggregate (``logits``) is calibrated;
* ``shift``: the aggregate stays calibrated under every routing-only shift of the class:
  likelihood ratios that depend on a token only through its routed expert, at most
  ``--shift-ratio`` (5), or inside the KL ball ``--shift-kl RHO``
  (:func:`routeaudit.stats.shift.worst_case_ece`, solved exactly).

Under hard routing, calibrated experts make all three true; under soft routing the mix of
calibrated experts is typically under-confident (Wu & Gales 2021). When the target offers a
``shift`` split (``ctx.split_traces("shift")``) the claims are tested there too
(``"split": "shift"``); when a calibrator is registered, the aggregate and shift claims are
also tested on its output, fitted on each seed's calibration half (``"calibrator": NAME``).
Traces that are not a mixture of experts (no ``expert_logits``, soft routing over depth
sources: Attention Residuals) get ``skip`` rows, since the claims are not about them; a soft
MoE without ``expert_logits`` gets the aggregate and shift claims, and an ``experts`` row
saying what is missing.

**Estimation** (per seed, on its evaluation half). With S_b the residual sum Σ (c − y) of
bin b, σ_b its standard deviation (a sum over i.i.d. resampling units: tokens, or whole
sequences for token traces with a ``group``) and the noise scale s = Σ_b σ_b / N, the
plug-in U = Σ_b |S_b| / N has, in the normal approximation, E U = Σ_b σ_b f(|μ_b| / σ_b) / N
with f(x) = E|x + Z| = √(2/π) e^{−x²/2} + x·erf(x/√2), convex and increasing, x ≤ f(x) ≤
x + √(2/π). Hence:

* **pass** (ECE ≤ tol shown): over all bin means with ECE ≥ tol, E U is smallest when every
  bin has the same |μ_b| / σ_b (the Lagrange condition of a convex objective under a linear
  constraint), where it equals ``s·f(tol / s)``. So U below that, by z_{1−α} standard
  errors, rejects every miscalibrated configuration at level α. This is much less
  conservative than comparing U with tol when the noise scale is comparable to tol.
* **fail** (ECE > tol shown): L = U − √(2/π)·s ≤ ECE in expectation (bin by bin), so L above
  tol by z_{1−α} standard errors refutes the claim.
* the **point estimate** is s·f⁻¹(U / s), the ECE of the homogeneous configuration whose
  expected plug-in equals the observed one (between L and U).

The ECE interval reported is [L − z·se, the largest tolerance the pass test would still
reject]: its ends are exactly the two one-sided tests. For the worst case, U is the plug-in
maximum over the class (biased upward twice over; its noise scale is the smaller of those at
w = 1 and at the maximiser), and L is evaluated at a *fixed* shift chosen on the seed's
*calibration* half (:func:`fixed_shift`: the largest noise-subtracted ECE there among the
plug-in worst case, no shift and the class's proportional mixes of subsets of regions), so
it stays a lower estimate. Under hard top-1 routing that same L also bounds the worst
expert's ECE from below (ECE_w ≤ Σ_j (w_j n_j / N) ECE_j ≤ max_j ECE_j), so it is one more
way (fail only) to refute the ``experts`` claim. Standard errors come from one
bootstrap of the evaluation half per seed (multinomial counts over resampling units, shared
by the claims of that half, each a matrix product per chunk of replicates); seeds are pooled
with :func:`routeaudit.stats.evidence.pool_seeds`. The effect is the *calibration slack*
tol − ECE. Pass: shown > 0 with the plug-in below the boundary in every seed (Holm across
the audit's cells; all experts for ``experts``, an intersection-union test); fail: shown
< 0 (Holm across every expert and cell); inconclusive otherwise, with about how much more
data would decide (the estimators' bias shrinks like their noise, so it is part of that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from statistics import NormalDist
from typing import Any

import numpy as np

import routeaudit.metrics as metrics
import routeaudit.optiontypes as optiontypes
from routeaudit.audit import AuditContext, BaseAudit, SeedData, experts_missing, seeds_for
from routeaudit.hookspecs import hookimpl
from routeaudit.stats import holm
from routeaudit.stats.bootstrap import Resampler, group_units
from routeaudit.stats.evidence import Evidence, p_text, pool_seeds, scale_text
from routeaudit.stats.folded import FOLD_AT_ZERO as _FOLD
from routeaudit.stats.folded import boundary_mean, fold_inverse, fold_mean
from routeaudit.stats.shift import worst_case_ece, worst_case_ece_sums
from routeaudit.traces import TraceSet
from routeaudit.verdict import Status, Verdict

__all__ = ["CLAIMS", "ECE_TOL", "MIN_EXPERT_TOKENS", "SHIFT_RATIO", "ExpertCalibrationAudit",
           "applicability", "boundary_mean", "fold_inverse", "fold_mean",
           "routeaudit_addoption", "routeaudit_collect_audits"]

#: Defaults of ``--ece-tol``, ``--shift-ratio`` and ``--min-expert-tokens``.
ECE_TOL = 0.02
SHIFT_RATIO = 5.0
MIN_EXPERT_TOKENS = 100
#: The ECE of every claim: ECE15, equal-width (lo, hi] bins (docs/methods.md §2.2).
N_BINS = 15
#: E|Z| for a standard normal: the noise floor of |S_b| in units of its sd.
#: Entries of one chunk of bootstrap counts (rows × resampling units).
_CHUNK = 1 << 22

CLAIMS = {
    "experts": "every expert is calibrated on its routed region",
    "aggregate": "the routed aggregate is calibrated",
    "shift": "the aggregate stays calibrated under every routing-only shift in the class",
}


def _point(upper: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The debiased ECE: noise·f⁻¹(upper / noise)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(noise > 0, noise * fold_inverse(np.where(noise > 0, upper / noise, 0.0)),
                        upper)


def _ece_terms(s: np.ndarray, q: np.ndarray, mass: np.ndarray, n_units: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(plug-in ECE, noise scale) over the last axis (bins) of the residual sums ``s`` and
    the sums of squared per-unit sums ``q``; ``mass`` has the shape of the result."""
    sd = np.sqrt(np.maximum(q - s * s / max(n_units, 1), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(s).sum(axis=-1) / mass, sd.sum(axis=-1) / mass


# --------------------------------------------------------------------------- what is audited


def applicability(traces: TraceSet) -> str | None:
    """Why the audit does not apply to these traces, or None (the ``experts`` need, which the
    runner checks before the audit runs: :func:`routeaudit.audit.experts_missing`)."""
    return experts_missing(traces)


@dataclass(frozen=True)
class Routed:
    """The routed view of one TraceSet."""

    region: np.ndarray
    """Each token's routed expert (top-1 at the expert layer; ties: lowest index)."""
    n_experts: int
    expert_logits: np.ndarray | None
    """Each token's routed expert's own logits [N, K] (the aggregate's under hard top-1
    routing), or None when unknown."""
    mode: str
    """``"hard"`` (top-1) or ``"soft"``."""
    top_k: int | None


def routed(traces: TraceSet) -> Routed:
    meta = traces.meta
    layer = (meta.expert_layer if meta.expert_layer is not None else -1) % traces.n_layers
    scores = np.where(traces.source_mask[layer][None, :], traces.routing[:, layer], -np.inf)
    region = scores.argmax(axis=1)
    mode = "hard" if meta.routing_mode == "hard" and (meta.top_k or 1) == 1 else "soft"
    expert = None
    if traces.expert_logits is not None:
        if traces.expert_logits.shape[1] != traces.n_sources:
            raise ValueError(f"expert_logits has {traces.expert_logits.shape[1]} experts but the "
                             f"routing has {traces.n_sources} sources: the experts must be the "
                             "routing's sources")
        expert = traces.expert_logits[np.arange(traces.n_examples), region]
    elif mode == "hard":
        expert = traces.logits
    return Routed(region, traces.n_sources, expert, mode, meta.top_k)


def mode_text(r: Routed) -> str:
    if r.mode == "hard":
        return "hard routing (each token's prediction is its top-1 expert's)"
    k = f"top-{r.top_k} " if r.top_k and r.top_k < r.n_experts else ""
    return f"soft routing (the prediction mixes the {k}experts by router weight)"


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    tol: float
    ratio: float
    kl: float | None
    min_tokens: int
    alpha: float
    n_boot: int
    stability: str

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(1.0 - self.alpha)

    def shift_class(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "kl": self.kl}

    def threshold(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "ece_tol": self.tol, "shift_ratio": self.ratio,
                "shift_kl": self.kl, "min_expert_tokens": self.min_tokens, "bins": N_BINS,
                "bin_strategy": "equal_width", "closed": "right",
                "interval_level": 1 - 2 * self.alpha, "bootstrap": self.n_boot,
                "stability": self.stability,
                "estimator": "pass: plug-in ECE below its least-favourable mean at ECE = tol; "
                             "fail: noise-subtracted ECE above tol; point: s·f^-1(plug-in/s)",
                "correction": "pass: Holm across the audit's cells (experts: intersection-"
                              "union over experts); fail: Holm across every expert and cell",
                "shift_class": (f"KL ball E_P[w log w] <= {self.kl:g}" if self.kl is not None
                                else f"likelihood ratio 0 <= w <= {self.ratio:g}")
                + ", w a function of the routed expert, E_P[w] = 1"}


# --------------------------------------------------------------------------- per seed


@dataclass(frozen=True)
class SeedEce:
    """One seed's estimate of one ECE (an expert's, the aggregate's or the worst case)."""

    upper: float
    """Plug-in ECE (biased upward)."""
    noise: float
    """Noise scale s = Σ_b σ_b / N of the plug-in."""
    lower: float
    """Noise-subtracted ECE (biased downward)."""
    point: float
    var_upper: float
    var_lower: float
    n: float

    def row(self, opts: Options) -> dict[str, Any]:
        lcb = self.lower - opts.z * math.sqrt(self.var_lower)
        ucb = _ucb([self.noise], self.upper, opts.z * math.sqrt(self.var_upper))
        return {"n": round(self.n), "ece": self.point, "ece_plugin": self.upper,
                "ece_lower": self.lower, "noise_scale": self.noise,
                "interval": [max(lcb, 0.0), ucb], "interval_level": 1 - 2 * opts.alpha}


def _var(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(np.var(v, ddof=1)) if v.size > 1 else float("nan")


@dataclass
class Data:
    """What one view (split × calibrated or not) looks like in one seed."""

    seed: SeedData
    routed: Routed
    conf: np.ndarray
    """Confidence of the evaluation half (the aggregate's, or the calibrator's)."""
    correct: np.ndarray
    conf_cal: np.ndarray
    """The same on the calibration half (to choose the fixed shift of the lower estimate)."""
    correct_cal: np.ndarray


def _units(seed: SeedData) -> tuple[np.ndarray, int]:
    unit, n_units = group_units(seed.groups("eval"), int(seed.eval_index.size))
    return (np.arange(n_units) if unit is None else unit), n_units


def _bins(conf: np.ndarray) -> np.ndarray:
    return metrics.bin_indices(conf, N_BINS, "right").astype(np.int64)


def _sums(unit: np.ndarray, n_units: int, key: np.ndarray, width: int, values: np.ndarray
          ) -> Any:
    """Per-unit sums [U, width] of ``values`` by column ``key`` (a sparse CSR matrix: a
    token adds to one column of its unit's row)."""
    import scipy.sparse as sparse  # heavy import: only when the audit runs

    return sparse.csr_matrix((values, (unit, key)), shape=(n_units, width))


def _collapse(t: Any, n_exp: int, weights: np.ndarray) -> Any:
    """Σ_j w_j T[u, (j, b)] per unit and bin: the per-unit bin sums of a reweighting."""
    import scipy.sparse as sparse

    nb = N_BINS
    rows = np.arange(n_exp * nb)
    return t @ sparse.csr_matrix((np.repeat(weights, nb), (rows, rows % nb)),
                                 shape=(n_exp * nb, nb))


def estimate_seed(d: Data, claims: list[str], opts: Options, rng: np.random.Generator
                  ) -> dict[str, tuple[list[SeedEce], dict[str, Any]]]:
    """Every requested claim of one view in one seed, from one bootstrap of its evaluation
    half: the per-unit sums of every quantity are the columns of one sparse design, and each
    chunk of bootstrap counts is one product with it (no loop over replicates or bins)."""
    import scipy.sparse as sparse

    r, seed = d.routed, d.seed
    index = seed.eval_index
    region = r.region[index]
    n_exp, nb = r.n_experts, N_BINS
    unit, n_units = _units(seed)
    conf = np.clip(d.conf, 0.0, 1.0)
    t_cells = _sums(unit, n_units, region * nb + _bins(conf), n_exp * nb, conf - d.correct)
    mass = _sums(unit, n_units, region, n_exp, np.ones(index.size))
    t_agg = _collapse(t_cells, n_exp, np.ones(n_exp))
    blocks = {"t": t_cells, "m": mass, "q": t_cells.multiply(t_cells),
              "qa": t_agg.multiply(t_agg)}
    separate = "experts" in claims and r.expert_logits is not None and not (
        r.mode == "hard" and (r.expert_logits is seed.traces.logits or np.array_equal(
            r.expert_logits[index], seed.traces.logits[index])))
    # hard top-1 routing: each expert's prediction is the aggregate's, so any routing-only
    # reweighting's ECE is a lower bound of the worst expert's (triangle inequality)
    pooled = "experts" in claims and r.mode == "hard" and not separate
    w_cal = None
    if "shift" in claims or pooled:
        w_cal = fixed_shift(np.clip(d.conf_cal, 0.0, 1.0), d.correct_cal,
                            r.region[seed.cal_index], n_exp, opts)
        t_shift = _collapse(t_cells, n_exp, w_cal)
        blocks["qs"] = t_shift.multiply(t_shift)
    if separate:
        e_conf, e_correct = metrics.confidence_and_correct(r.expert_logits[index],
                                                           seed.traces.labels[index])
        t_exp = _sums(unit, n_units, region * nb + _bins(e_conf), n_exp * nb,
                      e_conf - e_correct)
        blocks.update(te=t_exp, qe=t_exp.multiply(t_exp))
    names = list(blocks)
    bounds = np.cumsum([0, *(blocks[k].shape[1] for k in names)])
    design_t = sparse.vstack([blocks[k].T for k in names]).tocsr()  # [columns, U]
    observed = np.asarray(design_t.sum(axis=1)).reshape(1, -1)
    reps = np.empty((opts.n_boot, design_t.shape[0]))
    chunk = max(1, _CHUNK // max(n_units, 1))
    resampler = Resampler.draw(rng, n_units)
    for r0 in range(0, opts.n_boot, chunk):  # chunks of replicates, one product each
        rows = min(chunk, opts.n_boot - r0)
        counts = np.ascontiguousarray(resampler.counts(r0, rows).T, dtype=np.float64)
        reps[r0:r0 + rows] = (design_t @ counts).T
    load = np.asarray(mass.sum(axis=0)).reshape(-1) / max(index.size, 1)

    def block(sums: np.ndarray, name: str) -> np.ndarray:
        i = names.index(name)
        return sums[:, bounds[i]:bounds[i + 1]]

    out: dict[str, tuple[list[SeedEce], dict[str, Any]]] = {}

    def terms(sums: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        s_cells = block(sums, "t").reshape(-1, n_exp, nb)
        m_cells = block(sums, "m")
        if what == "experts":
            s, q = ((block(sums, "te"), block(sums, "qe")) if separate
                    else (block(sums, "t"), block(sums, "q")))
            return _ece_terms(s.reshape(-1, n_exp, nb), q.reshape(-1, n_exp, nb), m_cells,
                              n_units)
        if what == "aggregate":
            return _ece_terms(s_cells.sum(axis=1), block(sums, "qa"), m_cells.sum(axis=1),
                              n_units)
        assert w_cal is not None  # the fixed shift of the lower estimate
        return _ece_terms((s_cells * w_cal[None, :, None]).sum(axis=1), block(sums, "qs"),
                          m_cells @ w_cal, n_units)

    for claim in claims:
        if claim == "shift":
            continue
        (u_obs, s_obs), (u_rep, s_rep) = terms(observed, claim), terms(reps, claim)
        u_obs, s_obs = np.atleast_1d(u_obs[0]), np.atleast_1d(s_obs[0])
        u_rep, s_rep = u_rep.reshape(opts.n_boot, -1), s_rep.reshape(opts.n_boot, -1)
        point = _point(u_obs, s_obs)
        ests = [SeedEce(float(u_obs[k]), float(s_obs[k]), float(u_obs[k] - _FOLD * s_obs[k]),
                        float(point[k]), _var(u_rep[:, k]),
                        _var(u_rep[:, k] - _FOLD * s_rep[:, k]),
                        float(block(observed, "m")[0, k] if claim == "experts"
                              else index.size)) for k in range(u_obs.size)]
        if claim == "experts":
            row = {"n": int(index.size), "experts": [
                {"expert": k, "load": float(load[k]), **ests[k].row(opts)}
                for k in range(n_exp)]}
        else:
            row = {**ests[0].row(opts), "expert_load": [float(v) for v in load],
                   "accuracy_minus_confidence": float(np.mean(d.correct - conf))}
        out[claim] = (ests, row)
    if "shift" in claims:
        out["shift"] = _shift_seed(d, conf, t_cells, observed, reps, block, terms, w_cal, load,
                                   n_units, opts)
    if pooled:
        (u_obs, s_obs), (u_rep, s_rep) = terms(observed, "shift"), terms(reps, "shift")
        low = float(np.atleast_1d(u_obs)[0] - _FOLD * np.atleast_1d(s_obs)[0])
        out["pooled"] = ([SeedEce(float("nan"), float("nan"), low, low, float("nan"),
                                  _var(u_rep - _FOLD * s_rep), float(index.size))],
                         {"ece_lower": low, "calibration_half_cell_weights":
                          [float(v) for v in w_cal]})
    return out


#: Experts drawn in the recorded reliability table (the most loaded ones), to keep it small.
RELIABILITY_EXPERTS = 8


def _reliability_table(conf: np.ndarray, correct: np.ndarray) -> dict[str, list[Any]]:
    """Mean confidence, accuracy and count of every non-empty ECE15 bin."""
    bins = _bins(conf)
    n = np.bincount(bins, minlength=N_BINS)
    c = np.bincount(bins, conf, minlength=N_BINS)
    a = np.bincount(bins, correct.astype(np.float64), minlength=N_BINS)
    keep = np.flatnonzero(n)
    return {"bin": [int(b) for b in keep], "count": [int(v) for v in n[keep]],
            "confidence": [round(float(v), 6) for v in c[keep] / n[keep]],
            "accuracy": [round(float(v), 6) for v in a[keep] / n[keep]]}


def reliability(d: Data, claim: str) -> dict[str, Any]:
    """Reliability tables (ECE15 bins) of the aggregate on the evaluation half and of each
    expert on its routed region (its own prediction when ``expert_logits`` are known, else
    the aggregate's there): the data of the HTML report's figure; nothing is decided from
    it. Only the ``RELIABILITY_EXPERTS`` most loaded experts are kept."""
    conf, correct = np.clip(d.conf, 0.0, 1.0), np.asarray(d.correct)
    out: dict[str, Any] = {"seed": d.seed.seed, "bins": N_BINS, "closed": "right",
                           "aggregate": _reliability_table(conf, correct)}
    r = d.routed
    region = r.region[d.seed.eval_index]
    if claim == "experts" and r.expert_logits is not None:
        conf, correct = metrics.confidence_and_correct(r.expert_logits[d.seed.eval_index],
                                                       d.seed.traces.labels[d.seed.eval_index])
        out["expert_prediction"] = "own"
    else:
        out["expert_prediction"] = "aggregate"
    load = np.bincount(region, minlength=r.n_experts)
    shown = sorted(np.argsort(-load, kind="stable")[:RELIABILITY_EXPERTS])
    out["experts"] = [{"expert": int(k), **_reliability_table(conf[region == k],
                                                               correct[region == k])}
                      for k in shown if load[k] > 0]
    out["experts_total"] = int(r.n_experts)
    return out


def fixed_shift(conf: np.ndarray, correct: np.ndarray, region: np.ndarray, n_exp: int,
                opts: Options) -> np.ndarray:
    """The routing-only shift whose noise-subtracted ECE is largest on the calibration half,
    among: the plug-in worst case, no shift, and every mix of a subset of regions in
    proportion to their sizes that the class allows (up to 12 experts). Chosen on data the
    evaluation half never sees, so the lower estimate there stays a lower estimate."""
    worst = worst_case_ece(conf, correct, region, **opts.shift_class())
    candidates = [_cell_weights(worst.cell_weights, n_exp), np.ones(n_exp)]
    n = np.bincount(region, minlength=n_exp).astype(np.float64)
    if n_exp <= 12 and n.sum() > 0:
        subsets = ((np.arange(1, 1 << n_exp)[:, None] >> np.arange(n_exp)) & 1).astype(bool)
        share = subsets @ n / n.sum()
        with np.errstate(divide="ignore"):
            ok = (1.0 / share <= opts.ratio) if opts.kl is None else (-np.log(share) <= opts.kl)
        candidates += list(subsets[ok] / share[ok, None])
    w = np.array(candidates)  # [C, J]
    bins = _bins(conf)
    residual = conf - correct
    key, size = region * N_BINS + bins, n_exp * N_BINS
    g = np.bincount(key, residual, size).reshape(n_exp, N_BINS)
    q = np.bincount(key, residual * residual, size).reshape(n_exp, N_BINS)
    s = w @ g  # [C, B]
    var = np.maximum((w * w) @ q - s * s / max(conf.size, 1), 0.0)
    lower = (np.abs(s) - _FOLD * np.sqrt(var)).sum(axis=1) / (w @ n)
    return w[int(np.argmax(lower))]


def _shift_seed(d: Data, conf: np.ndarray, t_cells: Any, observed: np.ndarray,
                reps: np.ndarray, block: Any, terms: Any, w_cal: np.ndarray | None,
                load: np.ndarray, n_units: int, opts: Options
                ) -> tuple[list[SeedEce], dict[str, Any]]:
    """The worst case: plug-in maximum (upper), the fixed calibration-half shift (lower)."""
    n_exp = d.routed.n_experts
    cls = opts.shift_class()

    def worst(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = block(sums, "t").reshape(-1, n_exp, N_BINS)
        return worst_case_ece_sums(g, block(sums, "m"), **cls)

    (u_obs,), (w_obs,) = worst(observed)
    u_rep, _ = worst(reps)
    low_obs, low_noise = (float(np.atleast_1d(v)[0]) for v in terms(observed, "shift"))
    u_low, s_low = terms(reps, "shift")
    low_rep = u_low - _FOLD * s_low
    lower = low_obs - _FOLD * low_noise
    # noise scale of the maximiser and of w = 1; the pass boundary uses the smaller
    w_star = _cell_weights(w_obs, n_exp)
    t_star = _collapse(t_cells, n_exp, w_star)
    s_star = np.asarray(t_star.sum(axis=0)).reshape(-1)
    q_star = np.asarray(t_star.multiply(t_star).sum(axis=0)).reshape(-1)
    sd_star = np.sqrt(np.maximum(q_star - s_star ** 2 / n_units, 0.0))
    mass_star = float(block(observed, "m")[0] @ w_star)
    noise_star = float(sd_star.sum() / mass_star) if mass_star > 0 else float("nan")
    _, noise_one = (np.atleast_1d(v)[0] for v in terms(observed, "aggregate"))
    noise = float(np.nanmin([noise_star, float(noise_one)]))
    point = float(np.clip(_point(np.array([u_obs]), np.array([noise_star]))[0], lower, u_obs))
    est = SeedEce(float(u_obs), noise, lower, point, _var(u_rep), _var(low_rep),
                  float(conf.size))
    return [est], {**est.row(opts), "expert_load": [float(v) for v in load],
                   "worst_cell_weights": [float(v) for v in w_star],
                   "calibration_half_cell_weights": [float(v) for v in (w_cal if w_cal is not
                                                                        None else [])],
                   "accuracy_minus_confidence": float(np.mean(d.correct - conf))}


def _cell_weights(w: np.ndarray, n_experts: int) -> np.ndarray:
    out = np.ones(n_experts)
    out[: min(w.size, n_experts)] = w[:n_experts]
    return out


def _ucb(noises: list[float], upper: float, margin: float) -> float:
    """The largest tolerance t the pass test rejects at: mean_s boundary_mean(t, s_s) =
    upper + margin (0 when even t = 0 is rejected); bisection on a monotone function."""
    target = upper + margin
    lo, hi = 0.0, max(target, 0.0)
    noise = np.asarray(noises, dtype=np.float64)
    if not np.isfinite(target) or not np.isfinite(noise).all():
        return float("nan")
    if float(np.mean(boundary_mean(0.0, noise))) >= target:
        return 0.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if float(np.mean(boundary_mean(mid, noise))) < target:
            lo = mid
        else:
            hi = mid
    return hi


# --------------------------------------------------------------------------- pooling


@dataclass(frozen=True)
class Pooled:
    """One ECE pooled over seeds, as evidence about the slack tol − ECE: ``shows`` (the
    plug-in against its least-favourable mean at ECE = tol) decides pass, ``refutes`` (the
    noise-subtracted lower estimate) decides fail."""

    shows: Evidence
    refutes: Evidence
    point: float
    upper: float
    noises: tuple[float, ...]
    tol: float
    z: float

    @classmethod
    def of(cls, seeds: list[SeedEce], tol: float, z: float) -> Pooled:
        noises = tuple(s.noise for s in seeds)
        shows = pool_seeds([float(boundary_mean(tol, s.noise)) - s.upper for s in seeds],
                           [s.var_upper for s in seeds])
        refutes = pool_seeds([tol - s.lower for s in seeds], [s.var_lower for s in seeds])
        return cls(shows, refutes, float(np.mean([s.point for s in seeds])),
                   float(np.mean([s.upper for s in seeds])), noises, tol, z)

    @property
    def slack(self) -> float:
        """tol − the debiased point estimate of the ECE."""
        return self.tol - self.point

    def p_pass(self) -> float:
        return self.shows.p_positive()

    def p_fail(self) -> float:
        return self.refutes.p_below(0.0)

    def stable(self, rule: str) -> bool:
        """The plug-in lies below its boundary mean in every seed (or a majority)."""
        return self.shows.sign_stable(rule)

    @cached_property
    def _ece_interval(self) -> tuple[float, float]:
        lcb = self.tol - (self.refutes.estimate + self.z * self.refutes.se)
        ucb = _ucb(list(self.noises), self.upper, self.z * self.shows.se)
        return max(lcb, 0.0), ucb

    def ece_interval(self) -> tuple[float, float]:
        """[lower bound, upper bound] of the ECE at level 1 − 2α: fail iff the lower bound
        exceeds tol, pass (before Holm) iff the upper bound is below it."""
        return self._ece_interval

    def interval(self) -> tuple[float, float]:
        lo, hi = self.ece_interval()
        return self.tol - hi, self.tol - lo

    def directed(self) -> Evidence:
        """Evidence for :func:`scale_text`: the debiased slack with the se that makes its
        1 − 2α bound the decisive test's bound (the bias shrinks like the noise, so it is
        part of that se)."""
        lo, hi = self.interval()
        toward_pass = self.slack > 0
        ev = self.shows if toward_pass else self.refutes
        distance = (self.slack - lo) if toward_pass else (hi - self.slack)
        se = max(distance, 0.0) / self.z
        share = ev.within_se / ev.se if ev.se > 0 else 1.0
        return Evidence(self.slack, se, ev.per_seed, se * share, ev.between_sd)

    def as_dict(self, alpha: float) -> dict[str, Any]:
        d = self.directed().as_dict(0.0, alpha)
        lo, hi = self.ece_interval()
        d.update(ece=self.point, ece_interval=[lo, hi], interval=list(self.interval()),
                 ece_plugin=self.upper, ece_lower=self.tol - self.refutes.estimate,
                 p_pass=self.p_pass(), p_fail=self.p_fail(),
                 pass_statistic=self.shows.estimate, pass_se=self.shows.se,
                 fail_statistic=self.refutes.estimate, fail_se=self.refutes.se)
        return d


# --------------------------------------------------------------------------- the audit

#: A view of the target: (split or None, calibrated).
View = tuple[str | None, bool]


def _view(cell: dict[str, Any]) -> View:
    return cell.get("split"), cell.get("calibrator") is not None


class ExpertCalibrationAudit(BaseAudit):
    name = "expert_calibration"
    claim = ("Every expert is calibrated on its routed region, the routed aggregate is "
             "calibrated, and it stays calibrated under every routing-only shift in the class.")
    needs = frozenset({"traces", "experts"})
    min_examples = 50

    def planted_cases(self) -> str:
        return ("its claims hold at ECE <= --ece-tol, so there is no planted effect of size 0 "
                "to refute; benchmarks/validity_experts.py simulates its error rates with "
                "routeaudit.simulation.experts")

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"claim": c} for c in CLAIMS]
        calibrated = ctx.calibrator is not None
        if calibrated:
            from routeaudit.calibration.study import resolve_spec

            name = resolve_spec(ctx.calibrator).name
            out += [{"claim": c, "calibrator": name} for c in ("aggregate", "shift")]
        if ctx.seeds and applicability(ctx.seeds[0].traces) is None and \
                _split(ctx, "shift") is not None:
            out += [{"claim": c, "split": "shift"} for c in CLAIMS]
            if calibrated:
                out += [{"claim": c, "calibrator": name, "split": "shift"}
                        for c in ("aggregate", "shift")]
        return out

    def options(self, ctx: AuditContext) -> Options:
        s = ctx.settings
        kl = ctx.option("shift_kl", None)
        return Options(float(ctx.option("ece_tol", ECE_TOL)),
                       float(ctx.option("shift_ratio", SHIFT_RATIO)),
                       None if kl is None else float(kl),
                       int(ctx.option("min_expert_tokens", MIN_EXPERT_TOKENS)),
                       s.alpha, s.n_bootstrap, s.stability)

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
        opts = self.options(ctx)
        why = applicability(ctx.seeds[0].traces)
        if why is not None:
            return [ctx.verdict(self, cell, Status.SKIP, why, claim=_claim(cell),
                                threshold=opts.threshold()) for cell in cells]
        views: dict[View, list[str]] = {}
        for cell in cells:
            views.setdefault(_view(cell), []).append(cell["claim"])
        seeds_of = {view: (ctx.seeds if view[0] is None else _split_seeds(ctx, view[0]))
                    for view in views}
        estimates = {view: self._estimate_view(ctx, view, claims, seeds_of[view], opts)
                     for view, claims in views.items()}
        results = [self._result(cell, estimates[_view(cell)], seeds_of[_view(cell)], opts, ctx)
                   for cell in cells]
        # pass: one p per cell (experts: the largest over experts), Holm across cells
        p_pass = holm([r.p_pass for r in results])
        # fail: every expert and cell is one comparison, one Holm across all of them
        flat = [p for r in results for p in r.p_fail]
        adjusted = [float(v) for v in holm(flat)] if flat else []
        out, at = [], 0
        for cell, result, pp in zip(cells, results, p_pass, strict=True):
            pf = adjusted[at:at + len(result.p_fail)]
            at += len(result.p_fail)
            out.append(result.verdict(ctx, self, cell, float(pp), pf))
        return out

    def _estimate_view(self, ctx: AuditContext, view: View, claims: list[str],
                       seeds: list[SeedData], opts: Options
                       ) -> list[dict[str, tuple[list[SeedEce], dict[str, Any]]] | str]:
        """Per seed: the claims' estimates, or why the view cannot be estimated."""
        out: list[dict[str, tuple[list[SeedEce], dict[str, Any]]] | str] = []
        for i, seed in enumerate(seeds):
            r = routed(seed.traces)
            wanted = list(claims)
            if "experts" in wanted and r.expert_logits is None:
                wanted.remove("experts")
            if view[1]:
                conf, correct, conf_cal, correct_cal = _calibrated(ctx, seed, i)
            else:
                conf, correct = seed.conf_correct("eval")
                conf_cal, correct_cal = seed.conf_correct("cal")
            data = Data(seed, r, conf, correct, conf_cal, correct_cal)
            rng = ctx.rng(self.name, f"bootstrap:{view[0] or 'main'}:{int(view[1])}",
                          seed.seed)
            out.append(estimate_seed(data, wanted, opts, rng) if wanted else {})
            if i == 0:  # the report's reliability diagrams: the first seed only
                for claim in ("experts", "aggregate"):
                    if claim in out[-1]:
                        out[-1][claim][1]["reliability"] = reliability(data, claim)
        return out

    def _result(self, cell: dict[str, Any], per_view: list[Any], seeds: list[SeedData],
                opts: Options, ctx: AuditContext) -> CellResult:
        claim = cell["claim"]
        r = routed(seeds[0].traces)
        result = CellResult(claim, r, opts, n_eval=int(seeds[0].eval_index.size))
        if claim == "experts" and r.expert_logits is None:
            result.unavailable = ("soft routing without expert_logits: each expert's own "
                                  "prediction on its routed region is not in the traces "
                                  "(export expert_logits [N, E, K])")
            return result
        ests = [v[claim][0] for v in per_view]
        result.per_seed = [{"seed": seed.seed, **v[claim][1]}
                           for seed, v in zip(seeds, per_view, strict=True)]
        n_comp = len(ests[0])
        result.pooled = [Pooled.of([e[k] for e in ests], opts.tol, opts.z) for k in range(n_comp)]
        if claim == "experts" and all("pooled" in v for v in per_view):
            result.pooled.append(Pooled.of([v["pooled"][0][0] for v in per_view], opts.tol,
                                           opts.z))
            result.fail_only = [n_comp]
            for row, v in zip(result.per_seed, per_view, strict=True):
                row["pooled_lower"] = v["pooled"][1]
        if claim == "experts":
            n_comp = len(ests[0])
            result.short = [
                f"expert {k} has {int(e[k].n)} routed tokens in seed {seed.seed}'s evaluation "
                f"half; at least {opts.min_tokens} are needed"
                + _more_text(opts.min_tokens, e[k].n, seed)
                for seed, e in zip(seeds, ests, strict=True) for k in range(n_comp)
                if e[k].n < opts.min_tokens]
            result.short_experts = sorted({k for e in ests for k in range(n_comp)
                                           if e[k].n < opts.min_tokens})
        elif cell.get("calibrator") is None:
            result.diagnosis = _diagnosis(r, seeds[0])
        return result


def _more_text(need: int, have: float, seed: SeedData) -> str:
    if have <= 0:
        return " (it received none: more data may never route tokens to it)"
    factor = need / have
    return f" (about {factor:.1f}× the data, N ≈ {math.ceil(factor * seed.traces.n_examples):,})"


def _claim(cell: dict[str, Any]) -> str:
    text = CLAIMS[cell["claim"]]
    if cell.get("calibrator") is not None:
        who = f"the calibrator {cell['calibrator']}'s output"
        text = text.replace("the routed aggregate", who).replace("the aggregate", who)
    if cell.get("split"):
        text += f" (on the target's {cell['split']!r} split)"
    return text[0].upper() + text[1:] + "."


def _split(ctx: AuditContext, name: str) -> TraceSet | None:
    getter = getattr(ctx, "split_traces", None)
    return getter(name) if getter is not None else None


def _split_seeds(ctx: AuditContext, name: str) -> list[SeedData]:
    """The seeds of another split: the same seed numbers, each with its own stratified
    calibration/evaluation split of that split's traces (memoised)."""
    key = ("expert_calibration", "split-seeds", name)
    if key not in ctx.cache:
        traces = _split(ctx, name)
        if traces is None:
            raise ValueError(f"the target has no {name!r} split")
        ctx.cache[key] = seeds_for([traces], [s.seed for s in ctx.seeds], ctx.summaries)
    return ctx.cache[key]


def _calibrated(ctx: AuditContext, seed: SeedData, i: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The calibrator's output and the correctness on ``seed``'s evaluation and calibration
    halves; the calibrator is fitted on the calibration half of the main split's seed ``i``
    with the features it declares (memoised per seed), with the same random state as the
    gain audits' candidate."""
    from routeaudit.calibration.features import feature_matrix
    from routeaudit.calibration.study import make_calibrator, random_state_for, resolve_spec

    main = ctx.seeds[i]
    spec = resolve_spec(ctx.calibrator)
    key = ("expert_calibration", "calibrator", spec.name, main.seed)
    if key not in ctx.cache:
        X = feature_matrix(spec.features, main.features).X
        _, correct = main.conf_correct("all")
        cal = make_calibrator(spec, None, random_state_for(main.seed, spec))
        if getattr(cal, "requires_oracle", False):
            cal.fit(X[main.cal_index], correct[main.cal_index],
                    oracle=(X[main.eval_index], correct[main.eval_index]))
        else:
            cal.fit(X[main.cal_index], correct[main.cal_index])
        ctx.cache[key] = cal
    cal = ctx.cache[key]
    X = feature_matrix(spec.features, seed.features).X
    pred = np.asarray(cal.predict(X), dtype=np.float64)
    if not np.isfinite(pred).all():
        raise ValueError(f"calibrator {spec.name!r} predicted NaN or inf")
    pred = np.clip(pred, 0.0, 1.0)
    _, correct = seed.conf_correct("all")
    return (pred[seed.eval_index], correct[seed.eval_index], pred[seed.cal_index],
            correct[seed.cal_index])


def _diagnosis(r: Routed, seed: SeedData) -> str:
    """Which way the aggregate is off, in words (the first seed's evaluation half)."""
    conf, correct = seed.conf_correct("eval")
    bins = _bins(conf)
    top = np.unique(bins)[-3:]
    sel = np.isin(bins, top)
    gap_top = float(np.mean(correct[sel] - conf[sel]))
    gap = float(np.mean(correct - conf))
    where = f"in the top bins (confidence > {float(top[0]) / N_BINS:.2f})"
    if gap > 0:
        text = (f"the aggregate is under-confident: accuracy exceeds confidence by "
                f"{gap_top:.3f} {where} and by {gap:.3f} overall")
        if r.mode == "soft":
            text += ("; averaging calibrated experts pulls probabilities toward the middle "
                     "(Wu & Gales 2021), so soft routing can break the calibration every "
                     "expert has")
        return text
    return (f"the aggregate is over-confident: confidence exceeds accuracy by {-gap_top:.3f} "
            f"{where} and by {-gap:.3f} overall")


# --------------------------------------------------------------------------- verdicts


@dataclass
class CellResult:
    claim: str
    routed: Routed
    opts: Options
    n_eval: int = 0
    pooled: list[Pooled] = field(default_factory=list)
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    unavailable: str | None = None
    short: list[str] = field(default_factory=list)
    short_experts: list[int] = field(default_factory=list)
    fail_only: list[int] = field(default_factory=list)
    """Components that can only refute the claim: under hard top-1 routing, the ECE of the
    aggregate under a fixed routing-only reweighting bounds the worst expert's from below."""
    diagnosis: str = ""

    def _decidable(self) -> list[int]:
        return [k for k in range(len(self.pooled))
                if k not in self.short_experts and k not in self.fail_only]

    def _passing(self) -> list[Pooled]:
        return [p for k, p in enumerate(self.pooled) if k not in self.fail_only]

    @property
    def p_pass(self) -> float:
        """Intersection-union: the largest component p (NaN when a pass is impossible)."""
        if self.unavailable or self.short or not self._passing():
            return float("nan")
        return max(p.p_pass() for p in self._passing())

    @property
    def p_fail(self) -> list[float]:
        """One p per component; an expert with too few tokens is not tested (NaN)."""
        if self.unavailable:
            return []
        return [p.p_fail() if k not in self.short_experts else float("nan")
                for k, p in enumerate(self.pooled)]

    def labels(self) -> list[str]:
        if self.claim != "experts":
            return ["worst case" if self.claim == "shift" else "aggregate"]
        return [("the experts pooled by a routing-only reweighting (their ECE is at least "
                 "this)" if k in self.fail_only else f"expert {k}")
                for k in range(len(self.pooled))]

    def verdict(self, ctx: AuditContext, audit: Any, cell: dict[str, Any], p_pass: float,
                p_fail: list[float]) -> Verdict:
        opts = self.opts
        mode = mode_text(self.routed)
        what = "worst-case ECE15" if self.claim == "shift" else "ECE15"
        common: dict[str, Any] = {
            "claim": _claim(cell), "threshold": opts.threshold(), "per_seed": self.per_seed,
            "statistic": f"calibration slack: --ece-tol minus the {what}"
                         + (" of the least-calibrated expert" if self.claim == "experts" else "")
                         + ", debiased, pooled over seeds"}
        if self.unavailable:
            return ctx.verdict(audit, cell, Status.INCONCLUSIVE, f"{mode}: {self.unavailable}",
                               **common)
        alpha = opts.alpha
        refuted = [k for k, p in enumerate(p_fail) if np.isfinite(p) and p <= alpha]
        candidates = self._decidable() or list(range(len(self.pooled)))
        shown = refuted[0] if refuted else min(candidates, key=lambda k: self.pooled[k].slack)
        head = self.pooled[shown]
        stable_all = all(p.stable(opts.stability) for p in self._passing())
        if refuted:
            status = Status.FAIL
        elif not self.short and p_pass <= alpha and stable_all:
            status = Status.PASS
        else:
            status = Status.INCONCLUSIVE
        reason = self._reason(status, mode, refuted, p_pass, p_fail, shown, stable_all)
        labels = self.labels()
        evidence = {**head.as_dict(alpha), "component": labels[shown], "p_pass_holm": p_pass,
                    "p_fail_holm": float(np.nanmin(p_fail)) if np.isfinite(p_fail).any()
                    else float("nan"), "n_eval": self.n_eval, "routing": self.routed.mode}
        if self.claim == "experts":
            evidence["experts"] = {labels[k]: p.as_dict(alpha) for k, p in enumerate(self.pooled)}
        if status is Status.FAIL:
            p_raw, p_adj = head.p_fail(), p_fail[shown]
        else:
            p_raw, p_adj = max(p.p_pass() for p in self._passing()), p_pass
        return ctx.verdict(audit, cell, status, reason, effect=head.slack, ci=head.interval(),
                           p_value=p_raw, p_value_corrected=p_adj, evidence=evidence, **common)

    def _describe(self, k: int) -> str:
        p = self.pooled[k]
        lo, hi = p.ece_interval()
        level = f"{100 * (1 - 2 * self.opts.alpha):g}%"
        if k in self.fail_only:
            return (f"{self.labels()[k]}: noise-subtracted ECE15 {p.tol - p.refutes.estimate:.4f}"
                    f", {level} lower bound {lo:.4f}")
        what = "worst-case ECE15" if self.claim == "shift" else "ECE15"
        return (f"{self.labels()[k]}: {what} {p.point:.4f} (debiased; plug-in {p.upper:.4f}, "
                f"noise-subtracted {p.tol - p.refutes.estimate:.4f}), {level} interval "
                f"[{lo:.4f}, {hi:.4f}]")

    def _reason(self, status: Status, mode: str, refuted: list[int], p_pass: float,
                p_fail: list[float], shown: int, stable_all: bool) -> str:
        opts, tol = self.opts, self.opts.tol
        seeds = len(self.per_seed)
        size = f"N_eval {self.n_eval:,} per seed, {seeds} seed{'s' if seeds != 1 else ''}"
        if status is Status.FAIL:
            items = "; ".join(f"{self._describe(k)} (Holm p {p_text(p_fail[k])})"
                              for k in refuted)
            text = (f"{mode}: refuted: {CLAIMS[self.claim]} fails, the ECE is shown above the "
                    f"tolerance {tol:g}: {items}")
        elif status is Status.PASS:
            scope = (f"for all {len(self._passing())} experts (least slack: "
                     f"{self._describe(shown)})"
                     if self.claim == "experts" else self._describe(shown))
            text = (f"{mode}: {CLAIMS[self.claim]}: ECE shown below the tolerance {tol:g}, "
                    f"{scope} (Holm p {p_text(p_pass)}; slack {self.pooled[shown].slack:+.4f})")
        else:
            parts = []
            if self.short:
                parts.append("too few routed tokens: " + "; ".join(self.short))
            head = self.pooled[shown]
            if not stable_all and np.isfinite(p_pass) and p_pass <= opts.alpha:
                parts.append(f"shown below the tolerance pooled (Holm p {p_text(p_pass)}) but "
                             "not in every seed (--stability)")
            p_f = float(np.nanmin(p_fail)) if np.isfinite(p_fail).any() else float("nan")
            parts.append(f"not decided at tolerance {tol:g}: {self._describe(shown)}; shown "
                         f"neither below (Holm p {p_text(p_pass)}) nor above (Holm p "
                         f"{p_text(p_f)}) the tolerance; "
                         + scale_text(head.directed(), 0.0, opts.alpha, self.n_eval,
                                      goals=("show the ECE below the tolerance",
                                             "show the ECE above the tolerance")))
            text = f"{mode}: " + "; ".join(parts)
        if self.claim == "shift" and self.per_seed:
            w = self.per_seed[0].get("worst_cell_weights", [])
            cls = (f"KL ball ρ = {opts.kl:g}" if opts.kl is not None
                   else f"likelihood ratio ≤ {opts.ratio:g}")
            text += (f"; the worst shift ({cls}) reweights the experts' regions by "
                     + ", ".join(f"{v:.2f}" for v in w)
                     + f" (seed {self.per_seed[0]['seed']})")
        if self.diagnosis and status is Status.FAIL:
            text += f"; {self.diagnosis}"
        return f"{text} ({size})"


# --------------------------------------------------------------------------- options, hooks










@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    group = parser.getgroup("expert_calibration")
    group.add_argument("--ece-tol", type=optiontypes.positive_number, default=ECE_TOL, metavar="T",
                       help=f"a calibration claim holds when its ECE15 is <= T ({ECE_TOL:g})")
    group.add_argument("--shift-ratio", type=optiontypes.at_least_one, default=SHIFT_RATIO, metavar="R",
                       help="routing-only shifts with likelihood ratio <= R per routed expert "
                            f"({SHIFT_RATIO:g}: any mix of regions holding >= 1/R of the data)")
    group.add_argument("--shift-kl", type=optiontypes.non_negative, default=None, metavar="RHO",
                       help="use the KL ball E_P[w log w] <= RHO as the shift class instead")
    group.add_argument("--min-expert-tokens", type=optiontypes.positive_int, default=MIN_EXPERT_TOKENS,
                       metavar="N", help="fewer routed evaluation tokens than N leave an "
                       f"expert's claim undecided ({MIN_EXPERT_TOKENS})")


@hookimpl
def routeaudit_collect_audits(config: Any) -> list[Any]:
    return [ExpertCalibrationAudit()]
