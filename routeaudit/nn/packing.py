"""Turn per-site routing records into the TraceSet layout ``routing [B, (T,) L, S]``.

Each site's weights go into the columns its layout fixes, zeros elsewhere, so a row sums
to 1 over that site's valid sources. Pooling over tokens (the per-image default of
docs/methods.md §1.4) is a plain mean of distributions and therefore still a distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from routeaudit.nn.layout import RoutingLayout

if TYPE_CHECKING:
    from routeaudit.nn.routing import SiteRouting


class PackedRouting(NamedTuple):
    """Trace-ready routing: ``routing`` float32, ``source_mask [L, S]`` bool, ``meta`` dict."""

    routing: Tensor
    source_mask: np.ndarray
    meta: dict[str, Any]


def pack_routing(records: Sequence[SiteRouting], layout: RoutingLayout, *, pool_tokens: bool = False,
                 schedule: np.ndarray | None = None) -> PackedRouting:
    """Scatter every site's ``[B, T, n]`` weights into ``[B, T, L, S]`` (``[B, L, S]`` if pooled).

    The result is detached: traces are data, gradients stay with the records.
    """
    if len(records) != layout.n_sites:
        raise ValueError(f"{len(records)} routing records for a layout with {layout.n_sites} sites")
    first = records[0].weights
    batch, tokens = first.shape[:2]
    routing = torch.zeros(batch, tokens, layout.n_sites, layout.n_sources, dtype=torch.float32,
                          device=first.device)
    for record in records:
        if tuple(record.columns) != layout.site_columns[record.site]:
            raise ValueError(f"site {record.site} routed to columns {record.columns}, layout says "
                             f"{layout.site_columns[record.site]}")
        routing[:, :, record.site, list(record.columns)] = record.weights.detach().float()
    if pool_tokens:
        routing = routing.mean(dim=1)
    return PackedRouting(routing, layout.source_mask, layout.meta(schedule))
