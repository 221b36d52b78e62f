"""The within-confidence-bin routing-permutation test (docs/methods.md §2.5).

Stratum labels are permuted among the members of each confidence bin, independently per bin
and per permutation, and the gap statistic is recomputed for every permutation without a
Python loop over permutations or bins: permutations come in chunks, bins in width classes
(one for equal-mass bins). Random keys come from the ``numpy.random.Generator`` that is
passed in, drawn in a fixed order per permutation, so the same seed gives the same p-value
on CPU and GPU and for any chunk size. Cell sums are exact int64 sums (see
:mod:`routeaudit.stats.gaps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

import routeaudit.stats._backend as _backend
from routeaudit.stats._backend import DeviceLike
from routeaudit.stats.gaps import check_cells, gap_from_cells, quantise, scale_exponent
from routeaudit.stats.rng import as_generator

if TYPE_CHECKING:
    import torch

__all__ = ["PermutationResult", "within_bin_permutation_test"]

Statistic = Literal["weighted_gap", "max_gap"]

# Random key width of the permutation engine. Tests lower it to force key ties through the
# exact fix-up path; production code never changes it.
_KEY_BITS = 32
# A width class of bins may pad to at most this factor of its real keys (see _layout).
_PAD_SLACK = 1.3


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of a within-bin permutation test; ``null`` holds every drawn T*."""

    statistic: float
    p_value: float
    n_permutations: int
    exceedances: int
    null_mean: float
    null_sd: float
    stopped_early: bool
    null: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class _WidthClass:
    """Bins padded to one common width, sorted as one [rows, bins, width] block."""

    pos: np.ndarray  # positions of these bins on the used-bin axis
    width: int
    col0: int  # first key column of the class within a permutation row
    x: np.ndarray  # [m, width] int64 residuals, grouped by observed stratum, zero padded
    pad: tuple[np.ndarray, np.ndarray]  # (bin, slot) coordinates of the padding
    q_pos: np.ndarray  # [m, S-1] sorted position of each stratum boundary
    empty_below: np.ndarray  # [m, S-1] boundary at 0: nothing lies below it
    interior: np.ndarray  # [m, S-1] 0 < boundary < n_b: a key tie there must be resolved


@dataclass(frozen=True)
class _Layout:
    classes: tuple[_WidthClass, ...]
    words_per_row: int  # 64-bit random words consumed per permutation
    n_keys: int  # 32-bit keys used per permutation
    counts: np.ndarray  # [U, S] n_{b,t} of the used bins
    totals: np.ndarray  # [U] quantised residual total per used bin
    bin_ids: np.ndarray  # [U] original labels of the used bins
    exponent: int
    observed_le: np.ndarray  # [U, S-1] observed sums below each boundary


def _layout(
    b: np.ndarray, s: np.ndarray, x: np.ndarray, n_bins: int, n_strata: int, min_count: int
) -> _Layout | None:
    """Freeze everything the null keeps fixed: supported cells, used bins and their layout.

    Within-bin permutation leaves every n_{b,t} unchanged, so supported cells and used bins are
    decided once, and bins that are not used are never permuted. Used bins are grouped into
    width classes (largest first, a class may pad to at most _PAD_SLACK of its real size), so
    equal-mass bins make one dense block and skewed equal-width bins do not pad a 50-example
    bin to the width of a 5,000-example one. There are few classes (one for equal-mass
    bins), and each is processed for all its bins at once.
    """
    counts_all = np.bincount(b * n_strata + s, minlength=n_bins * n_strata)
    counts_all = counts_all.reshape(n_bins, n_strata)
    used = (counts_all >= min_count).sum(axis=1) >= 2
    if n_strata < 2 or not used.any():
        return None
    bin_ids = np.flatnonzero(used)
    counts = counts_all[bin_ids]
    sizes = counts.sum(axis=1)
    exponent = scale_exponent(x, b.size)
    xq = quantise(x, exponent)
    order = np.lexsort((s, b))  # examples grouped by bin, then by observed stratum
    b_sorted = b[order]
    x_sorted = xq[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(b, minlength=n_bins))])
    slot = np.arange(b.size) - starts[b_sorted]  # rank within the bin, observed strata first
    cum = np.cumsum(counts, axis=1)[:, :-1]  # [U, S-1] boundaries between strata
    totals = np.empty(bin_ids.size, dtype=np.int64)
    observed_le = np.zeros((bin_ids.size, n_strata - 1), dtype=np.int64)
    classes: list[_WidthClass] = []
    by_size = np.argsort(-sizes, kind="stable")
    col = 0
    i = 0
    while i < by_size.size:
        width = int(sizes[by_size[i]])
        j = i + 1
        while (
            j < by_size.size and (j + 1 - i) * width <= _PAD_SLACK * sizes[by_size[i : j + 1]].sum()
        ):
            j += 1
        pos = np.sort(by_size[i:j])
        row_of = np.full(n_bins, -1)
        row_of[bin_ids[pos]] = np.arange(pos.size)
        member = row_of[b_sorted] >= 0
        block = np.zeros((pos.size, width), dtype=np.int64)
        block[row_of[b_sorted[member]], slot[member]] = x_sorted[member]
        prefix = np.cumsum(block, axis=1)
        totals[pos] = prefix[:, -1]
        c = cum[pos]
        observed_le[pos] = np.where(c > 0, np.take_along_axis(prefix, np.maximum(c - 1, 0), 1), 0)
        slots = np.arange(width)
        pad = np.nonzero(slots[None, :] >= sizes[pos][:, None])
        classes.append(
            _WidthClass(
                pos=pos,
                width=width,
                col0=col,
                x=block,
                pad=(pad[0], pad[1]),
                q_pos=np.maximum(c - 1, 0),
                empty_below=c == 0,
                interior=(c > 0) & (c < sizes[pos][:, None]),
            )
        )
        col += pos.size * width
        i = j
    return _Layout(
        classes=tuple(classes),
        words_per_row=(col + 1) // 2,
        n_keys=col,
        counts=counts,
        totals=totals,
        bin_ids=bin_ids,
        exponent=exponent,
        observed_le=observed_le,
    )


def _class_sums_numpy(keys: np.ndarray, cls: _WidthClass) -> tuple[np.ndarray, np.ndarray]:
    """Sums below each stratum boundary for one width class, and where key ties hit one.

    keys [C, m, width] are i.i.d. uniform 32-bit keys; ranking them is a uniform random
    permutation of each bin. Instead of gathering residuals in permuted order, take the key
    of rank n_{b,1} + ... + n_{b,t} (a boundary) and sum the residuals whose key is at most
    that: one sort, one compare and one int64 dot product per boundary, no scatter.
    """
    m = keys.shape[1]
    if cls.pad[0].size:
        keys[:, cls.pad[0], cls.pad[1]] = np.uint32(0xFFFFFFFF)  # padding sorts last, x = 0
    ordered = np.sort(keys, axis=-1)
    bins = np.arange(m)[:, None]
    q = ordered[:, bins, cls.q_pos]  # [C, m, S-1]
    after = ordered[:, bins, np.minimum(cls.q_pos + 1, cls.width - 1)]
    ties = (q == after) & cls.interior
    le = np.empty(q.shape, dtype=np.int64)
    for t in range(q.shape[2]):  # one pass per stratum boundary (n_strata - 1 of them)
        le[:, :, t] = np.einsum("cbp,bp->cb", keys <= q[:, :, t, None], cls.x)
    le[:, cls.empty_below] = 0
    return le, ties


def _class_sums_torch(
    keys: np.ndarray, cls: _WidthClass, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_class_sums_numpy` in torch, for GPUs; same keys, same integer result."""
    import torch

    if cls.pad[0].size:
        keys[:, cls.pad[0], cls.pad[1]] = np.uint32(0xFFFFFFFF)
    # flipping the sign bit maps uint32 order onto int32 order
    k = torch.from_numpy((keys ^ np.uint32(0x80000000)).view(np.int32)).to(device)
    ordered = torch.sort(k, dim=-1).values
    q_pos = torch.as_tensor(cls.q_pos, device=device)
    idx = q_pos.unsqueeze(0).expand(k.shape[0], -1, -1)
    q = torch.gather(ordered, 2, idx)
    after = torch.gather(ordered, 2, (idx + 1).clamp(max=cls.width - 1))
    ties = (q == after) & torch.as_tensor(cls.interior, device=device)
    x = torch.as_tensor(cls.x, device=device)
    le = torch.stack(
        [((k <= q[:, :, t, None]).to(torch.int64) * x).sum(-1) for t in range(q.shape[2])],
        dim=-1,
    )
    le[:, torch.as_tensor(cls.empty_below, device=device)] = 0
    return le.cpu().numpy(), ties.cpu().numpy()


def _resolve_ties(
    le: np.ndarray,
    ties: np.ndarray,
    cls: _WidthClass,
    layout: _Layout,
    row0: int,
    fix_entropy: int,
) -> None:
    """Redraw, exactly, any (permutation, bin) whose random keys tie at a stratum boundary.

    With 32-bit keys this happens with probability about n_b / 2**32 per boundary (a few
    times in 10^5 permutations of a 700-example bin); ranking tied keys by position would
    bias the permutation, so the bin is instead given a fresh uniform permutation from a
    stream derived from (test seed, permutation index, bin). Conditioned on no boundary tie the
    key ranking is uniform, so the mixture is uniform too, and the stream does not depend on
    chunking.
    """
    rows, bins = np.nonzero(ties.any(axis=2))
    for r, m in zip(rows.tolist(), bins.tolist(), strict=True):  # rare event, see docstring
        u = int(cls.pos[m])
        seq = np.random.SeedSequence(fix_entropy, spawn_key=(row0 + r, int(layout.bin_ids[u])))
        n_b = int(layout.counts[u].sum())
        perm = np.random.Generator(np.random.PCG64(seq)).permutation(n_b)
        prefix = np.cumsum(cls.x[m, :n_b][perm])
        cum = np.cumsum(layout.counts[u])[:-1]
        le[r, m] = np.where(cum > 0, prefix[np.maximum(cum - 1, 0)], 0)


def _statistic_from_le(
    le: np.ndarray, layout: _Layout, min_count: int, statistic: Statistic
) -> np.ndarray:
    """T for each row of sums-below-boundaries [C, U, S-1]."""
    rows = le.shape[0]
    zeros = np.zeros((rows, le.shape[1], 1), dtype=np.int64)
    totals = np.broadcast_to(layout.totals[None, :, None], (rows, le.shape[1], 1))
    sums = np.diff(np.concatenate([zeros, le, totals], axis=2), axis=2)
    real = np.ldexp(sums.astype(np.float64), -layout.exponent)
    wg, mg, _, _ = gap_from_cells(real, layout.counts, min_count)
    return wg if statistic == "weighted_gap" else mg


def _null_chunk(
    gen: np.random.Generator,
    rows: int,
    row0: int,
    layout: _Layout,
    fix_entropy: int,
    min_count: int,
    statistic: Statistic,
    device: torch.device | None,
) -> np.ndarray:
    """T* for permutations row0 .. row0 + rows - 1.

    Each permutation consumes exactly ``words_per_row`` 64-bit outputs of the generator, in
    row order, so permutation k sees the same keys whatever the chunking. Keys are drawn and
    sorted in blocks of about _BLOCK_KEYS (they stay in L2 cache; larger blocks run 1.5x
    slower on one core), the statistic is then computed for the whole chunk at once.
    """
    n_le = layout.counts.shape[1] - 1
    le = np.empty((rows, layout.counts.shape[0], n_le), dtype=np.int64)
    block_rows = rows if device is not None else max(1, _backend.BLOCK_KEYS // layout.n_keys)
    for start in range(0, rows, block_rows):  # blocks of permutations, not single ones
        stop = min(rows, start + block_rows)
        raw = gen.bit_generator.random_raw((stop - start, layout.words_per_row))
        keys = raw.view(np.uint32)
        if _KEY_BITS < 32:
            keys >>= np.uint32(32 - _KEY_BITS)
        for cls in layout.classes:  # width classes, not bins: usually one
            block = keys[:, cls.col0 : cls.col0 + cls.pos.size * cls.width]
            block = block.reshape(stop - start, cls.pos.size, cls.width)
            if device is None:
                part, ties = _class_sums_numpy(block, cls)
            else:
                part, ties = _class_sums_torch(block, cls, device)
            if ties.any():
                _resolve_ties(part, ties, cls, layout, row0 + start, fix_entropy)
            le[start:stop, cls.pos] = part
    return _statistic_from_le(le, layout, min_count, statistic)


def within_bin_permutation_test(
    bin_idx: np.ndarray,
    strata: np.ndarray,
    residual: np.ndarray,
    *,
    n_bins: int,
    n_strata: int,
    n_permutations: int = 9999,
    rng: np.random.Generator | int,
    min_count: int = 5,
    statistic: Statistic = "weighted_gap",
    sequential_h: int | None = None,
    chunk_size: int | None = None,
    device: DeviceLike = None,
) -> PermutationResult:
    """Within-confidence-bin routing-permutation test of Y ⟂ R | C (docs/methods.md §2.5).

    Stratum labels are permuted among the members of each confidence bin, independently per
    bin and per permutation (uniform permutations, not a subgroup), and T (the weighted gap,
    or the max gap) is recomputed. p = (1 + #{T* >= T}) / (1 + B) (Phipson & Smyth 2010), never
    0. "T* >= T" allows a relative tolerance, T* >= T - 1e-12 * max(1, |T|), so that
    permutations which reproduce the observed gaps up to rounding count as ties, as they
    should. (The engine's integer cell sums already make such ties exact; the tolerance is a
    guard, not a fudge.)

    Sequential stopping (Besag & Clifford 1991) with ``sequential_h=h``: draw permutations in
    order and stop at the first L where h exceedances have been seen; then p = h / L, which
    is a valid p-value. If all B permutations are drawn with fewer than h exceedances, p is the
    usual (1 + #) / (1 + B). Clear non-rejections stop after about h / p draws. L is found
    exactly inside a chunk, so the result does not depend on ``chunk_size``.

    Determinism: permutation k uses the k-th block of the generator's output, so the same
    seed gives bit-identical results for any ``chunk_size`` and on any device (the generator
    is advanced by whole chunks, so its state afterwards can differ when stopping early).

    ``device``: None or "cpu" runs numpy kernels on the CPU (numpy's sort is the fast path
    there); a GPU device ("cuda") runs the same kernels in torch. ``chunk_size`` is the
    number of permutations processed at once; the default bounds memory to a few MiB on CPU.

    If no bin has two strata with ``min_count`` examples, nothing can be tested: the result
    has NaN statistic and p-value and no permutations.
    """
    b, s, x = check_cells(bin_idx, strata, residual, n_bins, n_strata, min_count)
    if statistic not in ("weighted_gap", "max_gap"):
        raise ValueError(f"statistic must be 'weighted_gap' or 'max_gap', not {statistic!r}")
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    if sequential_h is not None and int(sequential_h) < 1:
        raise ValueError(f"sequential_h must be >= 1, got {sequential_h}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    gen = as_generator(rng)
    layout = _layout(b, s, x, n_bins, n_strata, min_count)
    if layout is None:
        return PermutationResult(
            np.nan, np.nan, 0, 0, np.nan, np.nan, False, np.zeros(0, dtype=np.float64)
        )
    dev = _backend.torch_device(device)
    observed = _statistic_from_le(layout.observed_le[None], layout, min_count, statistic)[0]
    threshold = observed - 1e-12 * max(1.0, abs(observed))
    fix_raw = gen.bit_generator.random_raw(2)
    fix_entropy = int(fix_raw[0]) | (int(fix_raw[1]) << 64)
    total = int(n_permutations)
    per_chunk = _backend.CHUNK_KEYS if dev is None else _backend.DEVICE_CHUNK_KEYS
    chunk = int(chunk_size) if chunk_size else max(1, per_chunk // layout.n_keys)
    null = np.empty(total, dtype=np.float64)
    exceed = 0
    drawn = total
    reached_h = False
    for row0 in range(0, total, chunk):  # chunks of permutations, each fully vectorised
        rows = min(chunk, total - row0)
        values = _null_chunk(gen, rows, row0, layout, fix_entropy, min_count, statistic, dev)
        null[row0 : row0 + rows] = values
        hits = values >= threshold
        if sequential_h is not None:
            running = exceed + np.cumsum(hits)
            reached = np.flatnonzero(running >= sequential_h)
            if reached.size:
                drawn = row0 + int(reached[0]) + 1
                exceed = int(sequential_h)
                reached_h = True
                break
        exceed += int(hits.sum())
    null = null[:drawn]
    # Besag-Clifford h / L once h exceedances are reached, else Phipson-Smyth (1 + k) / (1 + B)
    p_value = exceed / drawn if reached_h else (1 + exceed) / (1 + drawn)
    sd = float(null.std(ddof=1)) if drawn > 1 else np.nan
    return PermutationResult(
        statistic=float(observed),
        p_value=float(p_value),
        n_permutations=int(drawn),
        exceedances=int(exceed),
        null_mean=float(null.mean()),
        null_sd=sd,
        stopped_early=bool(drawn < total),
        null=null,
    )
