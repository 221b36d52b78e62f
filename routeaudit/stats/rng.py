"""Reproducible random streams, one per (audit, cell, seed, ...) key tuple.

Keys are hashed with sha256 (never Python's salted ``hash``) into a numpy SeedSequence, so
a stream is the same in every process and on every machine, and two cells never share one
by accident. See docs/methods.md §5.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["as_generator", "rng_for", "torch_generator_for"]


def _key_word(key: int | str) -> int:
    """A stable 128-bit word per key; type-tagged so that 1 and "1" differ."""
    if isinstance(key, bool) or not isinstance(key, int | np.integer | str):
        raise TypeError(f"rng keys must be int or str, not {type(key).__name__}")
    tag = b"s:" if isinstance(key, str) else b"i:"
    digest = hashlib.sha256(tag + str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:16], "little")


def _seed_sequence(keys: tuple[int | str, ...]) -> np.random.SeedSequence:
    if not keys:
        raise ValueError("rng_for needs at least one key")
    return np.random.SeedSequence([_key_word(k) for k in keys])


def rng_for(*keys: int | str) -> np.random.Generator:
    """A reproducible numpy stream per (audit, cell, seed, ...).

    Keys are hashed with sha256 (never Python's salted ``hash``), so the stream is the same in
    every process and on every machine, and independent streams are not accidentally shared
    between cells.
    """
    return np.random.Generator(np.random.PCG64(_seed_sequence(keys)))


def torch_generator_for(*keys: int | str) -> torch.Generator:
    """The torch counterpart of :func:`rng_for` (a CPU generator seeded from the same keys)."""
    seed = int(_seed_sequence(keys).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)
    import torch

    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, not {type(rng).__name__}")
