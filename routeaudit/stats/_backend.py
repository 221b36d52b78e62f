"""Where the batched kernels run, and the chunk sizes that bound their memory.

``device=None`` (or ``"cpu"``) runs numpy on the CPU, where numpy's row sort was measured 6x
faster than ``torch.sort`` on one core of this project's machines; a GPU device runs the
same kernels in torch. torch is imported only on that path, so the statistics engine (and
``import routeaudit``) never loads it for CPU work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DeviceLike = Any  # str | torch.device | None

# Run the torch kernels even on CPU (tests use this to check torch == numpy bit for bit).
_TORCH_ON_CPU = False
# Keys per chunk of permutations or replicates when chunk_size is not given (bounds memory,
# ~4 MiB on CPU, ~0.5 GiB on a GPU), and per block that is sorted at once on CPU (stays in
# L2 cache).
CHUNK_KEYS = 1 << 20
DEVICE_CHUNK_KEYS = 1 << 24
BLOCK_KEYS = 1 << 17


def torch_device(device: DeviceLike) -> torch.device | None:
    """None means "numpy on CPU"; a torch device means "torch kernels there"."""
    if device is None and not _TORCH_ON_CPU:
        return None
    import torch

    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cpu" and not _TORCH_ON_CPU:
        return None
    return dev
