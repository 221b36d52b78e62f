"""Kernels of the within-bin permutation null (compiled with numba, numpy and torch: one
stream).

Why: the null of :mod:`routeaudit.stats.permutation` needs, per permutation and confidence
bin, the residual sums of the strata after a uniform random relabelling. Sorting a random
key per example (the earlier engine) costs O(n log n) and one 32-bit key per example; this
module assigns labels by *sequential sampling* instead (Knuth's Algorithm S generalised to
S labels, i.e. drawing the multivariate hypergeometric one position at a time): walking the
bin's examples in their canonical order, position ``i`` gets a label ``<= t`` with probability
``need_t / rem``, where ``need_t`` is the number of labels ``<= t`` not yet given out and
``rem = n_b - i`` the positions left. Every arrangement of the fixed labels is equally likely
(the same law as a uniform permutation of the bin), it is O(n) with one bounded random
integer per position and no data movement, and it vectorises across permutations.

The stream is counter-based, so permutation ``k`` is the same whatever the chunk size, the
device or the implementation: the bounded integer of position ``i`` of used bin ``u`` in
permutation ``k`` comes from the 64-bit word ``mix(key + c * GAMMA)`` at counter
``c = k * words + woff[u] + i // 2`` (the high 32 bits for even ``i``, the low 32 for odd ``i``;
``mix`` is SplitMix64's finaliser, so consecutive counters give SplitMix64's output stream).
The integer in ``[0, rem)`` is Lemire's multiply-shift ``(u * rem) >> 32``, exact by
rejection: while ``(u * rem) mod 2**32 < (2**32 - rem) mod rem`` (probability below
``rem / 2**32``) ``u`` is replaced by the high 32 bits of ``mix(s + a * GAMMA)``, attempt
``a = 1, 2, ...``, with ``s = mix(key2 + (2 c + i mod 2) * GAMMA)``. The last position of a bin
has ``rem = 1`` and needs no draw. ``key`` and ``key2`` are two raw 64-bit words of the test's
``numpy.random.Generator``.

Three implementations compute the same int64 sums bit for bit: :func:`perm_le` (numba, 64
permutations in SIMD lanes; the rare lanes that might reject are recomputed exactly by
:func:`bin_exact`), :func:`perm_le_numpy` (the fallback when numba is missing, vectorised over
permutations and bins, a Python loop over positions) and :func:`perm_le_torch` (GPUs, the same
loop in torch on int64 with unsigned semantics emulated). The statistic from the sums is
:func:`perm_statistic` / :func:`perm_statistic_numpy`, again bit-identical (sequential over
bins, no fused multiply-add).

The bootstrap's kernels (:mod:`routeaudit.stats._bootstrap_kernels`) draw from the same
counter-based stream.

numba is imported here, and this module is imported lazily by the permutation test, so that
``import routeaudit`` stays light; kernels compile on first use and are cached on disk
(``cache=True``: next to this file, or in ``NUMBA_CACHE_DIR``; without a writable cache
directory they compile once per process instead).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

try:  # numba is a core dependency; without it the numpy path gives the same numbers
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - exercised by tests through USE_NUMBA
    numba = None
    prange = range

__all__ = [
    "DRAW_BITS",
    "LANES",
    "available",
    "bin_exact",
    "perm_le",
    "perm_le_numpy",
    "perm_le_torch",
    "perm_statistic",
    "perm_statistic_numpy",
    "threads",
]

# SplitMix64: Weyl increment and finaliser multipliers.
GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_MASK64 = (1 << 64) - 1
# Bits per bounded draw. Tests lower it (e.g. to 8, bins < 256 examples) to force Lemire
# rejections through the exact path; production code never changes it.
DRAW_BITS = 32
# Permutations processed side by side in the compiled kernel (SIMD lanes, 8 AVX-512 vectors).
LANES = 64
# Set False (tests, or ROUTEAUDIT_NUMBA=0) to run the numpy implementation instead.
USE_NUMBA = os.environ.get("ROUTEAUDIT_NUMBA", "1") != "0"


def _jit(fn: Callable[..., Any], parallel: bool = False, error_model: str = "python"
         ) -> Callable[..., Any]:
    """``numba.njit(cache=True)``; a plain function when numba is missing. ``parallel``
    compiles ``numba.prange`` loops for threads (:func:`threads` says how many).
    ``error_model="numpy"`` drops Python's zero-division checks (x / 0 gives inf or nan, as
    in numpy), whose branches keep float loops from vectorising.

    Without a writable cache directory (a read-only install and no ``NUMBA_CACHE_DIR``)
    numba refuses ``cache=True`` when the decorator runs; the kernels are then compiled once
    per process instead of failing the import (one warning says so).
    """
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True, parallel=parallel,
                          error_model=error_model)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        if not _NO_CACHE:
            warnings.warn(
                "numba cannot cache the permutation kernels (no writable cache directory; set "
                "NUMBA_CACHE_DIR): they are compiled once per process",
                RuntimeWarning,
                stacklevel=2,
            )
        _NO_CACHE.append(fn.__name__)
        return numba.njit(cache=False, nogil=True, parallel=parallel,
                          error_model=error_model)(fn)


_NO_CACHE: list[str] = []


if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    # numba's own work queue, not OpenMP: an OpenMP layer would share (and resize) torch's
    # OpenMP pool when the parallel kernels start; NUMBA_THREADING_LAYER overrides
    numba.config.THREADING_LAYER = "workqueue"


def threads() -> int:
    """Threads for the parallel kernels: numba's pool, capped by ``OMP_NUM_THREADS`` when set
    (the one knob the tests, CI and benchmarks pin); set on numba for the calling thread."""
    if numba is None:
        return 1
    n = int(numba.config.NUMBA_NUM_THREADS)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    numba.set_num_threads(n)
    return n


def available() -> bool:
    """Whether the compiled kernels run (numba importable, JIT enabled, not switched off)."""
    return numba is not None and USE_NUMBA and not numba.config.DISABLE_JIT


# --------------------------------------------------------------------------- compiled kernels


@_jit
def _mix(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@_jit
def bin_exact(
    xs: np.ndarray, cum: np.ndarray, key: np.uint64, key2: np.uint64, ctr0: np.uint64, bits: int,
    out: np.ndarray,
) -> None:
    """Sums below each label boundary of one (permutation, bin), with exact rejection.

    The reference the vectorised kernels agree with; they call it for the rare (permutation,
    bin) where a draw might be rejected. ``ctr0`` is the bin's first stream counter in that
    permutation, ``cum`` the bin's cumulative label counts, ``out`` receives the S-1 sums.
    """
    n = xs.size
    s1 = cum.size
    shift = np.uint64(32 - bits)
    nbits = np.uint64(bits)
    low = (np.uint64(1) << nbits) - np.uint64(1)
    need = cum.copy()
    for t in range(s1):
        out[t] = 0
    for i in range(n):
        rem = np.uint64(n - i)
        r = np.int64(0)
        if rem > np.uint64(1):
            word = ctr0 + np.uint64(i >> 1)
            z = _mix(key + word * GAMMA)
            half = (z >> np.uint64(32)) if (i & 1) == 0 else (z & _LOW32)
            m = (half >> shift) * rem
            if (m & low) < rem:
                threshold = (low + np.uint64(1) - rem) % rem
                if (m & low) < threshold:
                    seed = _mix(key2 + (word * np.uint64(2) + np.uint64(i & 1)) * GAMMA)
                    attempt = np.uint64(1)
                    while (m & low) < threshold:  # redraws: probability < rem / 2**bits each
                        z = _mix(seed + attempt * GAMMA)
                        m = ((z >> np.uint64(32)) >> shift) * rem
                        attempt += np.uint64(1)
            r = np.int64(m >> nbits)
        for t in range(s1):
            if r < need[t]:
                out[t] += xs[i]
                need[t] -= 1


@_jit
def _pairs_two_boundaries(
    xs: np.ndarray, n: int, base: np.ndarray, need0: np.ndarray, need1: np.ndarray,
    acc0: np.ndarray, acc1: np.ndarray, lowest: np.ndarray, bits: int,
) -> None:
    """The pair loop of :func:`perm_le` for S = 3: draws and updates in one lane loop.

    ``lowest`` keeps each lane's smallest ``m mod 2**bits``; a rejection needs it below
    ``rem <= n``, so lanes with ``lowest >= n`` need no exact recomputation.
    """
    one = np.uint64(1)
    nbits = np.uint64(bits)
    shift = np.uint64(32 - bits)
    low = (one << nbits) - one
    for h in range(n // 2):
        rem0 = np.uint64(n - 2 * h)
        rem1 = rem0 - one
        step = np.uint64(h) * GAMMA
        x0 = xs[2 * h]
        x1 = xs[2 * h + 1]
        for lane in range(LANES):  # vectorised
            z = _mix(base[lane] + step)
            m0 = ((z >> np.uint64(32)) >> shift) * rem0
            m1 = ((z & _LOW32) >> shift) * rem1
            r0 = np.int64(m0 >> nbits)
            r1 = np.int64(m1 >> nbits)
            lowest[lane] = min(lowest[lane], min(m0 & low, m1 & low))
            a = need0[lane]
            b = need1[lane]
            c = np.int64(r0 < a)
            d = np.int64(r0 < b)
            acc0[lane] += x0 & -c
            acc1[lane] += x0 & -d
            a -= c
            b -= d
            c = np.int64(r1 < a)
            d = np.int64(r1 < b)
            acc0[lane] += x1 & -c
            acc1[lane] += x1 & -d
            need0[lane] = a - c
            need1[lane] = b - d


@_jit
def _lanes_of_bin(
    x: np.ndarray, starts: np.ndarray, sizes: np.ndarray, cum: np.ndarray, key: np.uint64,
    key2: np.uint64, words: np.uint64, woff: np.ndarray, row0: int, rows: int, bits: int,
    g0: int, u: int, out: np.ndarray,
) -> None:
    """Bin u of permutations row0 + g0 .. row0 + g0 + LANES - 1 (one lane each): the unit of
    work of :func:`perm_le`, with its own buffers."""
    s1 = cum.shape[1]
    shift = np.uint64(32 - bits)
    nbits = np.uint64(bits)
    one = np.uint64(1)
    low = (one << nbits) - one
    base = np.empty(LANES, np.uint64)
    flag = np.empty(LANES, np.bool_)
    r0 = np.empty(LANES, np.int64)
    r1 = np.empty(LANES, np.int64)
    need = np.empty((s1, LANES), np.int64)
    acc = np.empty((s1, LANES), np.int64)
    fix = np.empty(s1, np.int64)
    lowest = np.empty(LANES, np.uint64)
    n = sizes[u]
    xs = x[starts[u] : starts[u] + n]
    for lane in range(LANES):
        base[lane] = key + (np.uint64(row0 + g0 + lane) * words + woff[u]) * GAMMA
        flag[lane] = False
        lowest[lane] = low
    for t in range(s1):
        need[t, :] = cum[u, t]
        acc[t, :] = 0
    if s1 == 2:  # three strata (tertiles, the default): one fused loop
        _pairs_two_boundaries(xs, n, base, need[0], need[1], acc[0], acc[1], lowest, bits)
        for lane in range(LANES):
            flag[lane] = lowest[lane] < np.uint64(n)
    for h in range(n // 2 if s1 != 2 else 0):
        rem0 = np.uint64(n - 2 * h)
        rem1 = rem0 - np.uint64(1)
        step = np.uint64(h) * GAMMA
        for lane in range(LANES):  # vectorised: draws of positions 2h and 2h + 1
            z = _mix(base[lane] + step)
            m0 = ((z >> np.uint64(32)) >> shift) * rem0
            m1 = ((z & _LOW32) >> shift) * rem1
            r0[lane] = np.int64(m0 >> nbits)
            r1[lane] = np.int64(m1 >> nbits)
            flag[lane] = flag[lane] | ((m0 & low) < rem0) | (((m1 & low) < rem1) & (rem1 > one))
        x0 = xs[2 * h]
        x1 = xs[2 * h + 1]
        for t in range(s1):
            nt = need[t]
            at = acc[t]
            for lane in range(LANES):  # vectorised: Algorithm S, branch-free
                c = np.int64(r0[lane] < nt[lane])
                at[lane] += x0 & -c
                nt[lane] -= c
                c = np.int64(r1[lane] < nt[lane])
                at[lane] += x1 & -c
                nt[lane] -= c
    if n & 1:  # the last position takes the label that is left (rem = 1, r = 0)
        xl = xs[n - 1]
        for t in range(s1):
            for lane in range(LANES):
                acc[t, lane] += xl & -np.int64(need[t, lane] > 0)
    for lane in range(min(LANES, rows - g0)):
        if flag[lane]:
            ctr0 = np.uint64(row0 + g0 + lane) * words + woff[u]
            bin_exact(xs, cum[u], key, key2, ctr0, bits, fix)
            for t in range(s1):
                acc[t, lane] = fix[t]
        for t in range(s1):
            out[g0 + lane, u, t] = acc[t, lane]


def _perm_le(
    x: np.ndarray, starts: np.ndarray, sizes: np.ndarray, cum: np.ndarray, key: np.uint64,
    key2: np.uint64, words: np.uint64, woff: np.ndarray, row0: int, rows: int, bits: int,
    out: np.ndarray,
) -> None:
    """``out[r, u, t]`` = sum of bin u's residuals labelled ``<= t`` in permutation row0 + r.

    Permutations run LANES at a time, one per SIMD lane: every lane walks the same bin in the
    same order, so the loops over lanes vectorise. A lane whose draws might need a Lemire
    rejection (flagged by the cheap test ``m mod 2**bits < rem``) is recomputed by
    :func:`bin_exact`; lanes past ``rows`` are computed and dropped. The (lane group, bin)
    pairs are independent and spread over threads (:func:`threads`); each is computed whole by
    one thread, so the sums do not depend on the thread count.
    """
    n_bins = sizes.size
    n_groups = (rows + LANES - 1) // LANES
    for job in prange(n_groups * n_bins):
        _lanes_of_bin(x, starts, sizes, cum, key, key2, words, woff, row0, rows, bits,
                      (job // n_bins) * LANES, job % n_bins, out)


perm_le = _jit(_perm_le, parallel=True)


@_jit
def perm_statistic(
    le: np.ndarray, totals: np.ndarray, counts: np.ndarray, supported: np.ndarray,
    exponent: int, weighted: bool, out: np.ndarray,
) -> None:
    """Weighted gap (or max gap) of every row of sums-below-boundaries ``le`` [R, U, S-1].

    Every bin here is used (two supported strata). Sequential over bins, in the order
    :func:`perm_statistic_numpy` uses, so both give the same bits.
    """
    rows, n_bins, s1 = le.shape
    weight = np.empty(n_bins)
    total = 0.0
    for u in range(n_bins):
        weight[u] = np.float64(counts[u].sum())
        total += weight[u]
    for r in range(rows):
        acc = 0.0
        mg = -np.inf
        for u in range(n_bins):
            hi = -np.inf
            lo = np.inf
            prev = np.int64(0)
            for t in range(s1 + 1):
                cur = le[r, u, t] if t < s1 else totals[u]
                if supported[u, t]:
                    g = math.ldexp(np.float64(cur - prev), -exponent) / np.float64(counts[u, t])
                    hi = max(hi, g)
                    lo = min(lo, g)
                prev = cur
            d = hi - lo
            acc = acc + weight[u] * d
            mg = max(mg, d)
        out[r] = acc / total if weighted else mg


# --------------------------------------------------------------------------- numpy and torch


def _mix_numpy(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _fix_flagged(
    le: np.ndarray, flagged: np.ndarray, x_pad: np.ndarray, sizes: np.ndarray, cum: np.ndarray,
    key: int, key2: int, words: int, woff: np.ndarray, row0: int, bits: int,
) -> None:
    """Recompute, with exact rejection, the (row, bin) pairs the vectorised loop flagged."""
    rows, bins = np.nonzero(flagged)
    fix = np.empty(cum.shape[1], dtype=np.int64)
    for r, u in zip(rows.tolist(), bins.tolist(), strict=True):  # rare: < n_b**2 / 2**33 per pair
        ctr0 = np.uint64(((row0 + r) * words + int(woff[u])) & _MASK64)
        with np.errstate(over="ignore"):
            bin_exact(x_pad[u, : sizes[u]], cum[u], np.uint64(key), np.uint64(key2), ctr0, bits, fix)
        le[r, u] = fix


def perm_le_numpy(
    x_pad: np.ndarray, sizes: np.ndarray, cum: np.ndarray, key: int, key2: int, words: int,
    woff: np.ndarray, row0: int, rows: int, bits: int,
) -> np.ndarray:
    """:func:`perm_le` in numpy: vectorised over (permutation, bin), a loop over positions.

    ``x_pad`` [U, max n_b] holds each bin's residuals in canonical order, zero padded. A
    position without a draw (the last of its bin, or padding) gets ``rem = 0`` here, hence
    r = 0: the last position takes the label that is left, padding adds zeros. Returns
    ``le`` [rows, U, S-1].
    """
    n_bins, s1 = cum.shape
    shift, nbits = np.uint64(32 - bits), np.uint64(bits)
    low = np.uint64((1 << bits) - 1)
    k = np.arange(row0, row0 + rows, dtype=np.uint64)[:, None]
    base = np.uint64(key) + (k * np.uint64(words) + woff.astype(np.uint64)[None, :]) * GAMMA
    need = np.ascontiguousarray(np.broadcast_to(cum.T[:, None, :], (s1, rows, n_bins)))
    le = np.zeros((s1, rows, n_bins), dtype=np.int64)
    flagged = np.zeros((rows, n_bins), dtype=bool)
    width = x_pad.shape[1]
    for h in range((width + 1) // 2):  # positions 2h and 2h + 1 of every bin at once
        z = _mix_numpy(base + np.uint64((h * int(GAMMA)) & _MASK64))
        for half, part in ((0, z >> np.uint64(32)), (1, z & _LOW32)):
            i = 2 * h + half
            if i >= width:
                break
            rem = np.where(sizes - i >= 2, sizes - i, 0).astype(np.uint64)
            m = (part >> shift) * rem
            r = (m >> nbits).astype(np.int64)
            flagged |= (m & low) < rem
            xi = x_pad[:, i]
            for t in range(s1):  # S-1 label boundaries
                c = r < need[t]
                le[t] += xi * c
                need[t] -= c
    out = np.ascontiguousarray(le.transpose(1, 2, 0))
    if flagged.any():
        _fix_flagged(out, flagged, x_pad, sizes, cum, key, key2, words, woff, row0, bits)
    return out


def _as_signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _mix_torch(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors holding uint64 bits (logical shifts by mask)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _as_signed(int(_M1))
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _as_signed(int(_M2))
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def perm_le_torch(
    x_pad: np.ndarray, sizes: np.ndarray, cum: np.ndarray, key: int, key2: int, words: int,
    woff: np.ndarray, row0: int, rows: int, bits: int, device: torch.device,
) -> np.ndarray:
    """:func:`perm_le_numpy` in torch (int64 with wrap-around, as on every torch backend)."""
    import torch

    n_bins, s1 = cum.shape
    dev = device
    k = torch.arange(row0, row0 + rows, dtype=torch.int64, device=dev)[:, None]
    wo = torch.as_tensor(woff.astype(np.int64), device=dev)[None, :]
    gamma = _as_signed(int(GAMMA))
    base = _as_signed(int(key)) + (k * int(words) + wo) * gamma
    need = torch.as_tensor(cum, device=dev)[None].expand(rows, n_bins, s1).clone()
    le = torch.zeros((rows, n_bins, s1), dtype=torch.int64, device=dev)
    flagged = torch.zeros((rows, n_bins), dtype=torch.bool, device=dev)
    size = torch.as_tensor(sizes, device=dev)
    xp = torch.as_tensor(x_pad, device=dev)
    low = (1 << bits) - 1
    width = x_pad.shape[1]
    for h in range((width + 1) // 2):
        z = _mix_torch(base + _as_signed((h * int(GAMMA)) & _MASK64))
        for half, part in ((0, (z >> 32) & 0xFFFFFFFF), (1, z & 0xFFFFFFFF)):
            i = 2 * h + half
            if i >= width:
                break
            rem = size - i
            drawn = rem >= 2
            m = (part >> (32 - bits)) * rem.clamp(min=1)  # < 2**63: no sign trouble
            r = torch.where(drawn, m >> bits, 0)
            flagged |= ((m & low) < rem) & drawn
            xi = xp[:, i]
            for t in range(s1):
                c = r < need[:, :, t]
                le[:, :, t] += torch.where(c, xi, 0)
                need[:, :, t] -= c.to(torch.int64)
    out = le.cpu().numpy()
    flags = flagged.cpu().numpy()
    if flags.any():
        _fix_flagged(out, flags, x_pad, sizes, cum, key, key2, words, woff, row0, bits)
    return out


def perm_statistic_numpy(
    le: np.ndarray, totals: np.ndarray, counts: np.ndarray, supported: np.ndarray,
    exponent: int, weighted: bool,
) -> np.ndarray:
    """:func:`perm_statistic` in numpy: the same operations in the same order."""
    rows, n_bins, _ = le.shape
    weight = counts.sum(axis=1).astype(np.float64)
    total = 0.0
    for u in range(n_bins):
        total += float(weight[u])
    acc = np.zeros(rows)
    mg = np.full(rows, -np.inf)
    zeros = np.zeros((rows, 1), dtype=np.int64)
    for u in range(n_bins):  # bins, each vectorised over rows
        full = np.concatenate([zeros, le[:, u, :], np.full((rows, 1), totals[u])], axis=1)
        sums = np.ldexp(np.diff(full, axis=1).astype(np.float64), -exponent)
        g = sums[:, supported[u]] / counts[u, supported[u]].astype(np.float64)
        d = g.max(axis=1) - g.min(axis=1)
        acc = acc + weight[u] * d
        mg = np.maximum(mg, d)
    return acc / total if weighted else mg
