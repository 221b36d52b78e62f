"""Calibration metrics as pure functions on numpy arrays (docs/methods.md §2.2, §2.3, §5).

Every function takes per-example arrays and returns a float (or a small array); nothing is
stored. Accumulation is float64 whatever the input dtype. The conventions, pinned because
the established libraries disagree on them (see ``reference-values.md``):

* **Bins.** ``n_bins`` equal-width bins with edges ``np.linspace(0, 1, n_bins + 1)``.
  ``closed="right"`` (the default) gives ``(lo, hi]`` bins as in Guo et al.'s reference
  code, with the first bin closed at 0 so ``conf == 0`` lands in bin 0; a value equal to an
  edge goes to the lower bin. ``closed="left"`` gives ``[lo, hi)`` bins (netcal,
  torchmetrics, relplot), with the last bin closed so ``conf == 1`` lands in the last bin,
  not in the extra bin torchmetrics and relplot give it.
* **Empty bins** contribute 0 to ECE and are left out of every max (MCE).
* **ECE** is top-label, from ``(conf, correct)``; **classwise ECE** is the *mean* over
  classes (Kull et al. 2019), with every example in every class's bins.
* **SmoothECE** reproduces relplot 1.0.3's binned estimator (not an exact kernel).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Literal

import numpy as np

__all__ = [
    "BinClosure",
    "bin_indices",
    "binary_brier",
    "binary_nll",
    "brier",
    "classwise_ece",
    "confidence_and_correct",
    "ece",
    "equal_mass_edges",
    "log_softmax",
    "mce",
    "nll",
    "per_example_nll",
    "predictive_entropy",
    "quantile_tiles",
    "smooth_ece",
    "softmax",
    "tile_ece",
    "worst_tile_ece",
]

BinClosure = Literal["right", "left"]
BinStrategy = Literal["equal_width", "equal_mass"]
Norm = Literal["l1", "l2", "max"]

NLL_EPS = 1e-12  # floor on p_label in `nll`
BINARY_NLL_EPS = 1e-6  # clip of p in `binary_nll` (docs/methods.md §2.6 numerical guards)
SMECE_DENSITY_EPS = 1e-4  # relplot 1.0.3's additive density floor
_MAX_BINS = 10**6  # one bincount of this length per block
# Examples are processed in blocks of this many so that every temporary stays in L2 cache;
# the loop is over blocks, never over bins or examples.
_CHUNK = 1 << 15
# Equal-width bin sums of at least this many examples run the compiled kernels (numba) when
# numba is importable; smaller inputs (and every input without numba) take the numpy path.
# Both give the same bits. Tests set _USE_NUMBA = False to compare the two.
_KERNEL_MIN = 1 << 16
_USE_NUMBA = os.environ.get("ROUTEAUDIT_NUMBA", "1") != "0"
_BLOCK = 1024  # examples per block of the compiled one-pass kernel (stays in L1)
_COPIES = 8  # interleaved copies of the bin sums in that kernel (breaks store-load chains)


# --------------------------------------------------------------------------- validation


def _as_float_1d(x: object, name: str) -> np.ndarray:
    """1-D float32/float64 view of ``x`` (other dtypes are converted to float64)."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype not in (np.float64, np.float32):
        a = a.astype(np.float64)
    return a


def _as_outcome_1d(x: object, name: str) -> np.ndarray:
    """1-D outcome array: bool kept as is (no check needed), anything else as float."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype == np.bool_:
        return a
    return _as_float_1d(a, name)


def _raise_bad_unit(name: str, a: np.ndarray, offset: int = 0) -> None:
    """Raise a ValueError naming the first value of ``a`` outside [0, 1] (or not finite)."""
    a64 = np.asarray(a, dtype=np.float64)
    bad = ~((a64 >= 0.0) & (a64 <= 1.0))
    if not bad.any():
        return
    i = int(np.argmax(bad))
    v = float(a64[i])
    what = "is not finite" if not math.isfinite(v) else "is outside [0, 1]"
    raise ValueError(f"{name}[{i + offset}] = {v!r} {what}; {name} must lie in [0, 1]")


# Bit patterns of 1.0: a non-negative finite float is <= 1.0 iff its bits (as an unsigned int)
# are <= these; negative values, inf and NaN all compare greater. -0.0 fails this fast test
# and is then accepted by the exact check in `_raise_bad_unit`.
_ONE_BITS = {
    np.dtype(np.float64): (np.uint64, np.uint64(0x3FF0000000000000)),
    np.dtype(np.float32): (np.uint32, np.uint32(0x3F800000)),
}


def _check_unit(name: str, a: np.ndarray, offset: int = 0) -> None:
    """Fast check that a float array lies in [0, 1] (NaN and inf rejected)."""
    if a.dtype == np.bool_ or a.size == 0:
        return
    utype, one = _ONE_BITS[a.dtype]
    if a.view(utype).max() > one:
        _raise_bad_unit(name, a, offset)


def _check_pair(conf: object, correct: object) -> tuple[np.ndarray, np.ndarray]:
    c = _as_float_1d(conf, "conf")
    y = _as_outcome_1d(correct, "correct")
    if c.shape != y.shape:
        raise ValueError(f"conf and correct must have the same length, got {c.size} and {y.size}")
    return c, y


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)):
        raise ValueError(f"n_bins must be an int, got {n_bins!r}")
    if not 1 <= int(n_bins) <= _MAX_BINS:
        raise ValueError(f"n_bins must be in [1, {_MAX_BINS}], got {n_bins}")
    return int(n_bins)


def _check_closed(closed: str) -> None:
    if closed not in ("right", "left"):
        raise ValueError(f"closed must be 'right' or 'left', got {closed!r}")


def _check_labels(labels: object, n: int, n_classes: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size != n:
        raise ValueError(f"labels must be 1-D with {n} entries, got shape {lab.shape}")
    integral = np.issubdtype(lab.dtype, np.integer) or (
        np.issubdtype(lab.dtype, np.floating) and bool(np.all(lab == np.round(lab)))
    )
    if lab.size and not integral:
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    bad = (lab < 0) | (lab >= n_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"labels[{i}] = {lab[i]} is outside [0, {n_classes - 1}]")
    return lab


def _check_probs_2d(probs: object, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_examples, n_classes), got shape {p.shape}")
    if p.size and not ((p >= 0.0) & (p <= 1.0)).all():
        i, j = (int(v) for v in np.argwhere(~((p >= 0.0) & (p <= 1.0)))[0])
        v = float(p[i, j])
        what = "is not finite" if not math.isfinite(v) else "is outside [0, 1]"
        raise ValueError(f"{name}[{i}, {j}] = {v!r} {what}; {name} must lie in [0, 1]")
    return p


# --------------------------------------------------------------------------- binning


@lru_cache(maxsize=128)
def _width_plan(n_bins: int) -> tuple[float, float, np.ndarray | None]:
    """Constants for exact equal-width binning with ``n_bins`` bins.

    Returns ``(scale, step, edges)``. ``scale`` is ``n_bins`` nudged up by 2**-45 so that
    ``floor(c * scale)`` is the true bin ``t`` or ``t + 1`` (never ``t - 1``), whatever the
    rounding; one comparison against the lower edge of that candidate then settles it.
    ``np.linspace`` builds its edges as ``m * step`` with ``step = fl(1 / n_bins)``, so the
    lower edge is recomputed with one multiply; ``edges`` is returned (for a table look-up)
    only if some numpy build does it differently.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    step = float(edges[1])
    arithmetic = np.array_equal(np.arange(n_bins, dtype=np.float64) * step, edges[:-1])
    scale = n_bins * (1.0 + 2.0**-45)
    return scale, step, (None if arithmetic else edges)


def _coarse_bins(
    c: np.ndarray,
    plan: tuple[float, float, np.ndarray | None],
    closed: BinClosure,
    fx: np.ndarray,
    ib: np.ndarray,
    down: np.ndarray,
) -> None:
    """Candidate bin ``ib`` in [0, n_bins] and mask ``down`` of entries whose bin is ``ib - 1``.

    The true bin is ``clip(ib - down, 0, n_bins - 1)``; ``ib == n_bins`` only happens for
    values in the last bin and ``ib - down == -1`` only for ``c == 0`` under "right".
    Writes into the caller's buffers (all of ``c``'s length) so nothing is allocated.
    """
    scale, step, edges = plan  # from `_width_plan(n_bins)`
    np.multiply(c, scale, out=fx, dtype=np.float64)
    np.floor(fx, out=fx)
    np.copyto(ib, fx, casting="unsafe")
    if edges is None:
        np.multiply(fx, step, out=fx)  # lower edge of the candidate, bit-equal to linspace
    else:
        np.take(edges, ib, out=fx)
    # (lo, hi]: c on the candidate's lower edge belongs one bin down; [lo, hi): only c below it.
    (np.less_equal if closed == "right" else np.less)(c, fx, out=down)


def _width_bin_sums(
    conf: np.ndarray,
    correct: np.ndarray,
    n_bins: int,
    closed: BinClosure,
    *,
    counts: bool,
    group: np.ndarray | None = None,
    n_groups: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-(group, bin) residual sums ``S = Σ (c - y)`` and, if asked, counts.

    One pass over the data in cache-sized blocks: bin candidates, a comparison, and one
    weighted ``np.bincount`` (plus an unweighted one for counts). The rare entries whose
    candidate is one bin too high are moved afterwards. Also validates ``conf``/``correct``.
    Large inputs run the compiled one-pass kernel instead, with the same result bit for bit.
    """
    n = conf.size
    if n >= _KERNEL_MIN:
        compiled = _width_bin_sums_compiled(conf, correct, n_bins, closed, counts, group, n_groups)
        if compiled is not None:
            return compiled
    width = n_bins + 1  # slot n_bins collects last-bin values, folded back below
    size = n_groups * width
    s_acc = np.zeros(size)
    n_acc = np.zeros(size, dtype=np.int64) if counts else None
    m = min(n, _CHUNK)
    fx = np.empty(m)
    ib = np.empty(m, dtype=np.intp)
    down = np.empty(m, dtype=np.bool_)
    r = np.empty(m)
    key = np.empty(m, dtype=np.intp) if group is not None else None
    plan = _width_plan(n_bins)
    for start in range(0, n, _CHUNK):
        c = conf[start : start + _CHUNK]
        y = correct[start : start + _CHUNK]
        k = c.size
        if k != m:
            fx, ib, down, r = fx[:k], ib[:k], down[:k], r[:k]
            key = key[:k] if key is not None else None
        _check_unit("conf", c, start)
        _check_unit("correct", y, start)
        _coarse_bins(c, plan, closed, fx, ib, down)
        if y.dtype == np.bool_:
            np.copyto(r, y)  # bool -> float64 here is cheaper than inside the subtract
            np.subtract(c, r, out=r, dtype=np.float64)
        else:
            np.subtract(c, y, out=r, dtype=np.float64)
        if group is not None:
            np.multiply(group[start : start + _CHUNK], width, out=key)
            np.add(key, ib, out=key)
            idx = key
        else:
            idx = ib
        s_acc += np.bincount(idx, r, size)
        if n_acc is not None:
            n_acc += np.bincount(idx, minlength=size)
        if np.count_nonzero(down):
            sel = np.flatnonzero(down)
            src = idx[sel]
            dst = np.where(ib[sel] > 0, src - 1, src)  # c == 0 under "right" stays in bin 0
            moved = r[sel]
            s_acc += np.bincount(dst, moved, size) - np.bincount(src, moved, size)
            if n_acc is not None:
                n_acc += np.bincount(dst, minlength=size) - np.bincount(src, minlength=size)
    return _fold_last_slot(s_acc, n_acc, n_bins, n_groups)


def _fold_last_slot(
    s_acc: np.ndarray, n_acc: np.ndarray | None, n_bins: int, n_groups: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-(group, bin) sums from per-slot sums: slot n_bins joins the last bin."""
    width = n_bins + 1
    s2 = s_acc.reshape(n_groups, width)
    s2[:, n_bins - 1] += s2[:, n_bins]
    s_out = s2[:, :n_bins].copy()
    n_out = None
    if n_acc is not None:
        n2 = n_acc.reshape(n_groups, width)
        n2[:, n_bins - 1] += n2[:, n_bins]
        n_out = n2[:, :n_bins].copy()
    return s_out, n_out


# --------------------------------------------------------------------------- compiled bin sums
#
# The numpy path above adds residuals into each slot in a fixed order (per block of _CHUNK
# examples, then the moved entries), and float addition is not associative, so a faster
# order could change the last bits of an ECE. The compiled path keeps the bits: its one-pass
# kernel checks that every residual is a multiple of 2**-K with n * 2**(K+1) <= 2**53; then
# every partial sum of any order is exact, so any order gives the numpy path's value. Slots
# touched by a residual that fails the check (a float32 confidence below about 2**(23-K))
# are recomputed by a kernel that follows the numpy path's order exactly; data that fails it
# from the first block on (float64 confidences with full mantissas) takes the numpy path.


def _fast_width_sums(
    conf: np.ndarray, correct: np.ndarray, cbits: np.ndarray, ybits: np.ndarray, cone: Any,
    yone: Any, group: np.ndarray, scale: float, step: float, edges: np.ndarray, use_table: bool,
    right: bool, width: int, size: int, two_k: float, want_counts: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One pass: per-slot sums and counts in any order, the slots whose sums might not be
    exact, and a status: 0 done, 1 some input is outside [0, 1], 2 the first block already
    has inexact residuals (float64 data: the numpy path's order is needed everywhere).

    ``cbits``/``ybits`` are the inputs' bits as unsigned integers and ``cone``/``yone`` the
    bits of 1.0 (1 for bool): a value is in [0, 1] iff its bits are at most those (-0.0 fails
    too; the numpy path then accepts it).
    """
    acc = np.zeros(_COPIES * size)
    cnt = np.zeros(_COPIES * size, np.int64)
    flags = np.zeros(size, np.bool_)
    slot = np.empty(_BLOCK, np.int64)
    rr = np.empty(_BLOCK)
    grouped = group.size > 0
    n = conf.size
    for start in range(0, n, _BLOCK):
        m = min(_BLOCK, n - start)
        c = conf[start : start + m]
        y = correct[start : start + m]
        cb = cbits[start : start + m]
        yb = ybits[start : start + m]
        cmax = cb[0]
        ymax = yb[0]
        n_inexact = 0
        for j in range(m):  # vectorised: range check, bin, residual, exactness
            cmax = max(cmax, cb[j])
            ymax = max(ymax, yb[j])
            cv = np.float64(c[j])
            fx = math.floor(cv * scale)
            down = (cv <= fx * step) if right else (cv < fx * step)
            slot[j] = max(np.int64(fx) - np.int64(down), 0)
            r = cv - np.float64(y[j])
            rr[j] = r
            t = r * two_k
            n_inexact += t != math.floor(t)
        if cmax > cone or ymax > yone:
            return acc[:size], cnt[:size], flags, 1
        if n_inexact and start == 0:
            return acc[:size], cnt[:size], flags, 2
        if use_table:  # a numpy build whose linspace edges are not m * step: look them up
            for j in range(m):
                cv = np.float64(c[j])
                ib = np.int64(math.floor(cv * scale))
                down = (cv <= edges[ib]) if right else (cv < edges[ib])
                slot[j] = max(ib - np.int64(down), 0)
        if grouped:
            for j in range(m):
                slot[j] += group[start + j] * width
        if n_inexact:  # flag the slots these residuals pass through in the numpy path
            for j in range(m):
                r = rr[j] * two_k
                if r != math.floor(r):
                    ib = np.int64(math.floor(np.float64(c[j]) * scale))
                    flags[ib + (group[start + j] * width if grouped else 0)] = True
                    flags[slot[j]] = True
        mm = m - m % _COPIES
        for j in range(0, mm, _COPIES):  # the scatter, into 8 copies: no store-to-load chains
            acc[slot[j]] += rr[j]
            acc[size + slot[j + 1]] += rr[j + 1]
            acc[2 * size + slot[j + 2]] += rr[j + 2]
            acc[3 * size + slot[j + 3]] += rr[j + 3]
            acc[4 * size + slot[j + 4]] += rr[j + 4]
            acc[5 * size + slot[j + 5]] += rr[j + 5]
            acc[6 * size + slot[j + 6]] += rr[j + 6]
            acc[7 * size + slot[j + 7]] += rr[j + 7]
        for j in range(mm, m):
            acc[slot[j]] += rr[j]
        if want_counts:
            for j in range(m):
                cnt[slot[j] + (j % _COPIES) * size] += 1
    sums = acc[:size].copy()
    counts = cnt[:size].copy()
    for k in range(1, _COPIES):
        for i in range(size):
            sums[i] += acc[k * size + i]
            counts[i] += cnt[k * size + i]
    return sums, counts, flags, 0


def _ordered_width_sums(
    conf: np.ndarray, correct: np.ndarray, group: np.ndarray, scale: float, step: float,
    edges: np.ndarray, use_table: bool, right: bool, width: int, size: int, chunk: int,
    want: np.ndarray,
) -> np.ndarray:
    """Sums of the slots in ``want`` in the numpy path's exact order of additions
    (blocks of ``chunk``, then the entries moved one bin down); other slots are garbage."""
    s_acc = np.zeros(size)
    cs = np.empty(size)
    ds = np.empty(size)
    ss = np.empty(size)
    grouped = group.size > 0
    n = conf.size
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        cs[:] = 0.0
        ds[:] = 0.0
        ss[:] = 0.0
        moved = False
        for i in range(start, stop):
            cv = np.float64(conf[i])
            fx = math.floor(cv * scale)
            ib = np.int64(fx)
            lower = edges[ib] if use_table else fx * step
            down = (cv <= lower) if right else (cv < lower)
            idx = ib + group[i] * width if grouped else ib
            moved |= down
            if want[idx]:
                cs[idx] += cv - np.float64(correct[i])
            dst = idx - 1 if down and ib > 0 else idx
            if down and (want[idx] or want[dst]):
                r = cv - np.float64(correct[i])
                ds[dst] += r
                ss[idx] += r
        for k in range(size):
            s_acc[k] += cs[k]
        if moved:
            for k in range(size):
                s_acc[k] += ds[k] - ss[k]
    return s_acc


@lru_cache(maxsize=1)
def _compiled_kernels() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """The two kernels, compiled with numba on first use (cached on disk), or None."""
    try:
        import numba
    except ImportError:
        return None
    if numba.config.DISABLE_JIT:
        return None

    def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return numba.njit(cache=True, nogil=True)(fn)
        except RuntimeError:  # no writable cache directory: compile once per process
            return numba.njit(cache=False, nogil=True)(fn)

    try:
        return numba.njit(cache=True, nogil=True)(_fast_width_sums), jit(_ordered_width_sums)
    except RuntimeError:
        warnings.warn("numba cannot cache the ECE kernels (no writable cache directory; set "
                      "NUMBA_CACHE_DIR): they are compiled once per process", RuntimeWarning,
                      stacklevel=3)
        return jit(_fast_width_sums), jit(_ordered_width_sums)


def _width_bin_sums_compiled(
    conf: np.ndarray,
    correct: np.ndarray,
    n_bins: int,
    closed: BinClosure,
    counts: bool,
    group: np.ndarray | None,
    n_groups: int,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """:func:`_width_bin_sums` bit for bit, in one pass; None when numba is unavailable, an
    input is out of range (the numpy path then raises the usual error) or the first block
    already has residuals that are not multiples of 2**-K (float64 data: the numpy path's
    order of additions is needed everywhere, and numpy is as fast at it)."""
    kernels = _compiled_kernels() if _USE_NUMBA else None
    if kernels is None:
        return None
    fast, ordered = kernels
    scale, step, edges = _width_plan(n_bins)
    table = np.zeros(1) if edges is None else edges
    width = n_bins + 1
    size = n_groups * width
    g = np.zeros(0, dtype=np.intp) if group is None else np.ascontiguousarray(group, dtype=np.intp)
    two_k = math.ldexp(1.0, 52 - int(conf.size).bit_length())
    c = np.ascontiguousarray(conf)
    y = np.ascontiguousarray(correct)
    ctype, cone = _ONE_BITS[c.dtype]
    ytype, yone = (np.uint8, np.uint8(1)) if y.dtype == np.bool_ else _ONE_BITS[y.dtype]
    args = (g, scale, step, table, edges is not None, closed == "right", width, size)
    sums, cnt, flags, status = fast(c, y, c.view(ctype), y.view(ytype), cone, yone, *args, two_k, counts)
    if status:  # an input outside [0, 1] (the numpy path raises), or float64 data throughout
        return None
    if flags.any():  # a few slots saw residuals that are not multiples of 2**-K
        exact = ordered(c, y, *args, _CHUNK, flags)
        sums[flags] = exact[flags]
    return _fold_last_slot(sums, cnt if counts else None, n_bins, n_groups)


def bin_indices(
    conf: np.ndarray,
    n_bins: int = 15,
    closed: BinClosure = "right",
    *,
    strategy: BinStrategy = "equal_width",
) -> np.ndarray:
    """Bin index (0 .. n_bins-1) of each confidence, exact at the edges.

    The one binning rule of the package: the metrics, the matched-confidence audits and the
    worst-tertile bootstrap all call it. ``strategy="equal_mass"`` uses the edges of
    :func:`equal_mass_edges` with the same closure rule; what follows describes the default
    equal-width bins.

    Edges are ``e = np.linspace(0, 1, n_bins + 1)``. With ``closed="right"`` bin ``m`` is
    ``(e[m], e[m+1]]`` (first bin ``[0, e[1]]``); with ``closed="left"`` it is
    ``[e[m], e[m+1])`` (last bin ``[e[B-1], 1]``). A value exactly equal to ``e[m]`` goes
    to the lower bin under "right" and the upper one under "left".

    Computed as ``floor(c * B)`` (nudged up) followed by a one-comparison correction
    against the linspace edge, so it costs a few passes over memory, not a search.

    Args:
        conf: 1-D confidences in [0, 1] (float32 or float64; NaN/inf rejected).
        n_bins: number of bins ``B``.
        closed: which side of each bin is closed.

    Returns:
        int64 array of the same length as ``conf``.

    Example:
        >>> bin_indices(np.array([0.0, 0.2, 0.5, 1.0]), n_bins=5)
        array([0, 0, 2, 4])
        >>> bin_indices(np.array([0.0, 0.2, 0.5, 1.0]), n_bins=5, closed="left")
        array([0, 1, 2, 4])
    """
    c = _as_float_1d(conf, "conf")
    n_bins = _check_n_bins(n_bins)
    _check_closed(closed)
    if strategy == "equal_mass":
        if c.size == 0:
            return np.zeros(0, dtype=np.int64)
        return _edge_bins(c, equal_mass_edges(c, n_bins), closed).astype(np.int64)
    if strategy != "equal_width":
        raise ValueError(f"strategy must be 'equal_width' or 'equal_mass', got {strategy!r}")
    n = c.size
    out = np.empty(n, dtype=np.int64)
    m = min(n, _CHUNK)
    fx = np.empty(m)
    down = np.empty(m, dtype=np.bool_)
    plan = _width_plan(n_bins)
    for start in range(0, n, _CHUNK):
        cc = c[start : start + _CHUNK]
        k = cc.size
        _check_unit("conf", cc, start)
        ib = out[start : start + k]
        _coarse_bins(cc, plan, closed, fx[:k], ib, down[:k])
        np.subtract(ib, down[:k], out=ib, casting="unsafe")
    np.clip(out, 0, n_bins - 1, out=out)
    return out


def equal_mass_edges(conf: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """Equal-mass (quantile) bin edges, as netcal's ``equal_intervals=False``.

    ``e = np.quantile(conf, linspace(0, 1, B + 1))`` (linear interpolation) with ``e[0] = 0``
    and ``e[B] = 1`` forced, so every confidence in [0, 1] falls in some bin. With ties,
    several edges can coincide and some bins are then empty.
    """
    c = _as_float_1d(conf, "conf")
    n_bins = _check_n_bins(n_bins)
    _check_unit("conf", c)
    if c.size == 0:
        raise ValueError("conf is empty; equal-mass edges need at least one value")
    edges = np.quantile(c.astype(np.float64), np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = 0.0, 1.0
    return edges


def _edge_bins(c: np.ndarray, edges: np.ndarray, closed: BinClosure) -> np.ndarray:
    """Bin index for arbitrary sorted edges (first and last bin closed at 0 and 1)."""
    side = "left" if closed == "right" else "right"
    return np.searchsorted(edges[1:-1], c, side=side).astype(np.intp)


def _bin_sums(
    c: np.ndarray,
    y: np.ndarray,
    n_bins: int,
    closed: BinClosure,
    strategy: BinStrategy,
    counts: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(S_b, n_b) for one group, for either strategy (validates inputs)."""
    if strategy == "equal_width":
        s, n = _width_bin_sums(c, y, n_bins, closed, counts=counts)
        return s[0], (None if n is None else n[0])
    if strategy != "equal_mass":
        raise ValueError(f"strategy must be 'equal_width' or 'equal_mass', got {strategy!r}")
    _check_unit("correct", y)
    idx = _edge_bins(c, equal_mass_edges(c, n_bins), closed)
    r = np.subtract(c, y, dtype=np.float64)
    return np.bincount(idx, r, n_bins), np.bincount(idx, minlength=n_bins)


# --------------------------------------------------------------------------- top-label inputs


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, max-shifted so it cannot overflow.

    The one softmax of the package: confidences, calibrator inputs, derived features and the
    reported probabilities all come from it.

    Example:
        >>> softmax(np.log([[0.2, 0.8]])).round(6).tolist()
        [[0.2, 0.8]]
    """
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (max-shifted, then minus the log normaliser)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def predictive_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy of the softmax, −Σ_k p_k log p_k in nats (0 · log 0 = 0), per example."""
    p = softmax(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


def per_example_nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """−log softmax(z)_y per example (float64): the multiclass NLL before averaging."""
    lab = np.asarray(labels, dtype=np.int64)
    return -log_softmax(logits)[np.arange(lab.size), lab]



def confidence_and_correct(
    logits_or_probs: np.ndarray, labels: np.ndarray, *, from_logits: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence ``c_i = max_k p_ik`` and correctness ``1[argmax_k p_ik = y_i]``.

    With ``from_logits`` the softmax is taken in float64 after subtracting the row max
    (so it cannot overflow). ``argmax`` ties go to the lowest class index.

    Args:
        logits_or_probs: (N, K) logits, or probabilities if ``from_logits=False``.
        labels: (N,) integer labels in ``[0, K)``.
        from_logits: whether the input still needs a softmax.

    Returns:
        ``(conf, correct)``, both float64 of length N.

    Example:
        >>> c, y = confidence_and_correct(np.log([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 1]))
        >>> c.round(6).tolist(), y.tolist()
        ([0.8, 0.6], [1.0, 0.0])
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"logits_or_probs must be 2-D (n_examples, n_classes), got {x.shape}")
    if not np.isfinite(x).all():
        i = int(np.argmax(~np.isfinite(x).all(axis=1)))
        raise ValueError(f"logits_or_probs row {i} contains NaN or inf")
    lab = _check_labels(labels, x.shape[0], x.shape[1])
    p = softmax(x) if from_logits else x
    pred = p.argmax(axis=1)
    conf = p[np.arange(p.shape[0]), pred]
    return conf.astype(np.float64), (pred == lab).astype(np.float64)


# --------------------------------------------------------------------------- binned metrics


def ece(
    conf: np.ndarray,
    correct: np.ndarray,
    n_bins: int = 15,
    *,
    closed: BinClosure = "right",
    strategy: BinStrategy = "equal_width",
    norm: Norm = "l1",
) -> float:
    r"""Expected calibration error of top-label confidences (Guo et al. 2017; ECE15).

    Why: the headline miscalibration score of docs/methods.md §2.2, with the bin closure pinned.

    .. math::
        \mathrm{ECE} = \sum_{b:\,n_b>0} \frac{n_b}{N}\,\lvert \bar y_b - \bar c_b \rvert
                     = \frac{1}{N}\sum_b \Bigl\lvert \sum_{i\in B_b} (c_i - y_i) \Bigr\rvert

    ``norm="l2"`` gives the RMS calibration error
    :math:`\sqrt{\sum_b (n_b/N)(\bar y_b - \bar c_b)^2}` (plug-in, not debiased) and
    ``norm="max"`` the maximum over non-empty bins (MCE with no support threshold; see
    :func:`mce` for the paper's ``n_b >= 5`` rule). Empty bins contribute 0.

    Args:
        conf: 1-D confidences in [0, 1].
        correct: 1-D outcomes (bool, or numbers in [0, 1]) of the same length.
        n_bins: number of bins (15 in the paper).
        closed: ``"right"`` for (lo, hi] bins (default, Guo et al.), ``"left"`` for
            [lo, hi) bins with 1.0 in the last bin (netcal/relplot/torchmetrics).
        strategy: ``"equal_width"`` or ``"equal_mass"`` (edges from :func:`equal_mass_edges`).
        norm: ``"l1"``, ``"l2"`` or ``"max"``.

    Returns:
        The score as a float; NaN for empty input.

    Example:
        >>> round(ece(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 0, 1, 1])), 6)
        0.4
        >>> c, y = np.array([1 / 3, 0.3]), np.array([1, 0])  # 1/3 is the edge 5/15
        >>> round(ece(c, y, closed="right"), 6), round(ece(c, y, closed="left"), 6)
        (0.183333, 0.483333)
    """
    c, y = _check_pair(conf, correct)
    n_bins = _check_n_bins(n_bins)
    _check_closed(closed)
    if norm not in ("l1", "l2", "max"):
        raise ValueError(f"norm must be 'l1', 'l2' or 'max', got {norm!r}")
    if c.size == 0:
        return float("nan")
    s, cnt = _bin_sums(c, y, n_bins, closed, strategy, counts=norm != "l1")
    n = c.size
    if norm == "l1":
        return float(np.abs(s).sum() / n)
    nz = cnt > 0
    gap = np.abs(s[nz]) / cnt[nz]
    if norm == "l2":
        return float(math.sqrt(float((cnt[nz] * gap**2).sum()) / n))
    return float(gap.max())


def mce(
    conf: np.ndarray,
    correct: np.ndarray,
    n_bins: int = 15,
    *,
    min_count: int = 5,
    closed: BinClosure = "right",
) -> float:
    r"""Maximum calibration error over bins with enough support (docs/methods.md §2.2).

    Why: the paper's stress-test metric; bins with fewer than ``min_count`` examples are
    ignored, so one stray example cannot set the maximum.

    .. math::
        \mathrm{MCE} = \max_{b:\, n_b \ge \text{min\_count}} \lvert \bar y_b - \bar c_b \rvert

    Returns NaN if no bin has ``min_count`` examples. ``min_count=1`` gives the usual
    MCE over non-empty bins (netcal's ``MCE``).

    Example:
        >>> round(mce(np.array([0.9] * 5 + [0.3]), np.array([1, 1, 1, 1, 0, 1])), 6)
        0.1
    """
    c, y = _check_pair(conf, correct)
    n_bins = _check_n_bins(n_bins)
    _check_closed(closed)
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if c.size == 0:
        return float("nan")
    s, cnt = _width_bin_sums(c, y, n_bins, closed, counts=True)
    s, cnt = s[0], cnt[0]
    ok = cnt >= int(min_count)
    if not ok.any():
        return float("nan")
    return float((np.abs(s[ok]) / cnt[ok]).max())


def classwise_ece(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, *, closed: BinClosure = "right"
) -> float:
    r"""Classwise ECE: the mean over classes of the per-class ECE (Kull et al. 2019).

    Why: top-label ECE only looks at the predicted class; this checks every class's
    probability. Every example enters every class's bins (binned on :math:`p_{\cdot k}`).

    .. math::
        \mathrm{cwECE} = \frac{1}{K}\sum_{k=1}^{K}\sum_b \frac{n_{bk}}{N}
            \Bigl\lvert \overline{1[y=k]}_{bk} - \bar p_{bk} \Bigr\rvert

    This is uncertainty-calibration's ``get_ece(mode="marginal")``; the *sum* over classes,
    which some papers report, is ``K`` times larger.

    Example:
        >>> round(classwise_ece(np.array([[0.9, 0.1], [0.3, 0.7]]), np.array([0, 0])), 6)
        0.4
    """
    p = _check_probs_2d(probs)
    n_bins = _check_n_bins(n_bins)
    _check_closed(closed)
    n, k = p.shape
    lab = _check_labels(labels, n, k)
    if n == 0:
        return float("nan")
    onehot = np.zeros((n, k), dtype=np.bool_)
    onehot[np.arange(n), lab] = True
    group = np.broadcast_to(np.arange(k, dtype=np.intp), (n, k)).reshape(-1)
    s, _ = _width_bin_sums(
        p.reshape(-1), onehot.reshape(-1), n_bins, closed, counts=False, group=group, n_groups=k
    )
    return float(np.abs(s).sum(axis=1).mean() / n)


# --------------------------------------------------------------------------- proper scores


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    r"""Mean negative log-likelihood of the labels, :math:`-\frac1N\sum_i \log p_{i,y_i}`.

    ``p_{i,y_i}`` is floored at 1e-12 so a zero probability costs about 27.6, not inf.

    Example:
        >>> round(nll(np.array([[0.5, 0.5], [0.9, 0.1]]), np.array([0, 0])), 6)
        0.399254
    """
    p = _check_probs_2d(probs)
    lab = _check_labels(labels, p.shape[0], p.shape[1])
    if p.shape[0] == 0:
        return float("nan")
    p_y = p[np.arange(p.shape[0]), lab]
    return float(-np.log(np.maximum(p_y, NLL_EPS)).mean())


def binary_nll(p: np.ndarray, y: np.ndarray) -> float:
    r"""Mean Bernoulli NLL, :math:`-\frac1N\sum_i [y_i\log p_i + (1-y_i)\log(1-p_i)]`.

    ``p`` is clipped to ``[1e-6, 1 - 1e-6]`` first (docs/methods.md §2.6 numerical guards), so a
    probe that outputs exactly 0 or 1 gets a finite score.

    Example:
        >>> round(binary_nll(np.array([0.8, 0.2]), np.array([1, 0])), 6)
        0.223144
    """
    pp, yy = _check_pair(p, y)
    _check_unit("conf", pp)
    _check_unit("correct", yy)
    if pp.size == 0:
        return float("nan")
    q = np.clip(pp.astype(np.float64), BINARY_NLL_EPS, 1.0 - BINARY_NLL_EPS)
    yf = yy.astype(np.float64)
    return float(-(yf * np.log(q) + (1.0 - yf) * np.log1p(-q)).mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    r"""Multiclass Brier score, :math:`\frac1N\sum_i\sum_k (p_{ik} - 1[y_i=k])^2`.

    Example:
        >>> round(brier(np.array([[0.75, 0.25]]), np.array([0])), 6)
        0.125
    """
    p = _check_probs_2d(probs)
    lab = _check_labels(labels, p.shape[0], p.shape[1])
    if p.shape[0] == 0:
        return float("nan")
    r = p.copy()
    r[np.arange(p.shape[0]), lab] -= 1.0
    return float(np.einsum("ij,ij->i", r, r).mean())


def binary_brier(p: np.ndarray, y: np.ndarray) -> float:
    r"""Binary Brier score, :math:`\frac1N\sum_i (p_i - y_i)^2`.

    Example:
        >>> round(binary_brier(np.array([0.8, 0.2]), np.array([1, 1])), 6)
        0.34
    """
    pp, yy = _check_pair(p, y)
    _check_unit("conf", pp)
    _check_unit("correct", yy)
    if pp.size == 0:
        return float("nan")
    d = pp.astype(np.float64) - yy
    return float(np.dot(d, d) / d.size)


# --------------------------------------------------------------------------- routing tiles


def quantile_tiles(summary: np.ndarray, k: int = 3) -> np.ndarray:
    """Tile label (0 .. k-1) of each example by quantiles of a routing summary (§2.3 Eq. 1).

    Cuts are ``q = np.quantile(summary, [1/k, ..., (k-1)/k])`` (linear interpolation); tile
    ``t`` is ``(q[t-1], q[t]]``, so a value equal to a cut goes to the *lower* tile. With
    ties at a cut a tile can be empty; that is reported (NaN ECE), not an error.

    Example:
        >>> quantile_tiles(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
        array([0, 0, 1, 1, 2, 2])
    """
    x = np.asarray(summary, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"summary must be 1-D, got shape {x.shape}")
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = int(k)
    bad = ~np.isfinite(x)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"summary[{i}] = {x[i]!r} is not finite")
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    cuts = np.quantile(x, np.arange(1, k) / k)
    return np.searchsorted(cuts, x, side="left").astype(np.int64)


def tile_ece(
    conf: np.ndarray,
    correct: np.ndarray,
    summary: np.ndarray,
    k: int = 3,
    n_bins: int = 15,
    *,
    closed: BinClosure = "right",
) -> np.ndarray:
    r"""ECE15 within each quantile tile of a routing summary (docs/methods.md §2.3, Eq. 2).

    Why: routing-conditional miscalibration shows up as one tile being worse calibrated
    than the global ECE suggests.

    .. math::
        \mathrm{ECE}(S_t) = \sum_b \frac{n_{bt}}{\lvert S_t\rvert}
            \lvert \bar y_{bt} - \bar c_{bt} \rvert,
        \quad S_t = \{ i : q_{t-1} < r_i \le q_t \}

    Tiles come from :func:`quantile_tiles`. An empty tile (possible with tied summaries)
    gets NaN. All tiles are computed in one pass (one ``bincount`` over (tile, bin)).

    Returns:
        float64 array of length ``k``.
    """
    c, y = _check_pair(conf, correct)
    tiles = quantile_tiles(summary, k)
    if tiles.size != c.size:
        raise ValueError(
            f"summary must have the same length as conf, got {tiles.size} and {c.size}"
        )
    n_bins = _check_n_bins(n_bins)
    _check_closed(closed)
    k = int(k)
    s, _ = _width_bin_sums(
        c, y, n_bins, closed, counts=False, group=tiles.astype(np.intp), n_groups=k
    )
    sizes = np.bincount(tiles, minlength=k)
    out = np.full(k, np.nan)
    has = sizes > 0
    out[has] = np.abs(s[has]).sum(axis=1) / sizes[has]
    return out


def worst_tile_ece(
    conf: np.ndarray,
    correct: np.ndarray,
    summary: np.ndarray,
    k: int = 3,
    n_bins: int = 15,
    *,
    closed: BinClosure = "right",
) -> float:
    r"""Worst-routing-tertile ECE: :math:`\max_t \mathrm{ECE15}(S_t)` (docs/methods.md §2.3).

    The paper's routing-conditional headline score (with ``k=3``). Empty tiles (NaN in
    :func:`tile_ece`) are left out of the max; NaN only if every tile is empty.
    """
    per_tile = tile_ece(conf, correct, summary, k, n_bins, closed=closed)
    if np.isnan(per_tile).all():
        return float("nan")
    return float(np.nanmax(per_tile))


# --------------------------------------------------------------------------- SmoothECE


def _linear_grid(f: np.ndarray, n_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear ("cloud-in-cell") binning weights of ``f`` onto ``n_grid`` points on [0, 1]."""
    pos = f * (n_grid - 1)
    left = np.minimum(np.floor(pos), n_grid - 2).astype(np.intp)
    w_right = pos - left
    return left, w_right


def _reflected_spectrum(grid: np.ndarray) -> tuple[np.ndarray, int]:
    """Real FFT of ``grid`` (rows, G) mirrored about both end points (without repeating
    them), at the length of the full linear convolution with a G-tap kernel rounded up to a
    fast FFT size; returns ``(spectrum, fft length)``. It depends on the data alone, so
    :class:`_SmoothEce` computes it once per grid size, not once per bandwidth."""
    import scipy.fft as sfft  # light (the heavy scipy.signal is not needed)

    n_grid = grid.shape[1]
    ext = np.pad(grid, ((0, 0), (n_grid - 1, n_grid - 1)), mode="reflect")
    n_fft = sfft.next_fast_len(ext.shape[1] + n_grid - 1, True)
    return sfft.rfft(ext, n_fft, axis=1), n_fft


def _reflected_smooth(spectrum: np.ndarray, n_fft: int, n_grid: int, sigma: float) -> np.ndarray:
    """Gaussian smoothing of grid values with reflection at 0 and 1 (relplot 1.0.3).

    ``spectrum`` is :func:`_reflected_spectrum` of the (rows, G) grid. The mirrored data are
    convolved with a Gaussian of std ``sigma`` truncated to half-width 1/2 and sampled at the
    grid spacing (unnormalised, as relplot), and cut back to G points. For even G the kernel
    has no centre tap, so the result is shifted by half a cell, exactly as in relplot. The
    steps are ``scipy.signal.fftconvolve(..., mode="valid")``'s (same FFT length, same
    calls), so the numbers are its numbers (``tests/test_metrics.py``).
    """
    import scipy.fft as sfft

    t = np.linspace(0.0, 1.0, n_grid)
    kernel = np.exp(-((t - 0.5) ** 2) / (2.0 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
    full = sfft.irfft(spectrum * sfft.rfft(kernel, n_fft), n_fft, axis=1)
    # 'valid' part of the full convolution (length 3G - 2 + G - 1) starts at G - 1; relplot
    # keeps G points of it from G // 2 on
    start = n_grid - 1 + n_grid // 2
    return full[:, start : start + n_grid]


class _SmoothEce:
    """SmoothECE at any bandwidth for fixed data, caching the binned data's spectrum per grid
    size (the bisection evaluates many bandwidths on the same grid)."""

    def __init__(self, f: np.ndarray, residual: np.ndarray) -> None:
        self.f = f
        self.r = residual
        self._spectra: dict[int, tuple[np.ndarray, int]] = {}

    def _grid(self, n_grid: int) -> np.ndarray:
        """The data linearly binned onto ``n_grid`` points: row 0 residual mass, row 1 point
        mass (density)."""
        left, w = _linear_grid(self.f, n_grid)
        g = np.empty((2, n_grid))
        g[0] = np.bincount(left, (1.0 - w) * self.r, n_grid)
        g[0] += np.bincount(left + 1, w * self.r, n_grid)
        g[1] = np.bincount(left, 1.0 - w, n_grid)
        g[1] += np.bincount(left + 1, w, n_grid)
        return g

    def __call__(self, sigma: float) -> float:
        # Grid and evaluation sizes are relplot 1.0.3's (Python's round, half to even).
        n_grid = max(2000, round(20.0 / sigma)) // 2 + 1
        n_eval = max(round(10.0 / sigma), 200)
        spectrum = self._spectra.get(n_grid)
        if spectrum is None:
            spectrum = self._spectra[n_grid] = _reflected_spectrum(self._grid(n_grid))
        smooth = _reflected_smooth(*spectrum, n_grid, sigma)
        t = np.linspace(0.0, 1.0, n_eval)
        grid_x = np.linspace(0.0, 1.0, n_grid)
        resid = np.interp(t, grid_x, smooth[0])
        dens = np.interp(t, grid_x, smooth[1]) + SMECE_DENSITY_EPS
        return float(np.abs(resid).sum() / dens.sum())


def _fixed_point_sigma(value_at: _SmoothEce, eps: float = 1e-3, rounds: int = 10) -> float:
    """σ with σ ≈ smECE_σ: relplot's bisection on [0, 1], returning the upper end."""

    def below_fixed_point(s: float) -> bool:
        return s < eps or s < value_at(s)

    if below_fixed_point(1.0):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(rounds):
        mid = (lo + hi) / 2.0
        if below_fixed_point(mid):
            lo = mid
        else:
            hi = mid
    return hi


def smooth_ece(
    conf: np.ndarray,
    correct: np.ndarray,
    *,
    sigma: float | None = None,
    return_sigma: bool = False,
) -> float | tuple[float, float]:
    r"""SmoothECE (Błasiok & Nakkiran 2023), reproducing relplot 1.0.3's ``smECE``.

    Why: a binning-free calibration error; the reflected-Gaussian kernel replaces bins.

    .. math::
        \mathrm{smECE}_\sigma = \frac{\sum_t \lvert (K_\sigma * r)(t)\rvert}
                                     {\sum_t \bigl((K_\sigma * 1)(t) + 10^{-4}\bigr)},
        \qquad r_i = c_i - y_i,

    with :math:`K_\sigma` a Gaussian reflected at 0 and 1, applied (as in relplot) to the
    data linearly binned onto ``max(2000, round(20/σ))//2 + 1`` grid points, and ``t`` on
    ``max(round(10/σ), 200)`` points of [0, 1]. Without ``sigma``, σ is the fixed point
    σ = smECE_σ found by relplot's 10-step bisection on [0, 1] (resolution 2⁻¹⁰; the upper
    end of the final bracket), and smECE_σ at that σ is returned. The smoothing uses an FFT,
    so it agrees with relplot to about 1e-12, not bit for bit.

    Args:
        conf: 1-D confidences in [0, 1].
        correct: 1-D outcomes of the same length.
        sigma: fixed bandwidth (relplot's ``smECE_sigma``); ``None`` for the fixed point.
        return_sigma: also return the bandwidth used.

    Returns:
        The score, or ``(score, sigma)`` if ``return_sigma``.
    """
    c, y = _check_pair(conf, correct)
    _check_unit("conf", c)
    _check_unit("correct", y)
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite float, got {sigma!r}")
    if c.size == 0:
        value = float("nan")
        return (value, float("nan") if sigma is None else float(sigma)) if return_sigma else value
    f = c.astype(np.float64)
    value_at = _SmoothEce(f, f - y)
    s = _fixed_point_sigma(value_at) if sigma is None else float(sigma)
    value = value_at(s)
    return (value, s) if return_sigma else value
