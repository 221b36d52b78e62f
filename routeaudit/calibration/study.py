"""Fit a calibrator and its controls on every seed and score them on the evaluation split.

One :class:`Study` per (calibrator, setting) is shared by every audit that asks for it (it is
memoised on the audit context), so the capacity, shuffle and probe audits see the same fitted
models and the same paired bootstrap. Per seed: the calibrator and every requested variant are
fitted on the calibration half and predict the evaluation half; worst-routing-tertile ECE15
(the headline; tertiles of the model's own routing summary on the evaluation split, shared by
all probes) and its paired bootstrap are computed for all of them at once, with the other
metrics of :mod:`routeaudit.calibration.scores` alongside. Calibrators whose class can fit
many instances at once (``fit_batch``, e.g. the batched MLP) are fitted together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

import routeaudit.metrics as metrics
from routeaudit.audit import AuditContext, SeedData
from routeaudit.calibration.controls import (
    CANDIDATE,
    CAPACITY_KINDS,
    SHUFFLE_KINDS,
    Variant,
    probes,
    twins,
    variant_input,
)
from routeaudit.calibration.features import FeatureMatrix, feature_matrix, is_routing_feature
from routeaudit.calibration.scores import HEADLINE, probe_metrics
from routeaudit.calibrators.base import CalibratorSpec, spec_of
from routeaudit.errors import UsageError
from routeaudit.stats import bootstrap_worst_tile_ece, rng_for

Setting = tuple[str, Any] | None


def resolve_spec(calibrator: Any) -> CalibratorSpec:
    """The CalibratorSpec of a registered factory (features must be declared)."""
    spec = spec_of(calibrator)
    if spec is None:
        raise UsageError(f"{calibrator!r} is not a registered calibrator: decorate the factory "
                         "with @routeaudit.calibrator(features=[...]) to declare its inputs")
    return spec


def tertile_summary(spec: CalibratorSpec, fm: FeatureMatrix, requested: str | None,
                    categorical: frozenset[str] = frozenset()) -> str:
    """Which routing summary defines the worst-tertile partition.

    The user's choice, else the candidate's first scalar routing feature that is not a
    label (an expert index has no order, so its "tertiles" mean nothing), else ``r_agg``
    (for profile-only or label-only candidates).
    """
    if requested:
        return requested
    for name in fm.routing_features:
        if name not in categorical and np.count_nonzero(np.asarray(fm.column_feature) == name) == 1:
            return name
    return "r_agg"


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


def random_state_for(seed: int, spec: CalibratorSpec) -> int:
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


class FitJob(NamedTuple):
    """One probe to fit on the calibration half and score on the evaluation half."""

    calibrator: Any
    X_cal: np.ndarray
    y_cal: np.ndarray
    X_eval: np.ndarray
    y_eval: np.ndarray


def fit_predict(jobs: Sequence[FitJob]) -> list[tuple[np.ndarray, int | None]]:
    """Fit every job; return its evaluation predictions and ``n_parameters_``.

    Calibrators whose class defines ``fit_batch`` (every :class:`BaseCalibrator` does) are
    handed to it together, one call per class, so a class that can train many instances at
    once does (the MLP trains identical configurations as one batched model, bit for bit the
    same as one by one). Calibrators that need the oracle are fitted one by one with it.
    """
    out: list[tuple[np.ndarray, int | None] | None] = [None] * len(jobs)
    batches: dict[type, list[int]] = {}
    for i, job in enumerate(jobs):
        cal = job.calibrator
        if getattr(cal, "requires_oracle", False):
            cal.fit(job.X_cal, job.y_cal, oracle=(job.X_eval, job.y_eval))
            out[i] = _scored(cal, job)
        elif callable(getattr(type(cal), "fit_batch", None)):
            batches.setdefault(type(cal), []).append(i)
        else:
            cal.fit(job.X_cal, job.y_cal)
            out[i] = _scored(cal, job)
    for cls, members in batches.items():
        fitted = cls.fit_batch([jobs[i].calibrator for i in members],
                               [jobs[i].X_cal for i in members], [jobs[i].y_cal for i in members])
        for i, cal in zip(members, fitted, strict=True):
            out[i] = _scored(cal, jobs[i])
    return out  # type: ignore[return-value]


def _scored(cal: Any, job: FitJob) -> tuple[np.ndarray, int | None]:
    return np.asarray(cal.predict(job.X_eval), dtype=np.float64), getattr(cal, "n_parameters_", None)


def _seed_study(spec: CalibratorSpec, seed: SeedData, variants: Sequence[Variant],
                setting: Setting, tertile: str | None, n_boot: int, level: float
                ) -> tuple[SeedResult, str]:
    fm_all = feature_matrix(spec.features, seed.features)
    summary = tertile_summary(spec, fm_all, tertile, frozenset(fm_all.labels))
    parts = {}
    for part in ("cal", "eval"):
        index = seed.cal_index if part == "cal" else seed.eval_index
        fm = FeatureMatrix(fm_all.X[index], fm_all.column_feature, fm_all.routing_features,
                           fm_all.labels)
        conf, correct = seed.conf_correct(part)
        parts[part] = (fm, seed.traces.logits[index], conf, correct)
    random_state = random_state_for(seed.seed, spec)
    jobs, keys = [], []
    for variant in [CANDIDATE, *variants]:
        inputs = {}
        for part, (fm, logits, conf, _) in parts.items():
            rng = rng_for("control-input", spec.name, variant.key, part, seed.seed)
            inputs[part] = variant_input(variant, fm, logits, conf, rng)
        cal = make_calibrator(spec, setting, random_state)
        jobs.append(FitJob(cal, inputs["cal"], parts["cal"][3], inputs["eval"], parts["eval"][3]))
        keys.append(variant.key)
    fitted = fit_predict(jobs)
    conf_eval, correct_eval = parts["eval"][2], parts["eval"][3]
    order = ["raw", *keys]
    preds = np.stack([conf_eval, *[p for p, _ in fitted]])
    if not np.isfinite(preds).all():
        bad = order[int(np.flatnonzero(~np.isfinite(preds).all(axis=1))[0])]
        raise UsageError(f"calibrator {spec.name!r} ({bad}) predicted NaN or inf")
    tiles = metrics.quantile_tiles(seed.summary(summary, "eval"), 3)
    observed, reps = bootstrap_worst_tile_ece(
        preds, correct_eval, tiles, n_boot=n_boot, groups=seed.groups("eval"),
        rng=rng_for("calibrator-bootstrap", spec.name, repr(setting), seed.seed))
    probs = metrics.softmax(parts["eval"][1])
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
    tertile = ctx.settings.tertile_summary
    key = ("study", spec.name, repr(setting))
    if key not in ctx.cache:
        result = Study(spec, setting, tertile or "")
        for seed in ctx.seeds:
            ctx.step(f"training {spec.name} and {len(variants)} controls, seed {seed.seed}")
            seed_result, summary = _seed_study(spec, seed, variants, setting, tertile,
                                               ctx.settings.n_bootstrap, 1 - ctx.settings.alpha)
            result.seeds.append(seed_result)
            result.tertile_summary = summary
        ctx.cache[key] = result
    return ctx.cache[key]
