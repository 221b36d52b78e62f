"""Fit a calibrator and its controls on every seed, then compare them on the evaluation split.

One :class:`Study` per (calibrator, setting) is shared by every audit that asks for it (it is
memoised on the audit context), so the capacity, shuffle and probe audits see the same fitted
models and the same paired bootstrap. Per seed: the calibrator and every requested variant are
fitted on the calibration half and predict the evaluation half; worst-routing-tertile ECE15
(the headline; tertiles of the model's own routing summary on the evaluation split, shared by
all probes) and its paired bootstrap are computed for all of them at once; global ECE15, MCE,
NLL, Brier, classwise ECE and SmoothECE are reported alongside.

The decision rule for "the candidate beats control C" (DESIGN.md §4; every threshold is a
setting and is reported in the verdict):

1. the gain, metric(C) − metric(candidate), is positive in every seed (``stability``);
2. its paired bootstrap CI excludes 0 in every seed: the two-sided bootstrap p-value,
   Holm-corrected across the comparisons of the audit within the seed, is ≤ alpha;
3. the mean gain over seeds exceeds the seed-variance band of C (one sd of C's metric
   across seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from routeaudit import metrics
from routeaudit.audit import AuditContext, SeedData
from routeaudit.calibrators.base import CalibratorSpec, spec_of
from routeaudit.calibrators.mlp import MLPCalibrator, fit_many
from routeaudit.controls import (
    CANDIDATE,
    CAPACITY_KINDS,
    SHUFFLE_KINDS,
    Variant,
    probes,
    twins,
    variant_input,
)
from routeaudit.errors import UsageError
from routeaudit.features import FeatureMatrix, feature_matrix, is_routing_feature, probabilities
from routeaudit.matched import stable
from routeaudit.stats import bootstrap_worst_tile_ece, holm, paired_gain, rng_for

HEADLINE = "worst_tertile_ece"
Setting = tuple[str, Any] | None


def resolve_spec(calibrator: Any) -> CalibratorSpec:
    """The CalibratorSpec of a registered factory (features must be declared)."""
    spec = spec_of(calibrator)
    if spec is None:
        raise UsageError(f"{calibrator!r} is not a registered calibrator: decorate the factory "
                         "with @routeaudit.calibrator(features=[...]) to declare its inputs")
    return spec


def tertile_summary(spec: CalibratorSpec, fm: FeatureMatrix, requested: str | None) -> str:
    """Which routing summary defines the worst-tertile partition.

    The user's choice, else the candidate's first scalar routing feature, else ``r_agg``
    (for profile-only candidates).
    """
    if requested:
        return requested
    for name in fm.routing_features:
        if np.count_nonzero(np.asarray(fm.column_feature) == name) == 1:
            return name
    return "r_agg"


def full_vector(probs: np.ndarray, calibrated: np.ndarray) -> np.ndarray:
    """A probability vector from a top-label probe (methods.md §2.2, classwise ECE).

    The calibrated value goes on the predicted class; 1 − ĉ is shared among the other classes
    in proportion to their original probabilities (equally when they are all 0).
    """
    n, k = probs.shape
    top = probs.argmax(axis=1)
    rows = np.arange(n)
    rest = probs.copy()
    rest[rows, top] = 0.0
    total = rest.sum(axis=1, keepdims=True)
    share = np.where(total > 0, rest / np.where(total > 0, total, 1.0), 1.0 / max(k - 1, 1))
    share[rows, top] = 0.0
    out = share * (1.0 - calibrated)[:, None]
    out[rows, top] = calibrated
    return out


def probe_metrics(pred: np.ndarray, correct: np.ndarray, probs: np.ndarray, labels: np.ndarray,
                  headline: float) -> dict[str, float]:
    """Every reported metric of one probe on the evaluation split."""
    p = np.clip(pred, 0.0, 1.0)
    return {
        HEADLINE: float(headline),
        "ece15": metrics.ece(p, correct, 15),
        "mce": metrics.mce(p, correct, 15),
        "nll": metrics.binary_nll(p, correct),
        "brier": metrics.binary_brier(p, correct),
        "classwise_ece": metrics.classwise_ece(full_vector(probs, p), labels, 15),
        "smooth_ece": float(metrics.smooth_ece(p, correct)),
    }


@dataclass
class SeedResult:
    """One seed's fitted probes, evaluated on its evaluation split."""

    seed: int
    order: list[str]  # probe keys, "raw" first, then "candidate", then the variants
    observed: np.ndarray  # headline per probe
    replicates: np.ndarray  # [n_boot, probes], paired
    metrics: dict[str, dict[str, float]]
    n_parameters: dict[str, int | None]

    def index(self, key: str) -> int:
        return self.order.index(key)


@dataclass
class Study:
    spec: CalibratorSpec
    setting: Setting
    tertile_summary: str
    seeds: list[SeedResult] = field(default_factory=list)

    def metric(self, key: str, name: str = HEADLINE) -> list[float]:
        return [s.metrics[key][name] for s in self.seeds]


def _random_state_for(seed: int, spec: CalibratorSpec) -> int:
    """One integer per (calibrator, seed), shared by the candidate and all its twins, so the
    twins differ from the candidate only in their input (same init, same minibatch order)."""
    return int(rng_for("calibrator-init", spec.name, seed).integers(0, 2**31 - 1))


def make_calibrator(spec: CalibratorSpec, setting: Setting, random_state: int) -> Any:
    cal = spec.make()
    if setting is not None:
        if not hasattr(cal, "with_setting"):
            raise UsageError(f"calibrator {spec.name!r} has a sensitivity grid but no with_setting")
        cal = cal.with_setting(*setting)
    params = cal.get_params(deep=False) if hasattr(cal, "get_params") else {}
    if "random_state" in params:
        cal.set_params(random_state=random_state)
    return cal


def _fit_predict(jobs: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
                 ) -> list[tuple[np.ndarray, int | None]]:
    """Fit every (calibrator, X_cal, y_cal, X_eval, y_eval) job; return eval predictions.

    MLP calibrators with identical parameters and input width are trained together as one
    batched model (``fit_many``), which is bit-for-bit the same as training them one by one.
    """
    out: list[tuple[np.ndarray, int | None] | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, (cal, Xc, _, _, _) in enumerate(jobs):
        if type(cal) is MLPCalibrator:
            params = cal.get_params(deep=False)
            params.pop("random_state")
            key = (repr(sorted(params.items())), Xc.shape[1])
            groups.setdefault(key, []).append(i)
            continue
        if getattr(cal, "requires_oracle", False):
            cal.fit(Xc, jobs[i][2], oracle=(jobs[i][3], jobs[i][4]))
        else:
            cal.fit(Xc, jobs[i][2])
        out[i] = (np.asarray(cal.predict(jobs[i][3]), dtype=np.float64),
                  getattr(cal, "n_parameters_", None))
    for members in groups.values():
        params = jobs[members[0]][0].get_params(deep=False)
        params.pop("random_state")
        fitted = fit_many([jobs[i][1] for i in members], [jobs[i][2] for i in members],
                          [jobs[i][0].random_state for i in members], **params)
        for i, cal in zip(members, fitted, strict=True):
            out[i] = (np.asarray(cal.predict(jobs[i][3]), dtype=np.float64), cal.n_parameters_)
    return out  # type: ignore[return-value]


def _seed_study(spec: CalibratorSpec, seed: SeedData, variants: Sequence[Variant],
                setting: Setting, tertile: str | None, n_boot: int, level: float
                ) -> tuple[SeedResult, str]:
    fm_all = feature_matrix(spec.features, seed.features)
    summary = tertile_summary(spec, fm_all, tertile)
    parts = {}
    for part in ("cal", "eval"):
        index = seed.cal_index if part == "cal" else seed.eval_index
        fm = FeatureMatrix(fm_all.X[index], fm_all.column_feature, fm_all.routing_features)
        conf, correct = seed.conf_correct(part)
        parts[part] = (fm, seed.traces.logits[index], conf, correct)
    random_state = _random_state_for(seed.seed, spec)
    jobs, keys = [], []
    for variant in [CANDIDATE, *variants]:
        inputs = {}
        for part, (fm, logits, conf, _) in parts.items():
            rng = rng_for("control-input", spec.name, variant.key, part, seed.seed)
            inputs[part] = variant_input(variant, fm, logits, conf, rng)
        cal = make_calibrator(spec, setting, random_state)
        jobs.append((cal, inputs["cal"], parts["cal"][3], inputs["eval"], parts["eval"][3]))
        keys.append(variant.key)
    fitted = _fit_predict(jobs)
    conf_eval, correct_eval = parts["eval"][2], parts["eval"][3]
    order = ["raw", *keys]
    preds = np.stack([conf_eval, *[p for p, _ in fitted]])
    if not np.isfinite(preds).all():
        bad = order[int(np.flatnonzero(~np.isfinite(preds).all(axis=1))[0])]
        raise UsageError(f"calibrator {spec.name!r} ({bad}) predicted NaN or inf")
    tiles = metrics.quantile_tiles(seed.summary(summary, "eval"), 3)
    observed, reps = bootstrap_worst_tile_ece(
        preds, correct_eval, tiles, n_boot=n_boot,
        rng=rng_for("calibrator-bootstrap", spec.name, repr(setting), seed.seed))
    probs = probabilities(parts["eval"][1])
    labels = seed.traces.labels[seed.eval_index]
    table = {key: probe_metrics(preds[j], correct_eval, probs, labels, observed[j])
             for j, key in enumerate(order)}
    n_params = {"raw": 0, **{key: n for key, (_, n) in zip(keys, fitted, strict=True)}}
    return SeedResult(seed.seed, order, observed, reps, table, n_params), summary


def routing_features(ctx: AuditContext) -> tuple[str, ...]:
    """The candidate's declared features that come from routing."""
    spec = resolve_spec(ctx.calibrator)
    cache = ctx.seeds[0].features
    return tuple(f for f in spec.features if is_routing_feature(f, cache))


def all_variants(features: Sequence[str], kinds: Sequence[str] | None = None) -> list[Variant]:
    """The controls of the calibrator audits (all of them, or only ``kinds``), fitted once
    per (calibrator, setting) and shared by every audit."""
    variants = [*twins(CAPACITY_KINDS, "capacity", tuple(features)),
                *twins(SHUFFLE_KINDS, "shuffle", tuple(features)), *probes()]
    return [v for v in variants if kinds is None or v.name in kinds]


def study(ctx: AuditContext, setting: Setting = None) -> Study:
    """The (memoised) study of the context's calibrator and the controls the run needs."""
    spec = resolve_spec(ctx.calibrator)
    variants = all_variants(routing_features(ctx), ctx.control_kinds)
    tertile = getattr(ctx.options, "tertile_summary", None) if ctx.options is not None else None
    key = ("study", spec.name, repr(setting))
    if key not in ctx.cache:
        result = Study(spec, setting, tertile or "")
        for seed in ctx.seeds:
            seed_result, summary = _seed_study(spec, seed, variants, setting, tertile,
                                               ctx.settings.n_bootstrap, 1 - ctx.settings.alpha)
            result.seeds.append(seed_result)
            result.tertile_summary = summary
        ctx.cache[key] = result
    return ctx.cache[key]


# --------------------------------------------------------------------------- decisions
@dataclass
class GainCheck:
    """Whether the candidate beats one control, with every number the verdict states."""

    control: str
    gains: list[float]
    cis: list[tuple[float, float]]
    p_raw: list[float]
    p_corrected: list[float] = field(default_factory=list)
    candidate: list[float] = field(default_factory=list)
    control_values: list[float] = field(default_factory=list)

    @property
    def mean_gain(self) -> float:
        return float(np.mean(self.gains))

    @property
    def band(self) -> float:
        """One sd across seeds of the control's metric (0 with a single seed)."""
        return float(np.std(self.control_values, ddof=1)) if len(self.control_values) > 1 else 0.0

    def decide(self, alpha: float, stability: str) -> dict[str, Any]:
        sign = [g > 0 for g in self.gains]
        ci = [bool(pc <= alpha and lo > 0) for pc, (lo, _) in
              zip(self.p_corrected, self.cis, strict=True)]
        band_ok = self.mean_gain > self.band
        return {"sign": stable(sign, stability), "ci": stable(ci, stability), "band": band_ok,
                "n_sign": sum(sign), "n_ci": sum(ci), "n": len(sign),
                "passed": stable(sign, stability) and stable(ci, stability) and band_ok}


def gain_checks(st: Study, controls: Sequence[str], alpha: float) -> list[GainCheck]:
    """Candidate vs each control in every seed, Holm-corrected across the controls per seed."""
    checks = [GainCheck(c, [], [], [], candidate=st.metric("candidate"),
                        control_values=st.metric(c)) for c in controls]
    for seed in st.seeds:
        for check in checks:
            gain, ci, p = paired_gain(seed.observed, seed.replicates, seed.index("candidate"),
                                      seed.index(check.control), 1 - alpha)
            check.gains.append(gain)
            check.cis.append(ci)
            check.p_raw.append(p)
        corrected = holm([c.p_raw[-1] for c in checks])
        for check, pc in zip(checks, corrected, strict=True):
            check.p_corrected.append(float(pc))
    return checks


def describe(check: GainCheck, decision: dict[str, Any], label: str) -> str:
    """One sentence with the numbers behind a comparison, the decisive ones first."""
    cand = np.mean(check.candidate)
    ctrl = np.mean(check.control_values)
    head = "beats" if decision["passed"] else "gain vanishes against"
    band_op = ">" if decision["band"] else "≤"
    per_seed = ", ".join(f"{g:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                         for g, (lo, hi) in zip(check.gains, check.cis, strict=True))
    return (f"{head} {label}: worst-tertile ECE {cand:.4f} (candidate) vs {ctrl:.4f}; mean gain "
            f"{check.mean_gain:+.4f} {band_op} seed band {check.band:.4f}; gain > 0 in "
            f"{decision['n_sign']}/{decision['n']} seeds, CI excludes 0 in "
            f"{decision['n_ci']}/{decision['n']} (per seed: {per_seed})")
