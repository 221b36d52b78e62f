"""Reference calibrators and the calibrator contract (scikit-learn style, top-label).

* contract: :class:`BaseCalibrator`, :func:`clone`, :func:`calibrator` (registration),
  :class:`CalibratorSpec`, :class:`NotFittedError`, :func:`check_calibrator`;
* confidence-only: :class:`RawCalibrator`, :class:`TemperatureScaling` (top-label, on
  logits), :class:`LogisticCalibrator`, :class:`HistogramBinning`, :class:`IsotonicCalibrator`;
* routing-aware: :class:`NadarayaWatson` / :class:`ARCondCal` (docs/methods.md §2.6;
  estimators in ``kernel``, the evaluation engine in ``kde``, bandwidth selection in
  ``bandwidth``) and :class:`MLPCalibrator` with the batched trainer :func:`fit_many`
  (§2.7; the estimator in ``mlp``, training in ``mlp_training`` on the compiled CPU trainer
  ``mlp_compiled`` or the batched torch trainer ``mlp_torch``);
* routing-robust (MoE): :class:`RoutingRobustCalibrator` (docs/methods.md §4: per-expert
  Platt scaling fitted against the worst routing shift; ``routing_robust``, and its control
  without the adversary ``per_expert_platt``).

``REFERENCE_CALIBRATORS`` maps names to the registered specs of the reference factories.
Importing this package loads neither torch nor the heavy scipy submodules: they are imported
where a kernel is evaluated, a temperature is fitted or an MLP is trained.
"""

from __future__ import annotations

from routeaudit.calibrators.bandwidth import scott_factor
from routeaudit.calibrators.base import (
    BaseCalibrator,
    CalibratorSpec,
    NotFittedError,
    calibrator,
    check_is_fitted,
    clone,
    find_calibrators,
    spec_of,
)
from routeaudit.calibrators.checks import calibrator_checks, check_calibrator
from routeaudit.calibrators.kde import kernel_sums
from routeaudit.calibrators.kernel import (
    ARCondCal,
    NadarayaWatson,
    ar_condcal,
    nw_confidence,
    nw_predictive_entropy,
    nw_r_agg,
    oracle_bandwidth,
)
from routeaudit.calibrators.mlp import MLPCalibrator, fit_many, mlp_profile
from routeaudit.calibrators.robust import RoutingRobustCalibrator, per_expert_platt, routing_robust
from routeaudit.calibrators.simple import (
    HistogramBinning,
    IsotonicCalibrator,
    LogisticCalibrator,
    RawCalibrator,
    TemperatureScaling,
    histogram,
    isotonic,
    logistic,
    raw,
    temperature,
)

REFERENCE_CALIBRATORS: dict[str, CalibratorSpec] = {
    spec.name: spec
    for spec in (
        spec_of(f)
        for f in (
            raw,
            temperature,
            logistic,
            histogram,
            isotonic,
            nw_confidence,
            ar_condcal,
            nw_predictive_entropy,
            nw_r_agg,
            mlp_profile,
            routing_robust,
            per_expert_platt,
        )
    )
    if spec is not None
}

__all__ = [
    "REFERENCE_CALIBRATORS",
    "ARCondCal",
    "BaseCalibrator",
    "CalibratorSpec",
    "HistogramBinning",
    "IsotonicCalibrator",
    "LogisticCalibrator",
    "MLPCalibrator",
    "NadarayaWatson",
    "NotFittedError",
    "RawCalibrator",
    "RoutingRobustCalibrator",
    "TemperatureScaling",
    "calibrator",
    "calibrator_checks",
    "check_calibrator",
    "check_is_fitted",
    "clone",
    "find_calibrators",
    "fit_many",
    "kernel_sums",
    "oracle_bandwidth",
    "scott_factor",
    "spec_of",
]
