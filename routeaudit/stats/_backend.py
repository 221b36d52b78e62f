"""Where the batched kernels run, and the chunk sizes that bound their memory.

``device=None`` (or ``"cpu"``) runs the compiled numba kernels (numpy without numba) on the
CPU; a GPU device runs the same computation in torch, bit for bit. torch is imported only
on that path, so the statistics engine (and ``import routeaudit``) never loads it for CPU
work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DeviceLike = Any  # str | torch.device | None

# Run the torch kernels even on CPU (tests use this to check torch == numpy bit for bit).
_TORCH_ON_CPU = False
# Draws per chunk of permutations or replicates when chunk_size is not given (bounds memory).
CHUNK_KEYS = 1 << 20


def torch_device(device: DeviceLike) -> torch.device | None:
    """None means "numpy on CPU"; a torch device means "torch kernels there"."""
    if device is None and not _TORCH_ON_CPU:
        return None
    import torch

    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cpu" and not _TORCH_ON_CPU:
        return None
    return dev
