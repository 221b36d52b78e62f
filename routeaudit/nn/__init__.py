"""Reference Attention-Residual modules that expose and accept routing.

Stacks map embeddings ``x [B, T, d]`` to ``StackOutput(hidden, routing)``; ``routing`` is one
:class:`SiteRouting` per site (sublayer type, transformer layer, source columns and
families, logits and weights). ``stack.pack(out.routing, pool_tokens=...)`` gives the trace
layout; ``stack(x, intervention=iv)`` or ``with stack.intervene(iv):`` applies a
:class:`routeaudit.model.intervention.RoutingIntervention`.
"""

from __future__ import annotations

from routeaudit.nn.layout import (
    CONSTANT_FAMILY,
    RoutingLayout,
    block_boundaries,
    block_layout,
    block_size_for,
    full_layout,
    layers_per_block_for,
    wrapped_boundaries,
    wrapped_layout,
    wrapped_schedule,
)
from routeaudit.nn.models import (
    BlockAttnRes,
    FullAttnRes,
    PreNormResidual,
    RoutedStack,
    StackOutput,
    WrappedAttnRes,
)
from routeaudit.nn.packing import PackedRouting, pack_routing
from routeaudit.nn.routing import DepthRouter, InterventionPlan, SiteRouting, rms_normalize, route
from routeaudit.nn.sublayers import FeedForward, RMSNorm, SelfAttention, transformer_sublayers

__all__ = [
    "CONSTANT_FAMILY",
    "BlockAttnRes",
    "DepthRouter",
    "FeedForward",
    "FullAttnRes",
    "InterventionPlan",
    "PackedRouting",
    "PreNormResidual",
    "RMSNorm",
    "RoutedStack",
    "RoutingLayout",
    "SelfAttention",
    "SiteRouting",
    "StackOutput",
    "WrappedAttnRes",
    "block_boundaries",
    "block_layout",
    "block_size_for",
    "full_layout",
    "layers_per_block_for",
    "pack_routing",
    "rms_normalize",
    "route",
    "transformer_sublayers",
    "wrapped_boundaries",
    "wrapped_layout",
    "wrapped_schedule",
]
