"""Compiled (numba) loops of the calibrators: the MLP's Adam update.

Why a module of its own: these loops replace torch expressions that make one pass over
memory per element-wise operation (and one dispatch each) with one pass, and they must give
the same numbers bit for bit. Each kernel performs the operations of the code it
replaces, one IEEE rounding each, in the same order per output element (no fused
multiply-add: numba does not contract without ``fastmath``; ``error_model="numpy"`` only
drops Python's zero-division checks, which keep loops from vectorising), so results are
identical, not merely close. ``tests/test_battery_speed_calibrators.py`` compares the
kernels with the expressions they replace.

numba is imported when a kernel is first needed (by this module's functions; the module is
imported only by the MLP trainer), so ``import routeaudit.calibrators`` stays light.
:func:`kernel` returns None when numba is missing, JIT is disabled or ``ROUTEAUDIT_NUMBA=0``
(the switch of the statistics kernels): callers then run the torch expression.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any


def _adam_moments_kernel(p, g, m, v, rows, wd, b1, omb1, b2, omb2):  # pragma: no cover
    """Adam's moments on rows ``rows`` of [B, P] arrays, in place: ``g += p * wd`` (when wd),
    ``m = m * b1 + g * omb1``, ``v = v * b2 + (g * g) * omb2`` (the torch expressions of
    ``_MaskedAdam.step``)."""
    n = p.shape[1]
    for k in range(rows.size):
        pr, gr, mr, vr = p[rows[k]], g[rows[k]], m[rows[k]], v[rows[k]]
        if wd != 0:
            for j in range(n):
                gr[j] = gr[j] + pr[j] * wd
        for j in range(n):
            mr[j] = mr[j] * b1 + gr[j] * omb1
        for j in range(n):
            vr[j] = vr[j] * b2 + (gr[j] * gr[j]) * omb2


def _adam_update_kernel(p, m, root, rows, step, bc2s, eps):  # pragma: no cover - compiled
    """``p -= m / (root / bc2s + eps) * step`` on rows ``rows`` (``root[k]``: √v of row
    ``rows[k]``, ``step``/``bc2s`` per row)."""
    n = p.shape[1]
    for k in range(rows.size):
        pr, mr, rr = p[rows[k]], m[rows[k]], root[k]
        st, bc = step[k], bc2s[k]
        for j in range(n):
            pr[j] = pr[j] - (mr[j] / (rr[j] / bc + eps)) * st


_PYTHON: dict[str, Callable[..., Any]] = {
    "adam_moments": _adam_moments_kernel,
    "adam_update": _adam_update_kernel,
}


def enabled() -> bool:
    """Whether compiled kernels run (numba importable, JIT on, ``ROUTEAUDIT_NUMBA`` not 0)."""
    if os.environ.get("ROUTEAUDIT_NUMBA", "1") == "0":
        return False
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a core dependency
        return False
    return not numba.config.DISABLE_JIT


@functools.cache
def _compiled(name: str) -> Callable[..., Any]:
    import numba

    fn = _PYTHON[name]
    try:
        return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:  # pragma: no cover - no writable cache directory: compile per process
        return numba.njit(cache=False, nogil=True, error_model="numpy")(fn)


def kernel(name: str) -> Callable[..., Any] | None:
    """The compiled kernel ``name`` (``adam_moments``, ``adam_update``), or None when
    compiled kernels are off (:func:`enabled`)."""
    return _compiled(name) if enabled() else None
