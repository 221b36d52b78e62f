"""What is scored for every probe of a calibrator study (docs/methods.md §2.2, §2.3, §2.7).

The headline is worst-routing-tertile ECE15; global ECE15, MCE, NLL, Brier, classwise ECE
and SmoothECE of every probe are reported next to it. All of them come from
:mod:`routeaudit.metrics`.
"""

from __future__ import annotations

import numpy as np

import routeaudit.metrics as metrics

#: The metric the decision rule compares (its paired bootstrap is computed per seed).
HEADLINE = "worst_tertile_ece"


def full_vector(probs: np.ndarray, calibrated: np.ndarray) -> np.ndarray:
    """A probability vector from a top-label probe (docs/methods.md §2.2, classwise ECE).

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
