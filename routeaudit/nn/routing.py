"""One AttnRes routing site: pseudo-query softmax over depth sources, with interventions.

``φ(w, k) = exp(wᵀ RMSNorm(k))`` with ``RMSNorm(x) = x / sqrt(mean(x²) + ε)`` (no gain, no
1/√d, no temperature), a joint softmax over the sources of each (batch, token) position, and
the RAW sources as values (docs/methods.md §1.2). Interventions act on the logits (−∞ before the
softmax) or replace the weights, so every model in this package shares one semantics that
matches :func:`routeaudit.model.intervention.apply_to_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from routeaudit.model.intervention import RoutingIntervention
from routeaudit.nn.layout import RoutingLayout


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(mean(x²) + ε)`` over the last axis (Zhang & Sennrich, without a gain)."""
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)


class DepthRouter(nn.Module):
    """The learned pseudo-query of one site; zero-initialised so routing starts uniform."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, sources: Tensor) -> Tensor:
        """Content logits ``[n, B, T]`` for stacked sources ``[n, B, T, d]``."""
        return rms_normalize(sources, self.eps) @ self.query


@dataclass
class SiteRouting:
    """Routing of one site in one forward pass, labelled for packing and for humans.

    ``weights``/``logits`` are ``[B, T, n]`` with source ``k`` stored in trace column
    ``columns[k]`` and belonging to family ``families[k]``.
    """

    site: int
    sublayer: str
    layer: int
    columns: tuple[int, ...]
    families: tuple[str, ...]
    logits: Tensor
    weights: Tensor


@dataclass(frozen=True)
class InterventionPlan:
    """A RoutingIntervention resolved against a layout once, before the forward pass."""

    intervention: RoutingIntervention
    sites: np.ndarray  # [L] bool
    removed: np.ndarray  # [S] bool, for masks
    weights: np.ndarray | None  # [L, S], for mean/schedule

    @classmethod
    def build(cls, iv: RoutingIntervention, layout: RoutingLayout) -> InterventionPlan:
        sites = iv.site_mask(list(layout.site_types), layout.n_sites)
        removed = np.zeros(layout.n_sources, dtype=bool)
        weights = None
        if iv.kind == "mask":
            removed = iv.source_mask(layout.source_families, layout.n_sources)
            for site in np.flatnonzero(sites):
                if removed[list(layout.site_columns[site])].all():
                    raise ValueError(f"the intervention masks every valid source of site {site} "
                                     f"({layout.layer_names[site]})")
        else:
            weights = np.asarray(iv.weights, dtype=np.float64)
            expected = (layout.n_sites, layout.n_sources)
            if weights.shape != expected:
                raise ValueError(f"weights have shape {weights.shape}, expected [L, S] = {expected}")
        return cls(iv, sites, removed, weights)


def route(logits: Tensor, sources: Tensor, site: int, columns: tuple[int, ...],
          plan: InterventionPlan | None) -> tuple[Tensor, Tensor]:
    """Routing weights ``[n, B, T]`` and the mixture ``Σ_k α_k V_k`` ``[B, T, d]``.

    ``logits`` already include any fixed offsets (recency bias, constant-source logit).
    """
    if plan is None or not plan.sites[site]:
        alpha = torch.softmax(logits, dim=0)
    elif plan.weights is not None:
        fixed = torch.as_tensor(plan.weights[site, list(columns)], dtype=logits.dtype, device=logits.device)
        alpha = fixed.view(-1, 1, 1).expand_as(logits)
    else:
        removed = torch.as_tensor(plan.removed[list(columns)], device=logits.device).view(-1, 1, 1)
        if plan.intervention.renormalize:
            alpha = torch.softmax(logits.masked_fill(removed, float("-inf")), dim=0)
        else:
            alpha = torch.softmax(logits, dim=0).masked_fill(removed, 0.0)
    return alpha, (alpha.unsqueeze(-1) * sources).sum(dim=0)
