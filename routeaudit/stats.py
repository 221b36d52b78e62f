"""The statistics engine: matched-confidence gaps, the within-bin permutation null, bootstrap
CIs, multiple-testing corrections and seed summaries (methods.md §2.4, §2.5, §5).

Every function is pure: arrays and parameters in, numbers out, randomness only through the
generator passed in. Nothing loops in Python over permutations, bootstrap replicates or
confidence bins; the heavy kernels work on chunks of replicates at a time.

Two implementation choices run through the module and are stated once here:

* **Exact integer cell sums.** Inside the permutation and bootstrap engines the residuals are
  quantised once to fixed point, ``round(x * 2**K)`` with ``K`` as large as int64 allows for
  the sample (resolution about ``max|x| * N * 2**-62``, i.e. 4e-15 for N = 1e4), and all
  per-(bin, stratum) sums are int64 sums. Integer addition is associative, so every
  replicate's statistic is bit-identical whatever the chunk size, summation order or device,
  and the observed statistic goes through the same arithmetic as its null copies.
  ``gap_statistics`` itself works in float64; the two agree to ~1e-14.
* **Randomness from numpy.** Random keys come from the ``numpy.random.Generator`` that is
  passed in, drawn in a fixed order per replicate, so the same seed gives the same p-value
  on CPU and GPU and for any chunk size. On CPU the kernels run in numpy (its row sort was
  measured 6x faster than ``torch.sort`` on one core of this project's machines, and up to
  20x where numpy has its AVX-512 sort); with ``device="cuda"`` the same kernels run in torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

__all__ = [
    "GapResult",
    "PermutationResult",
    "benjamini_hochberg",
    "bootstrap_ci",
    "bootstrap_gap",
    "bootstrap_worst_tile_ece",
    "cluster_bootstrap_mean",
    "confidence_bins",
    "gap_statistics",
    "holm",
    "paired_gain",
    "quantile_strata",
    "rng_for",
    "seed_summary",
    "torch_generator_for",
    "within_bin_permutation_test",
    "within_bin_strata",
]

Statistic = Literal["weighted_gap", "max_gap"]
DeviceLike = str | torch.device | None

# Random key width of the permutation engine. Tests lower it to force key ties through the
# exact fix-up path; production code never changes it.
_KEY_BITS = 32
# Run the torch kernels even on CPU (tests use this to check torch == numpy bit for bit).
_TORCH_ON_CPU = False
# Keys per chunk of permutations when chunk_size is not given (bounds memory, ~4 MiB on CPU,
# ~0.5 GiB on a GPU), and per block that is sorted at once on CPU (stays in L2 cache).
_CHUNK_KEYS = 1 << 20
_DEVICE_CHUNK_KEYS = 1 << 24
_BLOCK_KEYS = 1 << 17
# A width class of bins may pad to at most this factor of its real keys (see _layout).
_PAD_SLACK = 1.3


# --------------------------------------------------------------------------- random streams


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
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def _as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, not {type(rng).__name__}")


# --------------------------------------------------------------------------- partitions


def confidence_bins(
    conf: np.ndarray,
    n_bins: int = 15,
    strategy: Literal["equal_mass", "equal_width"] = "equal_mass",
) -> np.ndarray:
    """Confidence-bin label (0..n_bins-1) per example, with the (lo, hi] rule of §2.2.

    ``equal_width`` uses edges linspace(0, 1, n_bins + 1); ``equal_mass`` uses
    ``np.quantile`` edges. A value on an edge goes to the lower bin and the first bin is
    closed at its lower end, so c = 0 lands in bin 0 and c = 1 in the last bin. With tied
    confidences some equal-mass bins can be empty; that is intended, not an error.
    """
    c = np.asarray(conf, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"conf must be 1-D, got shape {c.shape}")
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not np.isfinite(c).all():
        raise ValueError("conf contains NaN or inf")
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if strategy == "equal_width":
        if c.min() < 0.0 or c.max() > 1.0:
            raise ValueError("equal_width bins need confidences in [0, 1]")
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif strategy == "equal_mass":
        edges = np.quantile(c, np.linspace(0.0, 1.0, n_bins + 1))
    else:
        raise ValueError(f"strategy must be 'equal_mass' or 'equal_width', not {strategy!r}")
    return np.searchsorted(edges[1:-1], c, side="left").astype(np.int64)


def quantile_strata(r: np.ndarray, n_strata: int = 3) -> np.ndarray:
    """Global quantile strata of a routing summary (methods.md §2.3).

    Cuts are ``np.quantile(r, [1/k, ..., (k-1)/k])``; a value equal to a cut goes to the lower
    stratum, as the paper's tertile rule says.
    """
    x = np.asarray(r, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"r must be 1-D, got shape {x.shape}")
    if int(n_strata) < 1:
        raise ValueError(f"n_strata must be >= 1, got {n_strata}")
    if not np.isfinite(x).all():
        raise ValueError("r contains NaN or inf")
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    cuts = np.quantile(x, np.arange(1, n_strata) / n_strata)
    return np.searchsorted(cuts, x, side="left").astype(np.int64)


def within_bin_strata(bin_idx: np.ndarray, r: np.ndarray, n_strata: int = 3) -> np.ndarray:
    """Quantile strata of a routing summary computed inside each confidence bin.

    Stratum of example i in bin b: ``min(k - 1, floor(k * m_i / n_b))`` where m_i is the number
    of members of b with a strictly smaller value (the min-rank), so tied values always share a
    stratum (the lower one, as the global rule does). The labels depend only on the multiset of
    values in the bin and their order, so permuting r inside a bin permutes the labels: the
    within-bin permutation null stays exact. One lexsort, no loop over bins.
    """
    b = np.asarray(bin_idx, dtype=np.int64)
    x = np.asarray(r, dtype=np.float64)
    if b.shape != x.shape or x.ndim != 1:
        raise ValueError(f"bin_idx and r must be 1-D of equal length: {b.shape} vs {x.shape}")
    if int(n_strata) < 1:
        raise ValueError(f"n_strata must be >= 1, got {n_strata}")
    if not np.isfinite(x).all():
        raise ValueError("r contains NaN or inf")
    n = x.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((x, b))
    sb, sx = b[order], x[order]
    new_bin = np.r_[True, sb[1:] != sb[:-1]]
    new_value = new_bin | np.r_[True, sx[1:] != sx[:-1]]
    position = np.arange(n)
    bin_start = np.maximum.accumulate(np.where(new_bin, position, 0))
    tie_start = np.maximum.accumulate(np.where(new_value, position, 0))
    counts = np.bincount(sb, minlength=int(sb.max()) + 1)[sb]
    below = tie_start - bin_start
    out = np.empty(n, dtype=np.int64)
    out[order] = np.minimum(int(n_strata) - 1, (int(n_strata) * below) // counts)
    return out


# --------------------------------------------------------------------------- gap statistics


@dataclass(frozen=True)
class GapResult:
    """Matched-confidence gaps of one (bins, strata, residual) triple (methods.md §2.4)."""

    weighted_gap: float
    max_gap: float
    bin_gaps: np.ndarray = field(repr=False)  # Δ_b; NaN where the bin is not used
    used_bins: np.ndarray = field(repr=False)  # bool per bin: ≥ 2 strata with ≥ min_count
    n_used: int = 0


def _check_cells(
    bin_idx: np.ndarray,
    strata: np.ndarray,
    residual: np.ndarray,
    n_bins: int,
    n_strata: int,
    min_count: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = np.asarray(bin_idx)
    s = np.asarray(strata)
    x = np.asarray(residual, dtype=np.float64)
    if b.ndim != 1 or s.ndim != 1 or x.ndim != 1:
        raise ValueError("bin_idx, strata and residual must be 1-D")
    if not (b.shape == s.shape == x.shape):
        raise ValueError(f"length mismatch: bins {b.shape}, strata {s.shape}, residual {x.shape}")
    for name, arr, hi in (("bin_idx", b, n_bins), ("strata", s, n_strata)):
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name} must be integer labels, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= hi):
            raise ValueError(f"{name} out of range [0, {hi})")
    if int(n_bins) < 1 or int(n_strata) < 1:
        raise ValueError("n_bins and n_strata must be >= 1")
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if not np.isfinite(x).all():
        raise ValueError("residual contains NaN or inf")
    return b.astype(np.int64), s.astype(np.int64), x


def _gap_from_cells(
    sums: np.ndarray, counts: np.ndarray, min_count: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """WG, MG, Δ_b and the used-bin mask from per-(bin, stratum) sums and counts.

    ``sums`` is [..., n_bins, n_strata]; ``counts`` broadcasts to it (fixed counts for the
    permutation null, per-replicate weighted counts for the bootstrap). The one place where
    the §2.4 formula is written, so every caller computes it in the same floating-point order.
    """
    supported = counts >= min_count
    with np.errstate(invalid="ignore", divide="ignore"):
        g = sums / counts
    hi = np.where(supported, g, -np.inf).max(axis=-1)
    lo = np.where(supported, g, np.inf).min(axis=-1)
    used = supported.sum(axis=-1) >= 2
    delta = np.where(used, hi - lo, 0.0)
    # n_b counts every example of the bin, supported strata or not (see gap_statistics)
    weight = np.where(used, counts.sum(axis=-1), 0)
    total = weight.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        wg = (weight * delta).sum(axis=-1) / total
    wg = np.where(total > 0, wg, np.nan)
    mg = np.where(used, delta, -np.inf).max(axis=-1)
    mg = np.where(used.any(axis=-1), mg, np.nan)
    return wg, mg, np.where(used, delta, np.nan), used


def gap_statistics(
    bin_idx: np.ndarray,
    strata: np.ndarray,
    residual: np.ndarray,
    *,
    n_bins: int,
    n_strata: int,
    min_count: int = 5,
) -> GapResult:
    """Weighted and max gap between routing strata at matched confidence (methods.md §2.4).

    g_{b,t} is the mean residual (y - c) of bin b and stratum t, kept when n_{b,t} >= min_count;
    Δ_b = max_t g_{b,t} - min_t g_{b,t} over those strata, and a bin needs two of them to be
    used. WG = Σ_b n_b Δ_b / Σ_b n_b over used bins and MG = max_b Δ_b; both are NaN when no
    bin is used.

    The weight n_b is the bin's total count, including examples of strata too small to be
    supported: the weight says how much of the evaluation split the bin stands for, and it is
    then invariant under the within-bin permutation null (which keeps every n_{b,t}).
    """
    b, s, x = _check_cells(bin_idx, strata, residual, n_bins, n_strata, min_count)
    cell = b * n_strata + s
    size = n_bins * n_strata
    counts = np.bincount(cell, minlength=size).reshape(n_bins, n_strata)
    sums = np.bincount(cell, weights=x, minlength=size).reshape(n_bins, n_strata)
    wg, mg, delta, used = _gap_from_cells(sums, counts, min_count)
    return GapResult(float(wg), float(mg), delta, used, int(used.sum()))


# --------------------------------------------------------------------------- batched kernels


def _scale_exponent(x: np.ndarray, n: int) -> int:
    """K such that sums of up to n values round(x * 2**K) stay below 2**62 in magnitude."""
    bound = float(np.abs(x).max(initial=0.0)) * max(n, 1)
    if bound == 0.0:
        return 0
    return 62 - math.frexp(bound)[1]


def _quantise(x: np.ndarray, exponent: int) -> np.ndarray:
    return np.rint(np.ldexp(x, exponent)).astype(np.int64)


def _torch_device(device: DeviceLike) -> torch.device | None:
    """None means "numpy on CPU"; a torch device means "torch kernels there"."""
    if device is None:
        return torch.device("cpu") if _TORCH_ON_CPU else None
    dev = torch.device(device)
    if dev.type == "cpu" and not _TORCH_ON_CPU:
        return None
    return dev


def _batched_cell_sums(
    bin_idx: torch.Tensor,
    strata: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor | None,
    n_bins: int,
    n_strata: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (bin, stratum) sums and counts by one scatter_add on the combined index.

    ``strata`` is [B, N]; ``bin_idx`` and ``values`` are [N] or [B, N]; ``weights`` (e.g.
    multinomial bootstrap counts) is [B, N] or None. Integer inputs give exact sums.
    """
    rows = strata.shape[0]
    n_cells = n_bins * n_strata
    offset = torch.arange(rows, device=strata.device).unsqueeze(1) * n_cells
    index = (offset + bin_idx * n_strata + strata).reshape(-1)
    values = values.expand_as(strata)
    ones = torch.ones_like(strata) if weights is None else weights
    if weights is not None:
        values = values * weights
    sums = torch.zeros(rows * n_cells, dtype=values.dtype, device=strata.device)
    counts = torch.zeros(rows * n_cells, dtype=ones.dtype, device=strata.device)
    sums.scatter_add_(0, index, values.reshape(-1))
    counts.scatter_add_(0, index, ones.reshape(-1))
    return sums.view(rows, n_bins, n_strata), counts.view(rows, n_bins, n_strata)


def _batched_weighted_gap(
    bin_idx: np.ndarray | torch.Tensor,
    strata: np.ndarray | torch.Tensor,
    residual: np.ndarray | torch.Tensor,
    *,
    n_bins: int,
    n_strata: int,
    min_count: int = 5,
    weights: np.ndarray | torch.Tensor | None = None,
    device: DeviceLike = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WG and MG of B labelings at once: strata [B, N], optional example weights [B, N].

    ``bin_idx`` and ``residual`` are [N] (shared) or [B, N]. Group sums are one scatter_add on
    the combined (row, bin, stratum) index on ``device``; residuals are quantised to int64
    first so the sums are exact and order-free (see the module docstring). Returns float64
    CPU tensors (wg [B], mg [B]), NaN where a row has no used bin.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.int64).to(dev)
    s = torch.as_tensor(strata, dtype=torch.int64).to(dev)
    if s.ndim == 1:  # one labeling shared by every row (e.g. the bootstrap's fixed strata)
        s = s.unsqueeze(0).expand(1 if w is None else w.shape[0], -1)
    b = torch.as_tensor(bin_idx, dtype=torch.int64).to(dev)
    x = torch.as_tensor(residual, dtype=torch.float64).cpu().numpy()
    n_terms = s.shape[1] if w is None else int(w.sum(dim=1).max().item()) if w.numel() else 0
    exponent = _scale_exponent(x, n_terms)
    xq = torch.from_numpy(_quantise(x, exponent)).to(dev)
    sums, counts = _batched_cell_sums(b, s, xq, w, n_bins, n_strata)
    real = np.ldexp(sums.cpu().numpy().astype(np.float64), -exponent)
    wg, mg, _, _ = _gap_from_cells(real, counts.cpu().numpy(), min_count)
    return torch.from_numpy(np.asarray(wg)), torch.from_numpy(np.asarray(mg))


# --------------------------------------------------------------------------- permutation null


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
    exponent = _scale_exponent(x, b.size)
    xq = _quantise(x, exponent)
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
    wg, mg, _, _ = _gap_from_cells(real, layout.counts, min_count)
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
    block_rows = rows if device is not None else max(1, _BLOCK_KEYS // layout.n_keys)
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
    """Within-confidence-bin routing-permutation test of Y ⟂ R | C (methods.md §2.5).

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
    b, s, x = _check_cells(bin_idx, strata, residual, n_bins, n_strata, min_count)
    if statistic not in ("weighted_gap", "max_gap"):
        raise ValueError(f"statistic must be 'weighted_gap' or 'max_gap', not {statistic!r}")
    if int(n_permutations) < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    if sequential_h is not None and int(sequential_h) < 1:
        raise ValueError(f"sequential_h must be >= 1, got {sequential_h}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    gen = _as_generator(rng)
    layout = _layout(b, s, x, n_bins, n_strata, min_count)
    if layout is None:
        return PermutationResult(
            np.nan, np.nan, 0, 0, np.nan, np.nan, False, np.zeros(0, dtype=np.float64)
        )
    dev = _torch_device(device)
    observed = _statistic_from_le(layout.observed_le[None], layout, min_count, statistic)[0]
    threshold = observed - 1e-12 * max(1.0, abs(observed))
    fix_raw = gen.bit_generator.random_raw(2)
    fix_entropy = int(fix_raw[0]) | (int(fix_raw[1]) << 64)
    total = int(n_permutations)
    per_chunk = _CHUNK_KEYS if dev is None else _DEVICE_CHUNK_KEYS
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


# --------------------------------------------------------------------------- multiple testing


def _adjust(pvalues: Sequence[float] | np.ndarray, method: str) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.reshape(-1)
    out = np.full(flat.shape, np.nan)
    keep = ~np.isnan(flat)
    q = flat[keep]
    if q.size and (q.min() < 0.0 or q.max() > 1.0):
        raise ValueError("p-values must lie in [0, 1] (NaN is allowed and passed through)")
    m = q.size
    if m:
        order = np.argsort(q, kind="stable")
        ranked = q[order]
        rank = np.arange(1, m + 1)
        if method == "holm":
            adj = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * ranked))
        else:
            adj = np.minimum.accumulate(np.minimum(1.0, m * ranked / rank)[::-1])[::-1]
        fixed = np.empty(m)
        fixed[order] = adj
        out[np.flatnonzero(keep)] = fixed
    return out.reshape(p.shape)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (FWER), monotone in the raw p and capped at 1.

    NaN entries (tests that could not run) stay NaN and do not count towards m.
    """
    return _adjust(pvalues, "holm")


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg step-up adjusted p-values (FDR); NaN passes through, not in m."""
    return _adjust(pvalues, "bh")


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates; NaN replicates (no bin used) are dropped."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = np.asarray(samples, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (np.nan, np.nan)
    lo, hi = np.quantile(v, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def _multinomial_counts(gen: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Bootstrap resampling counts [rows, n]: row k takes the k-th block of n uniforms."""
    pick = np.minimum((gen.random((rows, n)) * n).astype(np.int64), n - 1)
    pick += (np.arange(rows, dtype=np.int64) * n)[:, None]
    return np.bincount(pick.reshape(-1), minlength=rows * n).reshape(rows, n)


def bootstrap_gap(
    bin_idx: np.ndarray,
    strata: np.ndarray,
    residual: np.ndarray,
    *,
    n_bins: int,
    n_strata: int,
    n_boot: int = 2000,
    rng: np.random.Generator | int,
    min_count: int = 5,
    level: float = 0.95,
    device: DeviceLike = None,
    chunk_size: int | None = None,
) -> tuple[float, float, np.ndarray]:
    """Percentile bootstrap CI of the weighted gap, resampling examples with replacement.

    Each replicate is a row of multinomial counts over the N examples; the bin and stratum of
    every example stay as they are (the partition is fixed, as in the audit), and the gap is
    recomputed from count-weighted cell sums, so supports and weights are re-evaluated per
    replicate. Replicate k uses the k-th block of N uniforms from ``rng``, so the result does
    not depend on ``chunk_size``. Returns (low, high, replicate values).
    """
    b, s, x = _check_cells(bin_idx, strata, residual, n_bins, n_strata, min_count)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    gen = _as_generator(rng)
    n = b.size
    values = np.full(int(n_boot), np.nan)
    if n == 0:
        return (np.nan, np.nan, values)
    chunk = int(chunk_size) if chunk_size else max(1, _CHUNK_KEYS // n)
    for row0 in range(0, int(n_boot), chunk):  # chunks of replicates, each vectorised
        rows = min(chunk, int(n_boot) - row0)
        counts = _multinomial_counts(gen, rows, n)
        wg, _ = _batched_weighted_gap(
            b,
            s,
            x,
            n_bins=n_bins,
            n_strata=n_strata,
            min_count=min_count,
            weights=counts,
            device=device,
        )
        values[row0 : row0 + rows] = wg.numpy()
    lo, hi = bootstrap_ci(values, level)
    return lo, hi, values


def bootstrap_worst_tile_ece(
    preds: np.ndarray,
    correct: np.ndarray,
    tiles: np.ndarray,
    *,
    n_boot: int,
    rng: np.random.Generator | int,
    n_tiles: int = 3,
    n_bins: int = 15,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Worst-tile ECE15 of M calibrated predictions, observed and under a *paired* bootstrap.

    ``preds`` is [M, n] (one row per probe, all on the same n evaluation examples),
    ``tiles`` the shared routing tile of each example (0..n_tiles-1). Every bootstrap
    replicate draws one multinomial resample of the n examples and applies it to all M
    probes at once, so differences between probes are paired. Bins are the (lo, hi] rule of
    ECE15 on each probe's own calibrated confidence. Per replicate and probe the cell sums
    are one ``bincount`` over (replicate, tile, bin): no loop over replicates or bins.

    Returns ``(observed [M], replicates [n_boot, M])``; a replicate in which every tile is
    empty is NaN (it cannot happen with n >= 1 and non-empty tiles, but is guarded).
    """
    from routeaudit.metrics import bin_indices

    p = np.atleast_2d(np.asarray(preds, dtype=np.float64))
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    t = np.asarray(tiles, dtype=np.int64).reshape(-1)
    m, n = p.shape
    if y.size != n or t.size != n:
        raise ValueError(f"preds [M, n] = {p.shape}, correct {y.shape} and tiles {t.shape} differ")
    if n == 0:
        raise ValueError("no evaluation examples")
    if t.min() < 0 or t.max() >= n_tiles:
        raise ValueError(f"tiles out of range [0, {n_tiles})")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    gen = _as_generator(rng)
    cells = n_tiles * n_bins
    cell = np.stack([t * n_bins + bin_indices(np.clip(row, 0.0, 1.0), n_bins) for row in p])
    residual = p - y[None, :]

    def worst(weights: np.ndarray) -> np.ndarray:
        """Worst-tile ECE per (replicate, probe) for example weights [R, n]."""
        rows = weights.shape[0]
        sizes = np.bincount((np.arange(rows)[:, None] * n_tiles + t).ravel(),
                            weights=weights.ravel(), minlength=rows * n_tiles).reshape(rows, n_tiles)
        out = np.empty((rows, m))
        offset = (np.arange(rows) * cells)[:, None]
        for j in range(m):  # probes (a handful), each fully vectorised over replicates
            sums = np.bincount((offset + cell[j]).ravel(), weights=(weights * residual[j]).ravel(),
                               minlength=rows * cells).reshape(rows, n_tiles, n_bins)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_tile = np.abs(sums).sum(axis=2) / sizes
            per_tile[sizes == 0] = -np.inf
            best = per_tile.max(axis=1)
            out[:, j] = np.where(np.isfinite(best), best, np.nan)
        return out

    observed = worst(np.ones((1, n)))[0]
    chunk = int(chunk_size) if chunk_size else max(1, _CHUNK_KEYS // n)
    reps = np.empty((int(n_boot), m))
    for row0 in range(0, int(n_boot), chunk):  # chunks of replicates, each vectorised
        rows = min(chunk, int(n_boot) - row0)
        reps[row0 : row0 + rows] = worst(_multinomial_counts(gen, rows, n).astype(np.float64))
    return observed, reps


def cluster_bootstrap_mean(
    values: np.ndarray,
    *,
    n_boot: int,
    rng: np.random.Generator | int,
    groups: np.ndarray | None = None,
    level: float = 0.95,
) -> tuple[float, tuple[float, float], np.ndarray]:
    """Mean of per-example values with a percentile bootstrap CI, resampling whole groups.

    With ``groups`` (e.g. the sequence of each token) the resampling unit is the group and
    the statistic is Σ_g w_g S_g / Σ_g w_g n_g (S_g, n_g: the group's sum and size), which
    keeps the dependence between tokens of a sequence inside a resampling unit; without
    groups every example is its own group. Replicates are multinomial counts over groups,
    in chunks, one matrix product per chunk. Returns (mean, (low, high), replicates).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("no values")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or inf")
    if groups is None:
        sums, sizes = v, np.ones_like(v)
    else:
        g = np.asarray(groups).reshape(-1)
        if g.size != v.size:
            raise ValueError(f"groups has {g.size} entries for {v.size} values")
        _, inverse = np.unique(g, return_inverse=True)
        sums = np.bincount(inverse, weights=v)
        sizes = np.bincount(inverse).astype(np.float64)
    gen = _as_generator(rng)
    n = sums.size
    reps = np.empty(int(n_boot))
    chunk = max(1, _CHUNK_KEYS // n)
    for row0 in range(0, int(n_boot), chunk):  # chunks of replicates, each one matmul
        rows = min(chunk, int(n_boot) - row0)
        w = _multinomial_counts(gen, rows, n).astype(np.float64)
        reps[row0 : row0 + rows] = (w @ sums) / (w @ sizes)
    return float(v.mean()), bootstrap_ci(reps, level), reps


def paired_gain(
    observed: np.ndarray, replicates: np.ndarray, candidate: int, control: int, level: float
) -> tuple[float, tuple[float, float], float]:
    """Gain = metric(control) − metric(candidate) (> 0: the candidate is better).

    Returns the observed gain, its percentile CI from the paired replicates, and a two-sided
    bootstrap p-value ``min(1, 2 · min((1 + #{g* ≤ 0}), (1 + #{g* ≥ 0})) / (1 + B))``.
    """
    gain = float(observed[control] - observed[candidate])
    g = replicates[:, control] - replicates[:, candidate]
    g = g[np.isfinite(g)]
    if g.size == 0:
        return gain, (np.nan, np.nan), np.nan
    lo, hi = bootstrap_ci(g, level)
    b = g.size
    p = min(1.0, 2.0 * min(1 + int((g <= 0).sum()), 1 + int((g >= 0).sum())) / (1 + b))
    return gain, (lo, hi), p


# --------------------------------------------------------------------------- seeds


def seed_summary(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean, sd (ddof = 1; NaN for a single seed), min, max and n of per-seed values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = int(v.size)
    if n == 0:
        return {"mean": np.nan, "sd": np.nan, "min": np.nan, "max": np.nan, "n": 0}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if n > 1 else np.nan,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": n,
    }
