"""Fixed trace layouts: which routing site sees which source column.

Every routing site of a model gets one row of the trace ``routing [.., L, S]``, and every
depth source one column that means the same thing at every site (column 0 is always the
embedding). Fixing the columns per model is what lets an audit address a source family with
one list of indices, and what makes ``source_mask`` the ragged validity pattern of the
architecture rather than of one forward pass.

Conventions (docs/methods.md §1.2, §1.3, §1.7, §3.2):

* ``attnres-full``: site ``l`` (0-based sublayer) sees ``v_0..v_l``; column ``i`` is ``v_i``
  (``v_0`` the embedding, ``v_i`` the output of sublayer ``i - 1``); the final site sees all.
* ``attnres-block``: column 0 is ``b_0``, columns ``1..n_blocks`` the completed blocks, the
  next column the current-block partial sum (absent at the first sublayer of a block).
* ``attnres-wrapped``: column 0 is the embedding, then the residual-stream snapshots taken
  at block ends, then the current residual stream; no final site.

An optional *constant* column (a zero-valued source with a fixed logit) can be appended to
the Kimi conventions: it takes softmax mass but carries no information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONSTANT_FAMILY = "constant"


@dataclass(frozen=True)
class RoutingLayout:
    """Per-site source columns and labels of one model's routing trace."""

    family: str
    n_sources: int
    site_types: tuple[str, ...]
    site_depth: tuple[int, ...]
    site_columns: tuple[tuple[int, ...], ...]
    source_families: dict[str, list[int]] = field(default_factory=dict)

    @property
    def n_sites(self) -> int:
        return len(self.site_types)

    @property
    def source_mask(self) -> np.ndarray:
        """Boolean ``[L, S]``: True where a site can route to a column."""
        mask = np.zeros((self.n_sites, self.n_sources), dtype=bool)
        for site, columns in enumerate(self.site_columns):
            mask[site, list(columns)] = True
        return mask

    @property
    def layer_names(self) -> list[str]:
        pairs = zip(self.site_types, self.site_depth, strict=True)
        return [t if t == "final" else f"L{d}.{t}" for t, d in pairs]

    def family_of(self, column: int) -> str:
        for name, columns in self.source_families.items():
            if column in columns:
                return name
        raise KeyError(f"column {column} belongs to no source family")

    def meta(self, schedule: np.ndarray | None = None) -> dict[str, Any]:
        """Trace metadata (``TraceMeta`` fields) describing this layout."""
        out: dict[str, Any] = {
            "family": self.family,
            "routing_mode": "soft",
            "layer_types": list(self.site_types),
            "layer_depth": list(self.site_depth),
            "layer_names": self.layer_names,
            "source_families": {k: list(v) for k, v in self.source_families.items()},
        }
        if schedule is not None:
            out["schedule"] = np.asarray(schedule, dtype=np.float64).tolist()
        return out


def sublayer_types(n_sublayers: int) -> list[str]:
    """attn, mlp, attn, mlp, ...: each transformer layer is two paper-layers."""
    return ["attn" if j % 2 == 0 else "mlp" for j in range(n_sublayers)]


def _with_constant(columns: list[tuple[int, ...]], families: dict[str, list[int]], n_sources: int,
                   constant: bool) -> tuple[list[tuple[int, ...]], dict[str, list[int]], int]:
    if not constant:
        return columns, families, n_sources
    return ([(*c, n_sources) for c in columns], {**families, CONSTANT_FAMILY: [n_sources]},
            n_sources + 1)


def full_layout(n_sublayers: int, *, constant_source: bool = False) -> RoutingLayout:
    """Full AttnRes: sublayer ``l`` sees ``v_0..v_l``, the final site ``v_0..v_L``."""
    columns = [tuple(range(j + 1)) for j in range(n_sublayers)] + [tuple(range(n_sublayers + 1))]
    families = {"embedding": [0], "history": list(range(1, n_sublayers + 1))}
    columns, families, n_sources = _with_constant(columns, families, n_sublayers + 1, constant_source)
    types = [*sublayer_types(n_sublayers), "final"]
    depth = [j // 2 for j in range(n_sublayers)] + [math.ceil(n_sublayers / 2)]
    return RoutingLayout("attnres-full", n_sources, tuple(types), tuple(depth), tuple(columns), families)


def block_size_for(n_sublayers: int, num_blocks: int) -> int:
    """Sublayers per block when L sublayers are split into ``num_blocks`` blocks (last may be short)."""
    if not 1 <= num_blocks <= n_sublayers:
        raise ValueError(f"num_blocks must be in [1, {n_sublayers}], not {num_blocks}")
    return math.ceil(n_sublayers / num_blocks)


def block_boundaries(n_sublayers: int, num_blocks: int) -> list[int]:
    """0-based sublayer indices after which a block representation is complete.

    The last sublayer always closes a block: when L is not divisible by the block size its
    partial sum becomes the last block (docs/methods.md §1.3).
    """
    size = block_size_for(n_sublayers, num_blocks)
    ends = list(range(size - 1, n_sublayers, size))
    if ends[-1] != n_sublayers - 1:
        ends.append(n_sublayers - 1)
    return ends


def block_layout(n_sublayers: int, num_blocks: int, *, constant_source: bool = False) -> RoutingLayout:
    """Kimi Block AttnRes: blocks of ``ceil(L / num_blocks)`` sublayers plus a final site."""
    size = block_size_for(n_sublayers, num_blocks)
    n_blocks = len(block_boundaries(n_sublayers, num_blocks))
    current = n_blocks + 1
    columns = []
    for j in range(n_sublayers):
        block, position = divmod(j, size)
        completed = tuple(range(block + 1))  # b_0 .. b_block (0-based block index)
        columns.append(completed if position == 0 else (*completed, current))
    columns.append(tuple(range(n_blocks + 1)))
    families = {"embedding": [0], "history": list(range(1, n_blocks + 1)), "current": [current]}
    columns, families, n_sources = _with_constant(columns, families, n_blocks + 2, constant_source)
    types = [*sublayer_types(n_sublayers), "final"]
    depth = [j // 2 for j in range(n_sublayers)] + [math.ceil(n_sublayers / 2)]
    return RoutingLayout("attnres-block", n_sources, tuple(types), tuple(depth), tuple(columns), families)


def layers_per_block_for(n_layers: int, num_blocks: int) -> int:
    """``ceil(num_layers / num_blocks)`` transformer layers per block, as the wrapped code does."""
    return max(1, math.ceil(n_layers / num_blocks))


def wrapped_boundaries(n_layers: int, num_blocks: int) -> list[int]:
    """0-based transformer layers after which the wrapped model snapshots its residual stream."""
    per_block = layers_per_block_for(n_layers, num_blocks)
    return [layer for layer in range(n_layers) if (layer + 1) % per_block == 0]


def wrapped_layout(n_layers: int, num_blocks: int) -> RoutingLayout:
    """Wrapped convention: layer ``ℓ`` sees ``1 + floor(ℓ / layers_per_block)`` completed sources."""
    per_block = layers_per_block_for(n_layers, num_blocks)
    n_history = (n_layers - 1) // per_block
    current = n_history + 1
    columns, types, depth = [], [], []
    for layer in range(n_layers):
        completed = tuple(range(1 + layer // per_block))
        for sub in ("attn", "mlp"):
            columns.append((*completed, current))
            types.append(sub)
            depth.append(layer)
    families = {"embedding": [0], "history": list(range(1, n_history + 1)), "current": [current]}
    return RoutingLayout("attnres-wrapped", n_history + 2, tuple(types), tuple(depth), tuple(columns),
                         families)


def wrapped_schedule(layout: RoutingLayout, biases: np.ndarray | list[float]) -> np.ndarray:
    """Analytic routing of a wrapped model with zero pseudo-queries (docs/methods.md §3.3).

    All content logits are 0, so only the recency bias ``b`` on the current state is left:
    ``α_current = e^b / (e^b + n)`` and every other valid source gets ``1 / (e^b + n)``, where
    ``n`` is the number of completed sources at that site.
    """
    biases = np.broadcast_to(np.asarray(biases, dtype=np.float64), (layout.n_sites,))
    current = layout.source_families["current"][0]
    schedule = np.zeros((layout.n_sites, layout.n_sources))
    for site, columns in enumerate(layout.site_columns):
        completed = [c for c in columns if c != current]
        scale = np.exp(biases[site])
        schedule[site, completed] = 1.0 / (scale + len(completed))
        schedule[site, current] = scale / (scale + len(completed))
    return schedule
