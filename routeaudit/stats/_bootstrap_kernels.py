"""Kernels of the bootstrap: multinomial resampling counts on a counter-based stream, and the
exact int64 segment sums every bootstrap statistic is built from (numba, numpy and torch give
the same bits).

Why: a bootstrap replicate of N units is N uniform picks with replacement. Drawing them as
uniforms from a ``numpy.random.Generator`` and scattering each pick's data into cell sums
(the earlier engine) reads the data in random order: at N = 1e6 that is two cache misses per
pick and ~30 ns, 1,000 replicates × 12 (summary, seed) pairs = 6 minutes. Here a replicate
first counts its picks into a one-byte-per-unit array (1 MB at N = 1e6, it stays in L2), then
streams the data once in order, adding ``count × value`` per segment: the data are read
sequentially and the random traffic stays in cache.

The stream: pick ``j`` of replicate ``k`` over ``n`` units is Lemire's bounded integer
``(u * n) >> 32`` of the high 32 bits ``u`` of SplitMix64's ``mix(key + c * GAMMA)`` at counter
``c = k * n + j``, exact by rejection: while ``(u * n) mod 2**32 < (2**32 - n) mod n`` (probability
below ``n / 2**32``) ``u`` is replaced by the high 32 bits of ``mix(s + a * GAMMA)``, attempt
``a = 1, 2, ...``, ``s = mix(key2 + c * GAMMA)`` (the rule of :mod:`routeaudit.stats._kernels`).
So replicate k is the same whatever the chunk size, the device or the implementation, and
every pick is exactly uniform. One-byte counts are exact: a replicate in which a unit is picked
``cap`` (255) times or more (probability ~1e-500 for n ≥ 256, but possible for tiny n) is
recomputed with int64 counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from routeaudit.stats._kernels import _LOW32, GAMMA, _as_signed, _jit, _mix, _mix_numpy, _mix_torch

try:  # numba is a core dependency; without it the numpy twin runs and prange is unused
    from numba import prange
except ImportError:  # pragma: no cover
    prange = range

if TYPE_CHECKING:
    import torch

__all__ = ["BYTE_CAP", "DRAW_BITS", "cell_sums", "counts", "counts_numpy", "picks_numpy",
           "segment_sums", "segment_sums_numpy", "segment_sums_torch"]

#: Bits per bounded draw; tests lower it (with n < 2**bits) to force rejections.
DRAW_BITS = 32
#: A replicate whose one-byte counts reach this is recomputed with int64 counts; tests lower
#: it to exercise that path.
BYTE_CAP = 255


# --------------------------------------------------------------------------- compiled


@_jit
def _pick(key: np.uint64, key2: np.uint64, c: np.uint64, n: np.uint64, bits: int) -> np.int64:
    """Uniform integer in [0, n) at stream counter c (exact: Lemire with rejection)."""
    shift = np.uint64(32 - bits)
    nbits = np.uint64(bits)
    low = (np.uint64(1) << nbits) - np.uint64(1)
    m = ((_mix(key + c * GAMMA) >> np.uint64(32)) >> shift) * n
    if (m & low) < n:
        threshold = (low + np.uint64(1) - n) % n
        if (m & low) < threshold:
            seed = _mix(key2 + c * GAMMA)
            attempt = np.uint64(1)
            while (m & low) < threshold:  # redraws: probability < n / 2**bits each
                m = ((_mix(seed + attempt * GAMMA) >> np.uint64(32)) >> shift) * n
                attempt += np.uint64(1)
    return np.int64(m >> nbits)


#: Picks drawn side by side (a vectorised block) before they are counted.
_BLOCK = 256


@_jit
def _count(key: np.uint64, key2: np.uint64, rep: int, n_units: int, bits: int, cap: int,
           w: np.ndarray) -> bool:
    """``w`` = pick counts of replicate ``rep``; False when a count reached ``cap``.

    Picks are drawn a block at a time without a branch (vectorised); the rare block where a
    pick might need a rejection (``m mod 2**bits < n``) has those picks redrawn exactly by
    :func:`_pick`.
    """
    for j in range(n_units):
        w[j] = 0
    n = np.uint64(n_units)
    shift = np.uint64(32 - bits)
    nbits = np.uint64(bits)
    low = (np.uint64(1) << nbits) - np.uint64(1)
    base = key + np.uint64(rep) * n * GAMMA
    buf = np.empty(_BLOCK, np.uint64)
    ok = True
    for j0 in range(0, n_units, _BLOCK):
        size = min(_BLOCK, n_units - j0)
        lowest = low
        for i in range(size):  # vectorised
            m = ((_mix(base + np.uint64(j0 + i) * GAMMA) >> np.uint64(32)) >> shift) * n
            buf[i] = m
            lowest = min(lowest, m & low)
        if lowest < n:
            for i in range(size):
                if (buf[i] & low) < n:
                    c = np.uint64(rep) * n + np.uint64(j0 + i)
                    buf[i] = np.uint64(_pick(key, key2, c, n, bits)) << nbits
        for i in range(size):
            p = buf[i] >> nbits
            v = np.int64(w[p]) + 1
            w[p] = v
            if v >= cap:
                ok = False
    return ok


@_jit
def _segments(w: np.ndarray, unit: np.ndarray, values: np.ndarray, weight: np.ndarray,
              starts: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
    """Σ count × value and Σ count × weight (weight 1 when ``weight`` is empty) over each
    segment, in one ordered pass."""
    identity = unit.size == 0
    unweighted = weight.size == 0
    for s in range(starts.size - 1):
        acc = np.int64(0)
        cnt = np.int64(0)
        lo, hi = starts[s], starts[s + 1]
        if identity and unweighted:  # one tight loop per case, each vectorised
            for k in range(lo, hi):
                wk = np.int64(w[k])
                acc += wk * values[k]
                cnt += wk
        elif identity:
            for k in range(lo, hi):
                wk = np.int64(w[k])
                acc += wk * values[k]
                cnt += wk * weight[k]
        elif unweighted:
            for k in range(lo, hi):
                wk = np.int64(w[unit[k]])
                acc += wk * values[k]
                cnt += wk
        else:
            for k in range(lo, hi):
                wk = np.int64(w[unit[k]])
                acc += wk * values[k]
                cnt += wk * weight[k]
        sums[s] = acc
        counts[s] = cnt


def _segment_sums(key: np.uint64, key2: np.uint64, row0: int, rows: int, n_units: int,
                  unit: np.ndarray, values: np.ndarray, weight: np.ndarray, starts: np.ndarray,
                  bits: int, cap: int, n_threads: int, sums: np.ndarray, counts: np.ndarray
                  ) -> None:
    """Segment sums of bootstrap replicates ``row0 .. row0 + rows - 1``.

    Position ``k`` of ``values`` / ``weight`` (empty: all 1) belongs to unit ``unit[k]`` (or
    unit ``k`` when ``unit`` is empty); segment ``s`` is positions ``starts[s] .. starts[s + 1]
    - 1``. Row r of ``sums`` / ``counts`` gets Σ w_u · values and Σ w_u · weight per segment,
    w_u being how often replicate row0 + r picks unit u. Replicates are split over
    ``n_threads`` threads; each is computed whole by one thread, so the integers do not
    depend on the thread count.
    """
    for t in prange(n_threads):
        small = np.empty(n_units, np.uint8)
        for r in range(t, rows, n_threads):
            if _count(key, key2, row0 + r, n_units, bits, cap, small):
                _segments(small, unit, values, weight, starts, sums[r], counts[r])
            else:  # a unit picked >= cap times: exact int64 counts for this replicate
                wide = np.empty(n_units, np.int64)
                _count(key, key2, row0 + r, n_units, bits, 1 << 62, wide)
                _segments(wide, unit, values, weight, starts, sums[r], counts[r])


segment_sums = _jit(_segment_sums, parallel=True)


def _cell_sums(key: np.uint64, key2: np.uint64, row0: int, rows: int, n_units: int,
               unit: np.ndarray, cell: np.ndarray, values: np.ndarray, tile: np.ndarray,
               bits: int, n_threads: int, sums: np.ndarray, sizes: np.ndarray) -> None:
    """Float cell sums of bootstrap replicates ``row0 .. row0 + rows - 1``, for M rows of data.

    ``sums[r, j, c]`` = Σ w_i · ``values[j, i]`` over the examples i with ``cell[j, i] == c``
    and ``sizes[r, t]`` = Σ w_i over the examples with ``tile[i] == t``, w_i being how often
    replicate row0 + r picks example i (its unit ``unit[i]``; i itself when ``unit`` is
    empty). Each sum adds ``float(w_i) * value`` in example order, as ``np.bincount`` does
    with those weights, so the result is bit for bit the numpy expression's
    (:func:`routeaudit.stats.bootstrap.bootstrap_worst_tile_ece`). Replicates are split over
    threads, each computed whole by one thread.
    """
    m, n = values.shape
    identity = unit.size == 0
    for t in prange(n_threads):
        w = np.empty(n_units, np.int64)
        picked = np.empty(n, np.int64)  # the examples a replicate picks, in example order
        we = np.empty(n, np.float64)  # and their weights, gathered once per replicate
        for r in range(t, rows, n_threads):
            _count(key, key2, row0 + r, n_units, bits, 1 << 62, w)
            # Examples not picked (~37%) are skipped: a sum starting at +0.0 never becomes
            # -0.0, so adding their ±0.0 terms changes no bit (the numpy path adds them).
            k = 0
            for i in range(n):  # branch-free compaction
                wi = w[i] if identity else w[unit[i]]
                picked[k] = i
                we[k] = np.float64(wi)
                k += wi != 0
            out, size = sums[r], sizes[r]
            out[:] = 0.0
            size[:] = 0.0
            for q in range(k):
                size[tile[picked[q]]] += we[q]
            for j in range(m):
                row, cj, oj = values[j], cell[j], out[j]
                for q in range(k):
                    i = picked[q]
                    oj[cj[i]] += we[q] * row[i]


cell_sums = _jit(_cell_sums, parallel=True)


@_jit
def counts(key: np.uint64, key2: np.uint64, row0: int, rows: int, n_units: int, bits: int,
           out: np.ndarray) -> None:
    """``out[r]`` = int64 pick counts of replicate row0 + r (the weights of a bootstrap)."""
    for r in range(rows):
        _count(key, key2, row0 + r, n_units, bits, 1 << 62, out[r])


# --------------------------------------------------------------------------- numpy twin


def _redraw(m: np.ndarray, c: np.ndarray, key2: int, n: np.uint64, bits: int) -> np.ndarray:
    """Lemire's exact rejection for the picks ``m = u * n`` at counters ``c`` (in place)."""
    shift, low = np.uint64(32 - bits), np.uint64((1 << bits) - 1)
    threshold = (low + np.uint64(1) - n) % n
    redo = np.nonzero((m & low) < threshold)
    if redo[0].size:  # rare: each pick is redrawn with probability < n / 2**bits
        seed = _mix_numpy(np.uint64(key2) + c[redo] * GAMMA)
        mr = m[redo]
        attempt = 1
        while True:
            again = (mr & low) < threshold
            if not again.any():
                break
            z = _mix_numpy(seed[again] + np.uint64(attempt) * GAMMA)
            mr[again] = ((z >> np.uint64(32)) >> shift) * n
            attempt += 1
        m[redo] = mr
    return m


def picks_numpy(key: int, key2: int, row0: int, rows: int, n_units: int, bits: int = DRAW_BITS
                ) -> np.ndarray:
    """The units picked by replicates ``row0 .. row0 + rows - 1``: int64 [rows, n_units]."""
    n = np.uint64(n_units)
    with np.errstate(over="ignore"):
        c = (np.arange(row0, row0 + rows, dtype=np.uint64)[:, None] * n
             + np.arange(n_units, dtype=np.uint64)[None, :])
        m = ((_mix_numpy(np.uint64(key) + c * GAMMA) >> np.uint64(32)) >> np.uint64(32 - bits)) * n
        m = _redraw(m, c, key2, n, bits)
    return (m >> np.uint64(bits)).astype(np.int64)


def counts_numpy(key: int, key2: int, row0: int, rows: int, n_units: int, bits: int = DRAW_BITS
                 ) -> np.ndarray:
    """How often each replicate picks each unit: int64 [rows, n_units]."""
    picks = picks_numpy(key, key2, row0, rows, n_units, bits)
    picks += (np.arange(rows, dtype=np.int64) * n_units)[:, None]
    return np.bincount(picks.reshape(-1), minlength=rows * n_units).reshape(rows, n_units)


def segment_sums_numpy(key: int, key2: int, row0: int, rows: int, n_units: int, unit: np.ndarray,
                       values: np.ndarray, weight: np.ndarray, starts: np.ndarray,
                       bits: int = DRAW_BITS) -> tuple[np.ndarray, np.ndarray]:
    """:func:`segment_sums` in numpy (the same integers; segments must not be empty)."""
    w = counts_numpy(key, key2, row0, rows, n_units, bits)
    if unit.size:
        w = w[:, unit]
    first = starts[:-1]
    q = w if weight.size == 0 else w * weight[None, :]
    return np.add.reduceat(w * values[None, :], first, axis=1), np.add.reduceat(q, first, axis=1)


def segment_sums_torch(key: int, key2: int, row0: int, rows: int, n_units: int, unit: np.ndarray,
                       values: np.ndarray, weight: np.ndarray, starts: np.ndarray,
                       device: torch.device, bits: int = DRAW_BITS) -> tuple[np.ndarray, np.ndarray]:
    """:func:`segment_sums` in torch on ``device`` (int64 with wrap-around; the rare picks
    that need a rejection are redrawn by :func:`picks_numpy`'s rule on the CPU)."""
    import torch

    dev = device
    n = int(n_units)
    k = torch.arange(row0, row0 + rows, dtype=torch.int64, device=dev)[:, None]
    c = k * n + torch.arange(n, dtype=torch.int64, device=dev)[None, :]
    z = _mix_torch(_as_signed(int(key)) + c * _as_signed(int(GAMMA)))
    m = ((z >> 32) & int(_LOW32)) >> (32 - bits)
    m = m * n  # < 2**64; bits are right, the sign may not be
    low = (1 << bits) - 1
    picks = (m >> bits) & ((1 << (64 - bits)) - 1)
    threshold = ((1 << bits) - n) % n
    redo = (m & low) < threshold
    if bool(redo.any()):  # rare: redrawn on the CPU by the numpy rule
        cr = c[redo].cpu().numpy().view(np.uint64)
        mr = m[redo].cpu().numpy().view(np.uint64)
        with np.errstate(over="ignore"):
            mr = _redraw(mr.copy(), cr, key2, np.uint64(n), bits)
        picks[redo] = torch.as_tensor((mr >> np.uint64(bits)).astype(np.int64), device=dev)
    flat = (picks + k.sub(row0) * n).reshape(-1)
    w = torch.zeros(rows * n, dtype=torch.int64, device=dev)
    w.scatter_add_(0, flat, torch.ones_like(flat))
    w = w.view(rows, n)
    if unit.size:
        w = w[:, torch.as_tensor(unit, device=dev)]
    seg = torch.as_tensor(np.repeat(np.arange(starts.size - 1), np.diff(starts)), device=dev)
    v = torch.as_tensor(values, device=dev)[None, :] * w
    q = w if weight.size == 0 else torch.as_tensor(weight, device=dev)[None, :] * w
    n_seg = starts.size - 1
    sums = torch.zeros((rows, n_seg), dtype=torch.int64, device=dev).index_add_(1, seg, v)
    counts = torch.zeros((rows, n_seg), dtype=torch.int64, device=dev).index_add_(1, seg, q)
    return sums.cpu().numpy(), counts.cpu().numpy()
