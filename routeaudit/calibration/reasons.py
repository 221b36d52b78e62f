"""The words of a calibrator verdict: what each control is, and one sentence per comparison
with the numbers behind it, the decisive ones first."""

from __future__ import annotations

from typing import Any

import numpy as np

from routeaudit.calibration.decision import GainCheck

#: One phrase per probe, used in reasons and the HTML report.
DESCRIPTIONS = {
    "candidate": "the candidate on its declared features",
    "zeros": "capacity twin, routing columns set to zero",
    "derived": "capacity twin, routing columns replaced by confidence-derived ones",
    "shuffled_global": "routing rows shuffled across examples",
    "shuffled_within_bin": "routing rows shuffled within confidence bins",
    "confidence_only": "matched probe without routing columns",
    "predictive_entropy": "matched probe with predictive entropy instead of routing",
    "raw": "no calibration (the model's confidence)",
}


def label(control: str) -> str:
    """``kind[feature] (what it is)`` for a control key such as ``zeros:depth_variance``."""
    kind, _, feature = control.partition(":")
    text = DESCRIPTIONS.get(kind, kind)
    return f"{kind}{'[' + feature + ']' if feature else ''} ({text})"


def describe(check: GainCheck, decision: dict[str, Any], control_label: str) -> str:
    """One sentence with the numbers behind a comparison, the decisive ones first."""
    cand = np.mean(check.candidate)
    ctrl = np.mean(check.control_values)
    head = "beats" if decision["passed"] else "gain vanishes against"
    band_op = ">" if decision["band"] else "≤"
    per_seed = ", ".join(f"{g:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                         for g, (lo, hi) in zip(check.gains, check.cis, strict=True))
    return (f"{head} {control_label}: worst-tertile ECE {cand:.4f} (candidate) vs {ctrl:.4f}; mean gain "
            f"{check.mean_gain:+.4f} {band_op} seed band {check.band:.4f}; gain > 0 in "
            f"{decision['n_sign']}/{decision['n']} seeds, CI excludes 0 in "
            f"{decision['n_ci']}/{decision['n']} (per seed: {per_seed})")
