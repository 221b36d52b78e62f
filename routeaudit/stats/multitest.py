"""Multiple-testing corrections (docs/methods.md §5): Holm (FWER, the default across the cells
of an audit) and Benjamini–Hochberg (FDR). NaN p-values (tests that could not run) pass
through and do not count towards m.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["benjamini_hochberg", "holm"]


def _adjust(pvalues: Sequence[float] | np.ndarray, method: str) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.reshape(-1)
    out = np.full(flat.shape, np.nan)
    keep = ~np.isnan(flat)
    q = flat[keep]
    if q.size and (q.min() < 0.0 or q.max() > 1.0):
        raise ValueError("p-values must lie in [0, 1] (NaN is allowed and passed through)")
    m = q.size
    if m:
        order = np.argsort(q, kind="stable")
        ranked = q[order]
        rank = np.arange(1, m + 1)
        if method == "holm":
            adj = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * ranked))
        else:
            adj = np.minimum.accumulate(np.minimum(1.0, m * ranked / rank)[::-1])[::-1]
        fixed = np.empty(m)
        fixed[order] = adj
        out[np.flatnonzero(keep)] = fixed
    return out.reshape(p.shape)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (FWER), monotone in the raw p and capped at 1.

    NaN entries (tests that could not run) stay NaN and do not count towards m.
    """
    return _adjust(pvalues, "holm")


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg step-up adjusted p-values (FDR); NaN passes through, not in m."""
    return _adjust(pvalues, "bh")
