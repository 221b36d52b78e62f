"""Reference depth stacks: Full AttnRes, Block AttnRes, the wrapped convention, vanilla PreNorm.

Each stack maps embeddings ``x [B, T, d]`` to final-normed hidden states and returns the
routing of every site, so a fixture only adds an embedding and a head. The three routed
stacks share parameter names with :class:`PreNormResidual` for their sublayers and final
norm (``sublayers.*``, ``final_norm.*``), so a vanilla checkpoint loads into
:class:`WrappedAttnRes` unchanged: that is the "routing-equivalent loading path" of
docs/methods.md §3.2.

Interventions (:class:`routeaudit.model.intervention.RoutingIntervention`) are passed per call,
``stack(x, intervention=iv)``, or for a block of code, ``with stack.intervene(iv): ...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from routeaudit.model.intervention import RoutingIntervention
from routeaudit.nn.layout import (
    RoutingLayout,
    block_boundaries,
    block_layout,
    full_layout,
    layers_per_block_for,
    wrapped_layout,
    wrapped_schedule,
)
from routeaudit.nn.packing import PackedRouting, pack_routing
from routeaudit.nn.routing import DepthRouter, InterventionPlan, SiteRouting, route
from routeaudit.nn.sublayers import RMSNorm, transformer_sublayers


class StackOutput(NamedTuple):
    """Final-normed hidden states and the routing of every site, in site order."""

    hidden: Tensor
    routing: list[SiteRouting]


def _sublayers_or_default(sublayers: Sequence[nn.Module] | None, dim: int, n_layers: int,
                          n_heads: int, mlp_ratio: int, causal: bool, eps: float) -> nn.ModuleList:
    if sublayers is None:
        return transformer_sublayers(n_layers, dim, n_heads, mlp_ratio=mlp_ratio, causal=causal, eps=eps)
    return nn.ModuleList(sublayers)


class PreNormResidual(nn.Module):
    """The vanilla twin: ``h_{l+1} = h_l + f_l(h_l)``, no routing (docs/methods.md §1.1)."""

    layout: RoutingLayout | None = None

    def __init__(self, dim: int, n_layers: int = 4, n_heads: int = 4, *, mlp_ratio: int = 4,
                 causal: bool = False, sublayers: Sequence[nn.Module] | None = None,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.sublayers = _sublayers_or_default(sublayers, dim, n_layers, n_heads, mlp_ratio, causal, eps)
        self.final_norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor, intervention: RoutingIntervention | None = None) -> StackOutput:
        if intervention is not None:
            raise ValueError("PreNormResidual has no routing to intervene on")
        for f in self.sublayers:
            x = x + f(x)
        return StackOutput(self.final_norm(x), [])


class RoutedStack(nn.Module):
    """Shared machinery: one DepthRouter per site, interventions, recording and packing."""

    def __init__(self, dim: int, sublayers: nn.ModuleList, layout: RoutingLayout, *,
                 constant_logit: float | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.sublayers = sublayers
        self.layout = layout
        self.constant_logit = constant_logit
        self.routers = nn.ModuleList(DepthRouter(dim, eps=eps) for _ in range(layout.n_sites))
        self.final_norm = RMSNorm(dim, eps)
        self._families = [tuple(layout.family_of(c) for c in cols) for cols in layout.site_columns]
        self._active: RoutingIntervention | None = None

    # ------------------------------------------------------------------ interventions
    @contextlib.contextmanager
    def intervene(self, intervention: RoutingIntervention) -> Iterator[RoutingIntervention]:
        """Apply ``intervention`` to every forward inside the block (validated on entry)."""
        InterventionPlan.build(intervention, self.layout)
        previous, self._active = self._active, intervention
        try:
            yield intervention
        finally:
            self._active = previous

    def _plan(self, intervention: RoutingIntervention | None) -> InterventionPlan | None:
        chosen = intervention if intervention is not None else self._active
        return None if chosen is None else InterventionPlan.build(chosen, self.layout)

    # ------------------------------------------------------------------ routing
    def _route(self, site: int, sources: list[Tensor], plan: InterventionPlan | None,
               record: list[SiteRouting], current_bias: Tensor | None = None) -> Tensor:
        """Mix ``sources`` (in the layout's column order for ``site``) and record the weights."""
        columns = self.layout.site_columns[site]
        if self.constant_logit is not None:
            sources = [*sources, torch.zeros_like(sources[0])]
        stacked = torch.stack(sources)
        logits = self.routers[site](stacked)
        if current_bias is not None:  # wrapped: recency bias on the current state (last source)
            logits = torch.cat([logits[:-1], logits[-1:] + current_bias])
        if self.constant_logit is not None:  # its content logit is exactly 0 (zero value)
            logits = torch.cat([logits[:-1], logits[-1:] + self.constant_logit])
        if len(columns) != stacked.shape[0]:
            raise RuntimeError(f"site {site}: {stacked.shape[0]} sources, layout says {len(columns)}")
        alpha, mixed = route(logits, stacked, site, columns, plan)
        record.append(SiteRouting(site, self.layout.site_types[site], self.layout.site_depth[site],
                                  columns, self._families[site], logits.permute(1, 2, 0),
                                  alpha.permute(1, 2, 0)))
        return mixed

    def schedule(self) -> np.ndarray | None:
        """Analytic content-independent routing, where the model has one (wrapped only)."""
        return None

    def meta(self) -> dict[str, Any]:
        """Trace metadata for this model (``TraceMeta`` fields)."""
        return self.layout.meta(self.schedule())

    def pack(self, routing: list[SiteRouting], *, pool_tokens: bool = False) -> PackedRouting:
        """Routing in the trace layout, with ``source_mask`` and metadata (see ``pack_routing``)."""
        return pack_routing(routing, self.layout, pool_tokens=pool_tokens, schedule=self.schedule())


class FullAttnRes(RoutedStack):
    """Full AttnRes: sublayer ``l`` routes over the embedding and every earlier output.

    ``h_l = Σ_{i<l} α_{i→l} v_i`` with ``v_0`` the embedding and ``v_i = f_i(h_i)``; a final
    site with its own pseudo-query mixes ``v_0..v_L`` before the final norm.
    """

    def __init__(self, dim: int, n_layers: int = 4, n_heads: int = 4, *, mlp_ratio: int = 4,
                 causal: bool = False, sublayers: Sequence[nn.Module] | None = None,
                 constant_logit: float | None = None, eps: float = 1e-6) -> None:
        subs = _sublayers_or_default(sublayers, dim, n_layers, n_heads, mlp_ratio, causal, eps)
        layout = full_layout(len(subs), constant_source=constant_logit is not None)
        super().__init__(dim, subs, layout, constant_logit=constant_logit, eps=eps)

    def forward(self, x: Tensor, intervention: RoutingIntervention | None = None) -> StackOutput:
        plan, record = self._plan(intervention), []
        values = [x]
        for site, f in enumerate(self.sublayers):
            values.append(f(self._route(site, values, plan, record)))
        h = self._route(len(self.sublayers), values, plan, record)
        return StackOutput(self.final_norm(h), record)


class BlockAttnRes(RoutedStack):
    """Kimi Block AttnRes (docs/methods.md §1.3).

    Sources: ``b_0`` (the embedding, never summed into a block), the completed blocks
    ``b_n`` (sums of sublayer OUTPUTS), and the current-block partial sum, which the first
    sublayer of a block does not see at all (no zero source). Blocks hold
    ``ceil(L / num_blocks)`` sublayers; a short last block is used as it is. A final site
    mixes every block before the final norm.
    """

    def __init__(self, dim: int, n_layers: int = 4, n_heads: int = 4, *, num_blocks: int = 4,
                 mlp_ratio: int = 4, causal: bool = False, sublayers: Sequence[nn.Module] | None = None,
                 constant_logit: float | None = None, eps: float = 1e-6) -> None:
        subs = _sublayers_or_default(sublayers, dim, n_layers, n_heads, mlp_ratio, causal, eps)
        layout = block_layout(len(subs), num_blocks, constant_source=constant_logit is not None)
        super().__init__(dim, subs, layout, constant_logit=constant_logit, eps=eps)
        self.num_blocks = num_blocks
        self.boundaries = frozenset(block_boundaries(len(subs), num_blocks))

    def forward(self, x: Tensor, intervention: RoutingIntervention | None = None) -> StackOutput:
        plan, record = self._plan(intervention), []
        completed: list[Tensor] = [x]
        partial: Tensor | None = None
        for site, f in enumerate(self.sublayers):
            sources = completed if partial is None else [*completed, partial]
            out = f(self._route(site, sources, plan, record))
            partial = out if partial is None else partial + out
            if site in self.boundaries:
                completed.append(partial)
                partial = None
        h = self._route(len(self.sublayers), completed, plan, record)
        return StackOutput(self.final_norm(h), record)


class WrappedAttnRes(RoutedStack):
    """The wrapped convention (docs/methods.md §1.7, §3.2): the residual stream is kept.

    Each sublayer's INPUT is a mixture of the embedding, residual-stream snapshots taken at
    the end of every ``ceil(n_layers / num_blocks)`` layers, and the current stream, whose
    logit gets a learnable recency bias ``b`` (one per site); the stream itself still grows
    by ``+ f(h)``. With zero pseudo-queries the routing is the analytic schedule of §3.3,
    and as ``b → ∞`` the model becomes the vanilla PreNorm twin.
    """

    def __init__(self, dim: int, n_layers: int = 4, n_heads: int = 4, *, num_blocks: int = 4,
                 recency_bias: float = 3.0, mlp_ratio: int = 4, causal: bool = False,
                 sublayers: Sequence[nn.Module] | None = None, eps: float = 1e-6) -> None:
        subs = _sublayers_or_default(sublayers, dim, n_layers, n_heads, mlp_ratio, causal, eps)
        if len(subs) % 2:
            raise ValueError("the wrapped convention needs (attn, mlp) pairs of sublayers")
        n_layers = len(subs) // 2
        super().__init__(dim, subs, wrapped_layout(n_layers, num_blocks), eps=eps)
        self.num_blocks = num_blocks
        self.layers_per_block = layers_per_block_for(n_layers, num_blocks)
        self.recency_bias = nn.Parameter(torch.full((len(subs),), float(recency_bias)))

    def forward(self, x: Tensor, intervention: RoutingIntervention | None = None) -> StackOutput:
        plan, record = self._plan(intervention), []
        snapshots: list[Tensor] = [x]
        current = x
        n_layers = len(self.sublayers) // 2
        for site, f in enumerate(self.sublayers):
            h = self._route(site, [*snapshots, current], plan, record, self.recency_bias[site:site + 1])
            current = current + f(h)
            layer = site // 2
            if site % 2 == 1 and (layer + 1) % self.layers_per_block == 0 and layer < n_layers - 1:
                snapshots.append(current)
        return StackOutput(self.final_norm(current), record)

    def schedule(self) -> np.ndarray:
        """The §3.3 schedule for the current recency biases (exact when the queries are 0)."""
        return wrapped_schedule(self.layout, self.recency_bias.detach().cpu().double().numpy())

    @torch.no_grad()
    def zero_queries(self) -> None:
        """Make routing content-independent (what the wrapped loading path must guarantee)."""
        for router in self.routers:
            router.query.zero_()
