"""RoutingIntervention: what a causal audit asks a model to do to its routing.

An intervention is plain data. The model side (an adapter's ``intervene(model, iv)``, or the
reference modules in :mod:`routeaudit.nn`) turns it into a change of the routing softmax
inside the forward pass; the audit side builds interventions from trace metadata. Keeping it
model-agnostic is what lets one ``causal_ablation`` audit run on any adapter.

Routing sites are addressed with the trace's own indices: ``layers`` are indices ``l`` of the
``routing [N, L, S]`` axis, ``sources`` indices of its ``S`` axis. ``sublayer`` ("attn",
"mlp", "final") restricts to sites of that type (``TraceMeta.layer_types``); ``family``
names a source family (``TraceMeta.source_families``) instead of explicit indices.

Kinds:

* ``mask``: the selected sources get logit −∞ before the softmax, so the remaining sources
  are renormalised (``renormalize=True``, the default), or their weights are set to 0 and
  the others left as they are (``renormalize=False``). Masking every valid source of a site
  is an error.
* ``mean``: the selected sites use ``weights`` (an ``[L, S]`` array, usually the mean routing
  over the evaluation set) instead of their content-dependent routing.
* ``schedule``: the same, for a fixed analytic schedule (e.g. the recency-bias schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Kind = Literal["mask", "mean", "schedule"]
SUBLAYER_TYPES = ("attn", "mlp", "final")


@dataclass(frozen=True)
class RoutingIntervention:
    """One change to the routing of selected sites (see the module docstring)."""

    kind: Kind = "mask"
    sublayer: str | None = None
    layers: tuple[int, ...] | None = None
    family: str | None = None
    sources: tuple[int, ...] | None = None
    renormalize: bool = True
    weights: Any = field(default=None, compare=False, repr=False)
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("mask", "mean", "schedule"):
            raise ValueError(f"kind must be 'mask', 'mean' or 'schedule', not {self.kind!r}")
        if self.sublayer is not None and self.sublayer not in SUBLAYER_TYPES:
            raise ValueError(f"sublayer must be one of {SUBLAYER_TYPES} or None, not "
                             f"{self.sublayer!r}")
        if self.kind == "mask" and self.family is None and self.sources is None:
            raise ValueError("a mask intervention needs a family or explicit sources")
        if self.kind != "mask" and self.weights is None:
            raise ValueError(f"a {self.kind!r} intervention needs weights of shape [L, S]")
        for name in ("layers", "sources"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))

    def site_mask(self, layer_types: Sequence[str] | None, n_layers: int) -> np.ndarray:
        """Boolean [L]: the routing sites this intervention touches."""
        sites = np.zeros(n_layers, dtype=bool)
        chosen = range(n_layers) if self.layers is None else self.layers
        for layer in chosen:
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} out of range [0, {n_layers})")
            sites[layer] = True
        if self.sublayer is not None:
            if layer_types is None:
                raise ValueError("sublayer given but the model declares no layer_types")
            sites &= np.asarray([t == self.sublayer for t in layer_types], dtype=bool)
        return sites

    def source_mask(self, source_families: dict[str, list[int]] | None,
                    n_sources: int) -> np.ndarray:
        """Boolean [S]: the sources a mask intervention removes."""
        picked = np.zeros(n_sources, dtype=bool)
        if self.sources is not None:
            indices: Sequence[int] = self.sources
        else:
            families = source_families or {}
            if self.family not in families:
                raise ValueError(f"unknown source family {self.family!r}; the model declares "
                                 f"{sorted(families)}")
            indices = families[self.family]
        for s in indices:
            if not 0 <= s < n_sources:
                raise ValueError(f"source {s} out of range [0, {n_sources})")
            picked[s] = True
        return picked


def apply_to_weights(alpha: np.ndarray, iv: RoutingIntervention, *, sites: np.ndarray,
                     removed: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Reference semantics on already-computed routing weights ``alpha [..., L, S]``.

    Masking with renormalisation equals setting the logits to −∞ before the softmax, because
    softmax restricted to a subset is the full softmax renormalised over that subset. Used by
    tests and by models that can only edit weights after the softmax.
    """
    out = np.array(alpha, dtype=np.float64, copy=True)
    if iv.kind == "mask":
        keep = valid & ~removed[None, :]  # [L, S]
        if np.any(sites & ~keep.any(axis=1)):
            raise ValueError("the intervention masks every valid source of some site")
        sel = out[..., sites, :] * keep[sites]
        if iv.renormalize:
            sel = sel / sel.sum(axis=-1, keepdims=True)
        out[..., sites, :] = sel
        return out
    weights = np.asarray(iv.weights, dtype=np.float64)
    if weights.shape != out.shape[-2:]:
        raise ValueError(f"weights have shape {weights.shape}, expected {out.shape[-2:]}")
    out[..., sites, :] = weights[sites]
    return out
