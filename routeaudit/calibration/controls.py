"""Twins of any calibrator: capacity-matched, shuffled-profile and matched probes (§2.6, §2.7).

A control is the candidate's own factory fed a different input matrix, so it works for every
registered calibrator, not only the reference ones. What changes is only the routing columns:

========================  =============================================================  ==========
variant                   input                                                          family
========================  =============================================================  ==========
``candidate``             the declared features                                          candidate
``zeros``                 routing columns set to 0 (constant: no information, same       capacity
                          width; after standardisation they are exactly zero)
``derived``               routing columns replaced by confidence-derived columns         capacity
                          (predictive entropy, margin, logit confidence, ...)
``shuffled_global``       routing rows permuted across all examples of the split         shuffle
``shuffled_within_bin``   routing rows permuted within confidence bins (the decisive     shuffle
                          control: exchangeable with the real profile under the null)
``confidence_only``       routing columns dropped                                        probe
``predictive_entropy``    routing columns replaced by one predictive-entropy column      probe
========================  =============================================================  ==========

A label column (a routing feature that is a label, e.g. ``top1_expert``) has a derived twin
of the same cardinality: as many equal-mass cells of a confidence-derived feature as the
label has values, so a calibrator that fits one parameter set per label value fits as many
in its twin (a continuous column would give it many more).

Each split (calibration, evaluation) is transformed separately, with its own permutation,
so a shuffled twin is fitted and evaluated on shuffled profiles alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routeaudit.calibration.features import DERIVED_FEATURES, FeatureMatrix, derived_feature
from routeaudit.metrics import quantile_tiles
from routeaudit.stats import confidence_bins


@dataclass(frozen=True)
class Variant:
    """One input variant of a calibrator; ``feature`` is the routing feature it replaces
    (None: every routing feature)."""

    name: str
    family: str
    feature: str | None = None

    @property
    def key(self) -> str:
        return self.name if self.feature is None else f"{self.name}:{self.feature}"


CANDIDATE = Variant("candidate", "candidate")
CAPACITY_KINDS = ("zeros", "derived")
SHUFFLE_KINDS = ("shuffled_global", "shuffled_within_bin")
PROBE_KINDS = ("confidence_only", "predictive_entropy")

def within_bin_permutation(conf: np.ndarray, rng: np.random.Generator, n_bins: int = 15
                           ) -> np.ndarray:
    """A permutation of 0..N-1 that only moves examples inside their confidence bin.

    One lexsort on (bin, random key): the sorted positions of each bin are refilled with a
    uniformly shuffled order of the same bin's members.
    """
    bins = confidence_bins(conf, n_bins, strategy="equal_mass")
    by_bin = np.argsort(bins, kind="stable")
    shuffled = np.lexsort((rng.random(bins.size), bins))
    perm = np.empty(bins.size, dtype=np.int64)
    perm[by_bin] = shuffled
    return perm


def variant_input(variant: Variant, fm: FeatureMatrix, logits: np.ndarray, conf: np.ndarray,
                  rng: np.random.Generator, *, n_bins: int = 15) -> np.ndarray:
    """The input matrix of ``variant`` for one split (``fm`` holds the candidate's columns)."""
    X = fm.X
    kind = variant.name
    if kind == "candidate":
        return X.copy()
    if kind in PROBE_KINDS:
        keep = np.setdiff1d(np.arange(X.shape[1]), fm.routing_columns())
        base = X[:, keep] if keep.size else conf[:, None].astype(np.float64)
        if kind == "confidence_only":
            return base.copy()
        if "predictive_entropy" in fm.column_feature:
            return base.copy()
        return np.c_[base, derived_feature("predictive_entropy", logits)]
    cols = fm.routing_columns(None if variant.feature is None else [variant.feature])
    if cols.size == 0:
        raise ValueError(f"{variant.key}: the candidate has no routing columns to replace")
    out = X.copy()
    if kind == "zeros":
        out[:, cols] = 0.0
    elif kind == "derived":
        label_cols = set(fm.routing_columns(fm.labels).tolist()) if fm.labels else set()
        for j, col in enumerate(cols):
            value = derived_feature(DERIVED_FEATURES[j % len(DERIVED_FEATURES)], logits)
            if col in label_cols:  # a label: as many equal-mass cells as it has values
                levels = max(1, np.unique(X[:, col]).size)
                value = quantile_tiles(value, levels).astype(np.float64)
            out[:, col] = value
    elif kind == "shuffled_global":
        out[:, cols] = X[rng.permutation(X.shape[0])][:, cols]
    elif kind == "shuffled_within_bin":
        out[:, cols] = X[within_bin_permutation(conf, rng, n_bins)][:, cols]
    else:
        raise ValueError(f"unknown control variant {kind!r}")
    return out


def twins(kinds: tuple[str, ...], family: str, routing_features: tuple[str, ...]
          ) -> list[Variant]:
    """One variant per (kind, routing feature): each twin replaces one feature's columns."""
    return [Variant(kind, family, feature) for feature in routing_features for kind in kinds]


def probes() -> list[Variant]:
    return [Variant(kind, "probe") for kind in PROBE_KINDS]
