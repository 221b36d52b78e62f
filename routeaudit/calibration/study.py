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

import hashlib
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
    replicates: np.ndarray  # [n_boot, probes], paired; NaN for "raw" (never compared)
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


Fitted = tuple[np.ndarray, "int | None"]

#: Most bytes of predictions a study keeps for reuse across settings (a run on millions of
#: examples reuses what fits in it and recomputes the rest).
MEMO_BYTES = 256 << 20


class ResultMemo(dict):
    """Fit results kept for reuse (:func:`fit_predict`), up to ``budget`` bytes of arrays."""

    def __init__(self, budget: int = MEMO_BYTES) -> None:
        super().__init__()
        self.budget = budget
        self.nbytes = 0

    def put(self, key: Any, result: Fitted) -> None:
        if key in self or self.nbytes + result[0].nbytes > self.budget:
            return
        self[key] = result
        self.nbytes += result[0].nbytes


def fit_predict(jobs: Sequence[FitJob], memo: ResultMemo | None = None,
                data_keys: Sequence[Any] | None = None) -> list[Fitted]:
    """Fit every job; return its evaluation predictions and ``n_parameters_``.

    Calibrators whose class defines ``fit_batch`` (every :class:`BaseCalibrator` does) are
    handed to it together, one call per class, so a class that can train many instances at
    once does (the MLP trains identical configurations as one batched model, bit for bit the
    same as one by one). Calibrators that need the oracle are fitted one by one with it.

    ``memo`` with ``data_keys`` (one hashable key per job; jobs with equal keys have the same
    data, e.g. :func:`data_key`) reuses the result of an equivalent estimator
    (:func:`fit_key`) fitted on the same data before: the fit is skipped when the unfitted
    estimator is equivalent to one already fitted, the prediction when the fitted one is
    (e.g. a CV-chosen bandwidth the grid has already fitted). The result is the one the fit
    would give, bit for bit.
    """
    jobs = list(jobs)  # fitted instances replace the templates below (fit_batch may copy)
    if memo is None or data_keys is None:  # nothing is reused
        memo, data_keys = ResultMemo(budget=0), [None] * len(jobs)

    def key(i: int) -> Any:
        k = fit_key(jobs[i].calibrator) if data_keys[i] is not None else None
        return None if k is None else (data_keys[i], k)

    def scored(i: int) -> Fitted:
        k = key(i)  # after the fit: the estimator it turned out to be
        if k is not None and k in memo:
            return memo[k]
        result = _scored(jobs[i].calibrator, jobs[i])
        if k is not None:
            memo.put(k, result)
        return result

    out: list[Fitted | None] = [None] * len(jobs)
    batches: dict[type, list[int]] = {}
    befores = [key(i) for i in range(len(jobs))]  # before the fit: the estimator asked for
    first: dict[Any, int] = {}  # key -> the job of this call that fits it
    for i, job in enumerate(jobs):
        cal = job.calibrator
        before = befores[i]
        if before is not None:
            if before in memo:
                out[i] = memo[before]
                continue
            if before in first:  # the same fit as an earlier job of this call
                continue
            first[before] = i
        if getattr(cal, "requires_oracle", False):
            cal.fit(job.X_cal, job.y_cal, oracle=(job.X_eval, job.y_eval))
            out[i] = scored(i)
        elif callable(getattr(type(cal), "fit_batch", None)):
            batches.setdefault(type(cal), []).append(i)
        else:
            cal.fit(job.X_cal, job.y_cal)
            out[i] = scored(i)
    for cls, members in batches.items():
        fitted = cls.fit_batch([jobs[i].calibrator for i in members],
                               [jobs[i].X_cal for i in members], [jobs[i].y_cal for i in members])
        for i, cal in zip(members, fitted, strict=True):
            jobs[i] = jobs[i]._replace(calibrator=cal)
            out[i] = scored(i)
    for i, before in enumerate(befores):
        if before is not None:
            if out[i] is None:
                out[i] = out[first[before]]
            memo.put(before, out[i])  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def _scored(cal: Any, job: FitJob) -> Fitted:
    return np.asarray(cal.predict(job.X_eval), dtype=np.float64), getattr(cal, "n_parameters_", None)


def data_key(job: FitJob) -> bytes:
    """A digest of a job's data (both halves, with shapes and dtypes): equal digests, equal
    data. Content, not names: a twin whose input equals another probe's (e.g. a derived twin
    that puts predictive entropy where the only routing column was, and the
    predictive-entropy probe) is the same fit."""
    digest = hashlib.blake2b(digest_size=32)
    for a in job[1:]:
        a = np.ascontiguousarray(a)
        digest.update(repr((a.shape, a.dtype.str)).encode())
        digest.update(a.tobytes())
    return digest.digest()


def fit_key(cal: Any) -> Any:
    """What determines a calibrator's predictions besides its data, or None (never memoised).

    Only calibrators that define ``equivalent_params()`` (parameters normalised so that two
    spellings of the same estimator, e.g. ``bandwidth="scott"`` and ``"scott×1"``, compare
    equal; once fitted, a data-chosen bandwidth counts as the fixed one it chose) are
    memoised: the sensitivity audit refits the calibrator as registered at the grid value it
    already equals, and CV and the oracle choose a grid value.
    """
    method = getattr(cal, "equivalent_params", None)
    if not callable(method):
        return None
    return (type(cal).__qualname__, repr(sorted(method().items())))


@dataclass
class _SeedJobs:
    """One seed's probes, ready to fit: the jobs (candidate first) and what scoring needs."""

    seed: SeedData
    keys: list[str]
    jobs: list[FitJob]
    conf_eval: np.ndarray
    correct_eval: np.ndarray
    logits_eval: np.ndarray
    summary: str


def _seed_jobs(spec: CalibratorSpec, seed: SeedData, variants: Sequence[Variant],
               setting: Setting, tertile: str | None, inputs: dict | None = None) -> _SeedJobs:
    """The jobs of one seed at ``setting``. The input matrices do not depend on the setting:
    ``inputs`` (a dict kept across settings) holds them, and every job gets its own copy."""
    key = (seed.seed, tuple(v.key for v in variants), tertile)
    made = None if inputs is None else inputs.get(key)
    if made is None:
        made = _seed_inputs(spec, seed, variants, tertile)
        if inputs is not None and sum(a.nbytes for pair in made[1] for a in pair) <= MEMO_BYTES // 4:
            inputs[key] = made
    keys, matrices, (conf_eval, correct_cal, correct_eval, logits_eval), summary = made
    random_state = random_state_for(seed.seed, spec)
    jobs = [FitJob(make_calibrator(spec, setting, random_state), X_cal.copy(), correct_cal,
                   X_eval.copy(), correct_eval) for X_cal, X_eval in matrices]
    return _SeedJobs(seed, list(keys), jobs, conf_eval, correct_eval, logits_eval, summary)


def _seed_inputs(spec: CalibratorSpec, seed: SeedData, variants: Sequence[Variant],
                 tertile: str | None) -> tuple:
    """Probe keys, (calibration, evaluation) input of each probe, the evaluation split's
    confidence, correctness and logits, and the tertile summary."""
    fm_all = feature_matrix(spec.features, seed.features)
    summary = tertile_summary(spec, fm_all, tertile, frozenset(fm_all.labels))
    parts = {}
    for part in ("cal", "eval"):
        index = seed.cal_index if part == "cal" else seed.eval_index
        fm = FeatureMatrix(fm_all.X[index], fm_all.column_feature, fm_all.routing_features,
                           fm_all.labels)
        conf, correct = seed.conf_correct(part)
        parts[part] = (fm, seed.traces.logits[index], conf, correct)
    keys, matrices = [], []
    for variant in [CANDIDATE, *variants]:
        made = {}
        for part, (fm, logits, conf, _) in parts.items():
            rng = rng_for("control-input", spec.name, variant.key, part, seed.seed)
            made[part] = variant_input(variant, fm, logits, conf, rng)
        keys.append(variant.key)
        matrices.append((made["cal"], made["eval"]))
    split = (parts["eval"][2], parts["cal"][3], parts["eval"][3], parts["eval"][1])
    return tuple(keys), matrices, split, summary


def _score(spec: CalibratorSpec, prepared: _SeedJobs, fitted: Sequence[Fitted],
           setting: Setting, n_boot: int, metric_memo: dict | None = None) -> SeedResult:
    """Headline with its paired bootstrap, and every reported metric, of one seed's probes.

    ``metric_memo`` reuses the reported metrics of a prediction vector already scored on
    the same evaluation split (the same numbers: they are a function of the vector and the
    split alone); the headline and its bootstrap are always computed.
    """
    seed, keys = prepared.seed, prepared.keys
    order = ["raw", *keys]
    preds = np.stack([prepared.conf_eval, *[p for p, _ in fitted]])
    if not np.isfinite(preds).all():
        bad = order[int(np.flatnonzero(~np.isfinite(preds).all(axis=1))[0])]
        raise UsageError(f"calibrator {spec.name!r} ({bad}) predicted NaN or inf")
    correct_eval = prepared.correct_eval
    tiles = metrics.quantile_tiles(seed.summary(prepared.summary, "eval"), 3)
    # The fitted probes are bootstrapped together (paired); no decision compares against
    # "raw", so it gets its observed headline only (the same function, one replicate, thrown
    # away) and NaN replicates. Each probe's replicates depend only on its predictions and
    # the shared resamples, so leaving rows out changes no other probe's numbers.
    # Probes with identical predictions (e.g. a derived twin whose input is the
    # predictive-entropy probe's) are resampled once and their columns shared.
    groups = seed.groups("eval")
    fitted_preds = preds[1:]
    # each probe's first probe with the same bytes (a dict of row bytes: np.unique(axis=0)
    # sorts structured rows, ~40 ms here; byte equality only splits ±0.0, whose replicates
    # are equal anyway)
    first_with: dict[bytes, int] = {}
    first = [first_with.setdefault(row.tobytes(), j) for j, row in enumerate(fitted_preds)]
    unique = np.unique(first)  # bootstrap rows in probe order
    column = np.searchsorted(unique, first)
    observed, reps = bootstrap_worst_tile_ece(
        fitted_preds[unique], correct_eval, tiles, n_boot=n_boot, groups=groups,
        rng=rng_for("calibrator-bootstrap", spec.name, repr(setting), seed.seed))
    observed, reps = observed[column], reps[:, column]
    raw_observed, _ = bootstrap_worst_tile_ece(preds[:1], correct_eval, tiles, n_boot=1,
                                               groups=groups, rng=0)
    observed = np.concatenate([raw_observed, observed])
    reps = np.column_stack([np.full(reps.shape[0], np.nan), reps])
    probs = None
    labels = seed.traces.labels[seed.eval_index]
    # metric memo keys: a digest of the evaluation split (examples, labels, correctness) and
    # of the prediction vector (256 bits: equal digests, equal inputs)
    split = hashlib.blake2b(digest_size=32)
    for a in (seed.eval_index, labels, correct_eval, prepared.logits_eval):
        split.update(np.ascontiguousarray(a).tobytes())
    table = {}
    for j, key in enumerate(order):
        digest = split.copy()
        digest.update(preds[j].tobytes())
        others = None if metric_memo is None else metric_memo.get(digest.digest())
        if others is None:
            if probs is None:
                probs = metrics.softmax(prepared.logits_eval)
            others = probe_metrics(preds[j], correct_eval, probs, labels, observed[j])
            others.pop(HEADLINE)
            if metric_memo is not None:
                metric_memo[digest.digest()] = others
        table[key] = {HEADLINE: float(observed[j]), **others}
    n_params = {"raw": 0, **{key: n for key, (_, n) in zip(keys, fitted, strict=True)}}
    return SeedResult(seed.seed, order, observed, reps, table, n_params)


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
    """The (memoised) study of the context's calibrator and the controls the run needs.

    Every seed's probes are fitted in one :func:`fit_predict` call (so the batched MLP
    trains all seeds × variants × restarts together); fits and reported metrics that an
    earlier setting already computed are reused (:func:`fit_key`).
    """
    spec = resolve_spec(ctx.calibrator)
    variants = all_variants(routing_features(ctx), ctx.control_kinds)
    tertile = ctx.settings.tertile_summary
    key = ("study", spec.name, repr(setting))
    if key not in ctx.cache:
        result = Study(spec, setting, tertile or "")
        inputs = ctx.cache.setdefault(("study-inputs", spec.name), {})
        prepared = [_seed_jobs(spec, seed, variants, setting, tertile, inputs)
                    for seed in ctx.seeds]
        names = ", ".join(str(seed.seed) for seed in ctx.seeds)
        ctx.step(f"training {spec.name} and {len(variants)} controls, seeds {names}")
        jobs = [job for p in prepared for job in p.jobs]
        data_keys = [data_key(job) for job in jobs]
        fitted = fit_predict(jobs, ctx.cache.setdefault(("study-fits", spec.name), ResultMemo()),
                             data_keys)
        metric_memo = ctx.cache.setdefault(("study-metrics", spec.name), {})
        start = 0
        for p in prepared:
            ctx.step(f"bootstrap of {spec.name} and its controls, seed {p.seed.seed}")
            chunk = fitted[start : start + len(p.jobs)]
            start += len(p.jobs)
            result.seeds.append(_score(spec, p, chunk, setting, ctx.settings.n_bootstrap,
                                       metric_memo))
            result.tertile_summary = p.summary
        ctx.cache[key] = result
    return ctx.cache[key]
