"""Value types of command-line options, shared by the CLI and every plugin's options.

Why one module: each ``type=`` callable turns a bad value into argparse's own usage error
(exit 4 with the option's name), and a second copy per plugin drifted in what it accepted
(NaN, inf). Plugin authors may use them too::

    group.add_argument("--my-margin", type=routeaudit.optiontypes.non_negative)
"""

from __future__ import annotations

import argparse
import math

__all__ = ["at_least_one", "non_negative", "positive_int", "positive_number", "probability",
           "stop_after"]


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number: {text}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1 (counts: permutations, bins, bands)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text}")
    return value


def stop_after(text: str) -> int:
    """A sequential-stopping count H: an integer ≥ 2, or 0 for "never stop early" (one
    type, so ``sequential_h = 0`` in ``[tool.routeaudit]`` turns it off as ``--sequential-h
    0`` does). H = 1 is refused: a stop at the first draw would leave no draw to estimate the
    null mean from."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (no early stop) or an integer ≥ 2: {text}")
    return value


def non_negative(text: str) -> float:
    """A finite number ≥ 0 (margins, thresholds)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number: {text}")
    return value


def positive_number(text: str) -> float:
    """A finite number > 0 (tolerances)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def at_least_one(text: str) -> float:
    """A finite number ≥ 1 (likelihood-ratio bounds)."""
    value = _number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a number >= 1: {text}")
    return value


def probability(text: str) -> float:
    """A number strictly between 0 and 1 (significance levels)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1: {text}")
    return value
