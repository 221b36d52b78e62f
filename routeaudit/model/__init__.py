"""Stage A (docs/architecture.md): how a model reaches routeaudit, and everything that runs it.

==================  =========================================================================
``adapter``         the adapter contract: ``Adapter``, ``ForwardOutput``, ``TraceAdapter``,
                    ``@routeaudit.adapter``, ``supports_intervention``
``intervention``    ``RoutingIntervention``: plain data describing a change of routing
``extract``         batched extraction (device, autocast, pinned copies, progress) and
                    ``ModelSession``, which keeps the model for causal passes
``cache``           the content-addressed trace cache
==================  =========================================================================

Nothing here computes a statistic; torch is imported only when a model actually runs.
"""

from __future__ import annotations

from routeaudit.model.adapter import (
    Adapter,
    ForwardOutput,
    TraceAdapter,
    adapter,
    find_adapters,
    supports_intervention,
)
from routeaudit.model.intervention import RoutingIntervention

__all__ = [
    "Adapter",
    "ForwardOutput",
    "RoutingIntervention",
    "TraceAdapter",
    "adapter",
    "find_adapters",
    "supports_intervention",
]
