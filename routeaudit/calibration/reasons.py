"""The words of a calibrator verdict: what each control is, and one sentence per comparison
with the numbers behind it, the decisive ones first."""

from __future__ import annotations

import numpy as np

from routeaudit.calibration.decision import GainCheck
from routeaudit.stats.evidence import p_text, scale_text

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


def describe(check: GainCheck, status: str, control_label: str, *, alpha: float,
             margin: float, p_positive: float, p_below: float, n_eval: int | None) -> str:
    """One sentence with the numbers behind a comparison, the decisive ones first."""
    ev = check.evidence
    lo, hi = ev.interval(alpha)
    cand = np.mean(check.candidate)
    ctrl = np.mean(check.control_values)
    level = f"{100 * (1 - 2 * alpha):g}%"
    head = {"pass": "beats", "fail": "gain vanishes against",
            "inconclusive": "not decided against"}[status]
    if status == "pass":
        verdict = f"interval > 0 (Holm p {p_text(p_positive)} ≤ {alpha:g})"
    elif status == "fail":
        verdict = (f"interval lies below the margin {margin:g} (Holm p {p_text(p_below)} ≤ "
                   f"{alpha:g}): the gain is absent or too small to matter")
    elif p_positive <= alpha:
        verdict = (f"> 0 pooled (Holm p {p_text(p_positive)}), but not positive in every seed "
                   f"(--stability)")
    else:
        verdict = (f"shown neither > 0 (Holm p {p_text(p_positive)}) nor below the margin "
                   f"{margin:g} (p {p_text(p_below)})")
    per_seed = ", ".join(f"{g:+.4f} [{a:+.4f}, {b:+.4f}]"
                         for g, (a, b) in zip(check.gains, check.cis, strict=True))
    text = (f"{head} {control_label}: worst-tertile ECE {cand:.4f} (candidate) vs {ctrl:.4f}; "
            f"pooled gain {ev.estimate:+.4f}, {level} interval [{lo:+.4f}, {hi:+.4f}] "
            f"{verdict}; gain > 0 in {ev.n_positive}/{ev.n_seeds} seeds (per seed: {per_seed})")
    if status == "inconclusive":
        text += "; " + scale_text(ev, margin, alpha, n_eval)
    return text
