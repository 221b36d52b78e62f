"""Calibrator input matrices: the declared features of a calibrator, as columns.

A calibrator declares its inputs by name (``["confidence", "depth_variance"]``). This module
turns those names into an ``[N, d]`` matrix and remembers which columns came from which
feature and whether that feature is *routing* (derived from the routing trace) or *output*
(derived from the logits alone). The controls need exactly that distinction: a twin replaces
routing columns and keeps everything else.

Feature names: any summary in the registry (scalar: one column; ``"profile"``: the H_1..H_L
columns), ``"logits"`` (the K logit columns, an output feature), and the confidence-derived
substitutes below (output features), which capacity twins use in place of routing columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import routeaudit.metrics as metrics
from routeaudit.errors import UsageError
from routeaudit.summaries import FeatureCache, SummaryRegistry
from routeaudit.traces import TraceSet

#: Output-only features a capacity twin may put where routing columns were, in this order
#: (cycled when more routing columns must be replaced than there are substitutes).
DERIVED_FEATURES = ("predictive_entropy", "margin", "logit_confidence", "second_probability",
                    "gini")


def derived_feature(name: str, logits: np.ndarray) -> np.ndarray:
    """A confidence-derived feature computed from the logits only (never from routing)."""
    if name == "predictive_entropy":
        return metrics.predictive_entropy(logits)
    p = metrics.softmax(logits)
    top2 = -np.sort(-p, axis=1)[:, :2] if p.shape[1] >= 2 else np.c_[p, np.zeros(len(p))]
    if name == "margin":
        return top2[:, 0] - top2[:, 1]
    if name == "logit_confidence":
        c = np.clip(top2[:, 0], 1e-12, 1 - 1e-12)
        return np.log(c) - np.log1p(-c)
    if name == "second_probability":
        return top2[:, 1]
    if name == "gini":
        return 1.0 - (p * p).sum(axis=1)
    raise UsageError(f"unknown derived feature {name!r}; known: {', '.join(DERIVED_FEATURES)}")


@dataclass(frozen=True)
class FeatureMatrix:
    """Columns of one calibrator input, with their provenance."""

    X: np.ndarray  # [N, d] float64
    column_feature: tuple[str, ...]  # feature name of each column
    routing_features: tuple[str, ...]  # declared features that are routing-derived
    labels: tuple[str, ...] = ()  # routing features that are labels (an expert index)

    def columns_of(self, feature: str) -> np.ndarray:
        """Indices of the columns that came from ``feature``."""
        return np.flatnonzero(np.asarray(self.column_feature) == feature)

    def routing_columns(self, features: Sequence[str] | None = None) -> np.ndarray:
        """Indices of the columns of the given routing features (default: all of them)."""
        wanted = set(self.routing_features if features is None else features)
        return np.flatnonzero([f in wanted for f in self.column_feature])


def is_routing_feature(name: str, cache: FeatureCache) -> bool:
    """True when a feature is computed from the routing trace."""
    if name == "logits" or name in DERIVED_FEATURES:
        return False
    return cache.registry.get(name).kind == "routing"


def feature_matrix(features: Sequence[str], cache: FeatureCache) -> FeatureMatrix:
    """The declared features of a calibrator as an ``[N, d]`` float64 matrix."""
    if not features:
        raise UsageError("a calibrator must declare at least one feature")
    blocks: list[np.ndarray] = []
    owners: list[str] = []
    routing: list[str] = []
    for name in features:
        if name == "logits":
            block = cache.traces.logits.astype(np.float64)
        elif name in DERIVED_FEATURES and name not in cache.registry:
            block = derived_feature(name, cache.traces.logits)
        else:
            block = cache[name]
        block = block.reshape(block.shape[0], -1)
        if block.shape[1] == 0:
            raise UsageError(f"feature {name!r} has no columns for these traces "
                             "(no layer has two or more sources)")
        blocks.append(block)
        owners.extend([name] * block.shape[1])
        if is_routing_feature(name, cache) and name not in routing:
            routing.append(name)
    labels = tuple(name for name in routing if cache.registry.get(name).categorical)
    return FeatureMatrix(np.concatenate(blocks, axis=1), tuple(owners), tuple(routing), labels)


def check_features(features: Sequence[str], traces: TraceSet, registry: SummaryRegistry) -> None:
    """Raise a UsageError naming what exists unless every declared feature can be computed
    for ``traces`` (checked once, before any audit runs)."""
    for name in features:
        if name == "logits" or (name in DERIVED_FEATURES and name not in registry):
            continue
        try:
            registry.check(name, traces)
        except UsageError as exc:
            raise UsageError(f"calibrator feature {name!r}: {exc}") from exc
