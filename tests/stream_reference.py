"""SplitMix64 in plain Python integers: the independent reference that the tests of the
permutation and bootstrap streams re-derive their draws from (docs/methods.md §2.5, §5.1)."""

from __future__ import annotations

MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def splitmix(z: int) -> int:
    """SplitMix64's finaliser of one 64-bit word."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)
