"""How much routing depends on the input, and whether it follows a declared schedule.

A routing-aware claim needs routing that varies across examples. The measure is, per routing
layer, the mean total-variation distance of an example's routing from the mean routing,
``TV_l = mean_i ½ Σ_k |α_ik − ᾱ_k|`` (0 for content-independent routing, at most 1). A model
adapter may also declare an analytic routing schedule (``TraceMeta.schedule``, e.g. the
recency-bias schedule of a wrapped model, methods.md §3.3); then the observed routing is
compared with it element by element.
"""

from __future__ import annotations

import numpy as np

from routeaudit.traces import TraceSet

#: Below this largest per-layer TV the routing is treated as content-independent.
TV_MIN = 1e-4


def per_example_tv(traces: TraceSet) -> np.ndarray:
    """½ Σ_k |α_ik − ᾱ_k| for every example and layer: shape [N, L] (float64)."""
    alpha = np.where(traces.source_mask[None], traces.routing.astype(np.float64), 0.0)
    mean = alpha.mean(axis=0, keepdims=True)
    return 0.5 * np.abs(alpha - mean).sum(axis=2)


def layer_tv(traces: TraceSet) -> np.ndarray:
    """TV_l per layer: shape [L]."""
    return per_example_tv(traces).mean(axis=0)


def content_independent(traces: TraceSet, tv_min: float = TV_MIN) -> tuple[bool, float]:
    """(True when no layer's routing varies by ``tv_min`` or more, the largest TV_l)."""
    largest = float(layer_tv(traces).max(initial=0.0))
    return largest < tv_min, largest


def schedule_deviation(traces: TraceSet) -> tuple[float, tuple[int, int, int]] | None:
    """Largest |observed − declared schedule| over valid entries, and its (example, layer,
    source) index; None when the traces declare no schedule."""
    if traces.meta.schedule is None:
        return None
    schedule = np.asarray(traces.meta.schedule, dtype=np.float64)
    if schedule.shape != traces.routing.shape[1:]:
        raise ValueError(f"declared schedule has shape {schedule.shape}, routing is "
                         f"[N, L, S] = {traces.routing.shape}")
    diff = np.where(traces.source_mask[None],
                    np.abs(traces.routing.astype(np.float64) - schedule[None]), 0.0)
    flat = int(np.argmax(diff))
    where = np.unravel_index(flat, diff.shape)
    return float(diff.reshape(-1)[flat]), (int(where[0]), int(where[1]), int(where[2]))
