"""Worst-case ECE over routing-only reweightings, solved exactly (docs/methods.md §4).

Why: a mixture of experts whose aggregate is calibrated on the evaluation distribution P can
lose calibration when the *mix of routing regions* changes (paper 4 of the specification).
The shifts considered here change only how often each routing cell (e.g. the top-1 expert)
occurs, not what happens inside a cell: Q has likelihood ratio ``w(x) = w_{cell(x)}``.

Bins are fixed (the bins of :func:`routeaudit.metrics.ece`, from
:func:`routeaudit.metrics.bin_indices` on the unweighted confidences), so with per-bin,
per-cell residual sums ``G[j, b] = Σ_{i ∈ cell j, bin b} v_i (c_i − y_i)`` and cell masses
``n_j = Σ_{i ∈ cell j} v_i`` (``v``: optional sample weights), and ``N = Σ_j n_j``,

    ECE_w = Σ_b |Σ_j w_j G[j, b]| / Σ_j w_j n_j = Σ_b |Σ_j w_j G[j, b]| / N

because every w in the class has P-mean 1 (Σ_j w_j n_j = N). ECE_w is convex in w, so its
maximum over a polytope sits at a vertex. Two classes:

* ``ratio=R`` (default 5): 0 ≤ w_j ≤ R, E_P[w] = 1: "any mixture of routing cells that
  holds at least 1/R of the data" (a CVaR-type set). Exact by enumeration, whichever is
  cheaper for the problem's size:

  - *vertices*: every vertex has all cells at 0 or R except at most one (the budget
    E_P[w] = 1 fixes that one), J·2^(J−1) candidates for J cells;
  - *sign patterns*: max_w Σ_b |a_b(w)| = max_s max_w Σ_b s_b a_b(w); for a fixed sign
    pattern s over the B' non-empty bins the inner problem is a fractional knapsack LP
    (fill cells by decreasing Σ_b s_b G[j, b] / n_j up to the cap R), 2^B' candidates.

* ``kl=ρ``: E_P[w log w] ≤ ρ (a KL ball). For a sign pattern s the inner problem maximises
  E_Q[h] with h_j = Σ_b s_b G[j, b] / n_j over KL(Q‖P) ≤ ρ; its maximiser is the exponential
  tilt q_j ∝ p_j exp(t h_j) with the multiplier t ≥ 0 found by a bisection (vectorised over
  patterns; the lower end of the bracket is kept, so the returned weights are feasible).
  Patterns whose cheap upper bound (max_j h_j, or the Pinsker bound
  E_P[h] + range(h)·√(ρ/2)) cannot beat a value already attained are skipped: the result
  is still the maximum over every pattern.

``worst_case_ece_resampled`` solves the same problem for every row of a matrix of example
weights (bootstrap multinomial counts, or any non-negative weights), vectorised over rows
in chunks: no Python loop over rows, bins or candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from routeaudit.metrics import bin_indices
from routeaudit.stats._backend import CHUNK_KEYS

__all__ = ["WorstShift", "worst_case_ece", "worst_case_ece_resampled", "worst_case_ece_sums"]

Method = Literal["auto", "vertices", "signs"]

#: Most candidate (vertex or sign-pattern) evaluations per row before the problem is refused.
MAX_CANDIDATES = 1 << 22
#: Bisection rounds of the KL multiplier (on φ = τ / (1 + τ) in [0, 1)).
KL_ROUNDS = 64
#: Relative slack when checking a vertex's free coordinate against [0, R] (rounding only).
_FEAS_TOL = 1e-12


@dataclass(frozen=True)
class WorstShift:
    """The worst routing-only shift of the class, and the ECE there."""

    value: float
    """Worst-case ECE under the reweighting class."""
    base: float
    """ECE at w = 1 (equals :func:`routeaudit.metrics.ece` on the same bins)."""
    cell_weights: np.ndarray
    """[J] likelihood ratio dQ/dP of each routing cell (P-mean 1); a label with no data
    (P-mass 0) gets 1.0, which does not enter anything."""
    weights: np.ndarray
    """[N] per-example likelihood ratio, ``cell_weights[cells]``."""


# --------------------------------------------------------------------------- inputs


def _inputs(conf: object, correct: object, cells: object, n_bins: int, closed: str,
            strategy: str, sample_weight: object
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(residual c − y, bin index, cell label, sample weight or None, number of labels J)."""
    c = np.asarray(conf)
    y = np.asarray(correct)
    if c.ndim != 1 or y.ndim != 1 or c.shape != y.shape:
        raise ValueError(f"conf and correct must be 1-D of the same length, got shapes "
                         f"{c.shape} and {y.shape}")
    c = c.astype(np.float64, copy=False)
    y = y.astype(np.float64, copy=False)
    bins = bin_indices(c, n_bins, closed, strategy=strategy)  # validates conf, bins, closure
    if y.size and not ((y >= 0.0) & (y <= 1.0)).all():
        i = int(np.argmax(~((y >= 0.0) & (y <= 1.0))))
        raise ValueError(f"correct[{i}] = {y[i]!r} must lie in [0, 1]")
    k = np.asarray(cells)
    if k.shape != c.shape:
        raise ValueError(f"cells must have one label per example ({c.size}), got shape {k.shape}")
    integral = np.issubdtype(k.dtype, np.integer) or (
        np.issubdtype(k.dtype, np.floating) and bool(np.all(k == np.round(k))))
    if k.size and not integral:
        raise ValueError(f"cells must be integer labels, got dtype {k.dtype}")
    k = k.astype(np.int64)
    if k.size and k.min() < 0:
        raise ValueError(f"cells must be non-negative labels, got {int(k.min())}")
    v = None
    if sample_weight is not None:
        v = np.asarray(sample_weight, dtype=np.float64)
        if v.shape != c.shape:
            raise ValueError(f"sample_weight must have one entry per example ({c.size}), got "
                             f"shape {v.shape}")
        if not (np.isfinite(v).all() and (v >= 0).all()):
            raise ValueError("sample_weight must be finite and >= 0")
    n_cells = int(k.max()) + 1 if k.size else 0
    return c - y, bins.astype(np.int64), k, v, n_cells


def _check_class(ratio: float, kl: float | None) -> None:
    if kl is not None:
        if not (math.isfinite(kl) and kl >= 0):
            raise ValueError(f"kl must be a finite number >= 0, got {kl!r}")
        return
    if not (math.isfinite(ratio) and ratio >= 1.0):
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio!r}")


# --------------------------------------------------------------------------- CVaR: vertices


def _vertex_table(n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (set at the cap, free cell) pair: masks [V, J] (bool) and free cell [V]."""
    j = np.arange(n_cells)
    masks = ((np.arange(1 << n_cells)[:, None] >> j[None, :]) & 1).astype(bool)  # [M, J]
    m_idx, f_idx = np.nonzero(~masks)  # the free cell is not in the set
    return masks[m_idx], f_idx


def _solve_vertices(g: np.ndarray, n: np.ndarray, ratio: float, want_weights: bool
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Max over the vertices of {0 ≤ w ≤ R, Σ n_j w_j = N}. g [R, J, B], n [R, J]."""
    rows, n_cells, _ = g.shape
    masks, free = _vertex_table(n_cells)
    total = n.sum(axis=1)  # [R]
    capped = masks.astype(np.float64) * ratio  # [V, J]
    used = n @ capped.T  # [R, V] budget used by the capped set
    n_free = n[:, free]  # [R, V]
    with np.errstate(divide="ignore", invalid="ignore"):
        w_free = (total[:, None] - used) / n_free
    ok = (n_free > 0) & (w_free >= -_FEAS_TOL * ratio) & (w_free <= ratio * (1 + _FEAS_TOL))
    w_free = np.where(ok, np.clip(w_free, 0.0, ratio), 0.0)
    # a_b = Σ_{j in set} R g_jb + w_free g_{free, b}: one matmul plus one gather
    sums = np.einsum("vj,rjb->rvb", capped, g) + w_free[:, :, None] * g[:, free, :]
    values = np.abs(sums).sum(axis=2)
    values[~ok] = -np.inf
    best = values.argmax(axis=1)
    out = values[np.arange(rows), best]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, out / total, np.nan)
    if not want_weights:
        return out, None
    w = capped[best].copy()
    w[np.arange(rows), free[best]] = w_free[np.arange(rows), best]
    return out, w


# --------------------------------------------------------------------------- sign patterns


def _patterns(n_active: int) -> np.ndarray:
    """Every sign pattern over ``n_active`` bins: [2^B', B'] of ±1."""
    bits = (np.arange(1 << n_active)[:, None] >> np.arange(n_active)[None, :]) & 1
    return (2 * bits - 1).astype(np.float64)


def _knapsack(h: np.ndarray, n: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """max Σ_j w_j n_j h_j over 0 ≤ w ≤ R, Σ n_j w_j = N, per (row, pattern).

    h [R, P, J] (per-cell densities g_j / n_j; −inf for empty cells), n [R, J]. Greedy:
    cells by decreasing density, each filled to R n_j until the budget N is spent.
    Returns (Σ_j w_j n_j h_j [R, P], w [R, P, J])."""
    order = np.argsort(-h, axis=2, kind="stable")
    n_sorted = np.take_along_axis(np.broadcast_to(n[:, None, :], h.shape), order, axis=2)
    cap = ratio * n_sorted
    before = np.cumsum(cap, axis=2) - cap
    total = n.sum(axis=1)[:, None, None]
    mass = np.clip(total - before, 0.0, cap)  # Q-mass (times N) given to each sorted cell
    h_sorted = np.take_along_axis(h, order, axis=2)
    value = np.where(mass > 0, mass * h_sorted, 0.0).sum(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        w_sorted = np.where(n_sorted > 0, mass / n_sorted, 0.0)
    w = np.empty_like(w_sorted)
    np.put_along_axis(w, order, w_sorted, axis=2)
    return value, w


def _densities(g: np.ndarray, n: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """h [R, P, J] = Σ_b s_b g[j, b] / n_j (−inf for cells without data)."""
    proj = np.einsum("pb,rjb->rpj", signs, g)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n[:, None, :] > 0, proj / n[:, None, :], -np.inf)


def _solve_signs(g: np.ndarray, n: np.ndarray, ratio: float, want_weights: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Max over sign patterns of the fractional-knapsack LP. g [R, J, B'] (active bins)."""
    rows = g.shape[0]
    signs = _patterns(g.shape[2])
    total = n.sum(axis=1)
    step = max(1, CHUNK_KEYS // max(1, rows * g.shape[1]))
    best_v = np.full(rows, -np.inf)
    best_w = np.ones((rows, g.shape[1])) if want_weights else None
    for p0 in range(0, signs.shape[0], step):  # chunks of patterns, each vectorised
        h = _densities(g, n, signs[p0:p0 + step])
        value, w = _knapsack(h, n, ratio)
        arg = value.argmax(axis=1)
        v = value[np.arange(rows), arg]
        better = v > best_v
        best_v = np.where(better, v, best_v)
        if best_w is not None:
            best_w[better] = w[np.arange(rows), arg][better]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, best_v / total, np.nan)
    return out, best_w


# --------------------------------------------------------------------------- KL ball


def _tilt(h: np.ndarray, logp: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tilted cell masses q ∝ p e^{t h} and KL(q‖p), for h [K, J] (−inf: no data), t [K]."""
    top = h.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        z = np.where(np.isfinite(h), t[:, None] * (h - top) + logp, -np.inf)
    z -= z.max(axis=1, keepdims=True)
    q = np.exp(z)
    q /= q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * (np.log(q) - logp), 0.0).sum(axis=1)
    return q, kl


def _multiplier(phi: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """t = φ / (1 − φ) / range(h): φ in [0, 1) maps onto [0, ∞) (kept finite)."""
    return phi / np.maximum(1.0 - phi, 2.0**-60) * scale


def _kl_values(h: np.ndarray, logp: np.ndarray, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """max E_q[h] over KL(q‖p) ≤ ρ, per row of h [K, J]; returns (value [K], q [K, J])."""
    finite = np.isfinite(h)
    top = np.where(finite, h, -np.inf).max(axis=1)
    low = np.where(finite, h, np.inf).min(axis=1)
    spread = top - low
    # t → ∞: p restricted to the argmax set
    at_top = finite & (h >= top[:, None])
    p = np.exp(logp)
    p_top = np.where(at_top, p, 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        kl_limit = -np.log(p_top)
    lo = np.zeros(h.shape[0])
    hi = np.ones(h.shape[0])
    scale = np.where(spread > 0, 1.0 / np.where(spread > 0, spread, 1.0), 0.0)
    for _ in range(KL_ROUNDS):  # bisection rounds, each vectorised over all problems
        mid = 0.5 * (lo + hi)
        _, kl = _tilt(h, logp, _multiplier(mid, scale))
        inside = kl <= rho
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    q, _ = _tilt(h, logp, _multiplier(lo, scale))
    limit = (kl_limit <= rho) | (spread <= 0)
    q_top = np.where(at_top, p, 0.0) / np.where(p_top > 0, p_top, 1.0)[:, None]
    q = np.where(limit[:, None], q_top, q)
    value = np.where(q > 0, q * np.where(finite, h, 0.0), 0.0).sum(axis=1)
    return value, q


def _solve_kl(g: np.ndarray, n: np.ndarray, rho: float, want_weights: bool
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Max over sign patterns of the KL-ball tilt, skipping patterns whose upper bound cannot
    beat a value already attained. g [R, J, B'] (active bins), n [R, J]."""
    rows, n_cells, _ = g.shape
    signs = _patterns(g.shape[2])
    total = n.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total[:, None] > 0, n / total[:, None], 0.0)
        logp = np.where(p > 0, np.log(p), -np.inf)
    # A value every row attains: the pattern of the unweighted bin sums at w = 1 (E_P[h]).
    s0 = np.where(g.sum(axis=1) >= 0, 1.0, -1.0)  # [R, B']
    with np.errstate(divide="ignore", invalid="ignore"):
        h0 = np.where(n > 0, np.einsum("rb,rjb->rj", s0, g) / n, -np.inf)
    best_v, q0 = _kl_values(h0, logp, rho)
    best_q = q0
    pinsker = math.sqrt(rho / 2.0)
    step = max(1, CHUNK_KEYS // max(1, rows * n_cells))
    for p0 in range(0, signs.shape[0], step):  # chunks of patterns, each vectorised
        h = _densities(g, n, signs[p0:p0 + step])  # [R, P, J]
        finite = np.isfinite(h)
        top = np.where(finite, h, -np.inf).max(axis=2)
        low = np.where(finite, h, np.inf).min(axis=2)
        mean = np.where(finite, h * p[:, None, :], 0.0).sum(axis=2)
        bound = np.minimum(top, mean + (top - low) * pinsker)
        keep = bound > best_v[:, None] * (1 + 1e-12) + 1e-300
        if not keep.any():
            continue
        r_idx, p_idx = np.nonzero(keep)
        value, q = _kl_values(h[r_idx, p_idx], logp[r_idx], rho)
        # the best kept pattern of each row (rows sorted by value so the last write wins)
        order = np.lexsort((value, r_idx))
        r_s, v_s = r_idx[order], value[order]
        last = np.r_[r_s[1:] != r_s[:-1], True]
        r_best, v_best, q_best = r_s[last], v_s[last], q[order][last]
        better = v_best > best_v[r_best]
        best_v[r_best[better]] = v_best[better]
        best_q[r_best[better]] = q_best[better]
    out = np.where(total > 0, best_v, np.nan)
    if not want_weights:
        return out, None
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(p > 0, best_q / p, 1.0)
    return out, w


# --------------------------------------------------------------------------- dispatch


#: Largest dense (example × cell-bin) design, in entries, before sums fall back to bincount.
_DENSE_DESIGN = 1 << 23


class _Sums:
    """Per-row cell-by-bin residual sums for example weights [R, N]: a matrix product with a
    dense one-hot design when it is small (BLAS; one pass per chunk of rows), else one
    ``bincount`` over (row, cell, bin) keys."""

    def __init__(self, residual: np.ndarray, bins: np.ndarray, cells: np.ndarray,
                 n_cells: int, n_bins: int) -> None:
        self.n_cells, self.n_bins = n_cells, n_bins
        self.size = n_cells * n_bins
        self.residual, self.cells = residual, cells
        self.key = cells * n_bins + bins
        n = residual.size
        self.design: np.ndarray | None = None
        if n * (self.size + n_cells) <= _DENSE_DESIGN:
            design = np.zeros((n, self.size + n_cells))
            design[np.arange(n), self.key] = residual
            design[np.arange(n), self.size + cells] = 1.0
            self.design = design

    def __call__(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """G [R, J, B] and n [R, J]."""
        rows = weights.shape[0]
        if self.design is not None:
            sums = weights @ self.design
            g, n = sums[:, :self.size], sums[:, self.size:]
        else:
            offset = np.arange(rows)[:, None]
            g = np.bincount((offset * self.size + self.key[None, :]).ravel(),
                            (weights * self.residual[None, :]).ravel(), rows * self.size)
            n = np.bincount((offset * self.n_cells + self.cells[None, :]).ravel(),
                            weights.ravel(), rows * self.n_cells)
        return (g.reshape(rows, self.n_cells, self.n_bins),
                n.reshape(rows, self.n_cells))


def _choose(method: Method, n_cells: int, n_active: int) -> str:
    vertices = n_cells * (1 << max(n_cells - 1, 0))
    signs = 1 << n_active
    if method == "auto":
        method = "vertices" if vertices * n_active <= signs * n_cells else "signs"
    if method not in ("vertices", "signs"):
        raise ValueError(f"method must be 'auto', 'vertices' or 'signs', got {method!r}")
    if (vertices if method == "vertices" else signs) > MAX_CANDIDATES:
        raise ValueError(
            f"{n_cells} routing cells and {n_active} non-empty bins give too many candidates "
            f"for the exact solver ({min(vertices, signs):,} > {MAX_CANDIDATES:,}); use fewer "
            "bins or coarser routing cells")
    return method


def _solve_all(g: np.ndarray, n: np.ndarray, ratio: float, kl: float | None, method: Method,
           want_weights: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Worst-case ECE per row of g [R, J, B], n [R, J] (cells without data anywhere and
    bins without data anywhere are dropped first; they cannot change anything)."""
    rows, n_cells, _ = g.shape
    if kl is not None and kl == 0:
        ratio, kl = 1.0, None  # the ball of radius 0 holds w = 1 only
    has_cell = n.sum(axis=0) > 0
    has_bin = (g != 0).any(axis=(0, 1))
    gg = g[:, has_cell][:, :, has_bin]
    nn = n[:, has_cell]
    if kl is not None:
        if has_bin.sum() > 20:
            raise ValueError(f"{int(has_bin.sum())} non-empty bins: too many sign patterns for "
                             "the exact KL solver; use fewer bins")
        values, w = _solve_kl(gg, nn, float(kl), want_weights)
    elif ratio == 1.0 or gg.shape[1] <= 1:  # only w = 1 is feasible
        total = nn.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(total > 0, np.abs(gg.sum(axis=1)).sum(axis=1) / total, np.nan)
        w = np.ones_like(nn) if want_weights else None
    elif _choose(method, gg.shape[1], gg.shape[2]) == "vertices":
        values, w = _solve_vertices(gg, nn, float(ratio), want_weights)
    else:
        values, w = _solve_signs(gg, nn, float(ratio), want_weights)
    if w is None:
        return values, None
    full = np.ones((rows, n_cells))
    full[:, has_cell] = w
    return values, full


def _solve(g: np.ndarray, n: np.ndarray, ratio: float, kl: float | None, method: Method,
           want_weights: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_solve_all` with the harmless 0·∞ and 1/0 of empty cells silenced (every such
    entry is masked out by a ``where``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _solve_all(g, n, ratio, kl, method, want_weights)


def worst_case_ece_sums(g: np.ndarray, n: np.ndarray, *, ratio: float = 5.0,
                        kl: float | None = None, method: Method = "auto"
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The worst case from per-row cell-by-bin residual sums: ``g [R, J, B]`` (Σ of weighted
    c − y per routing cell and confidence bin) and ``n [R, J]`` (the cells' weighted masses).
    For callers that already hold these sums for many resamples (one matrix product per
    chunk of bootstrap rows). Returns (values [R], cell weights [R, J]); a row with no mass
    gives NaN. ``value`` is never below the row's ECE at w = 1."""
    _check_class(ratio, kl)
    gg = np.asarray(g, dtype=np.float64)
    nn = np.asarray(n, dtype=np.float64)
    if gg.ndim != 3 or nn.shape != gg.shape[:2]:
        raise ValueError(f"g must be [R, J, B] and n [R, J], got {gg.shape} and {nn.shape}")
    if not (np.isfinite(gg).all() and np.isfinite(nn).all() and (nn >= 0).all()):
        raise ValueError("g must be finite and n finite and >= 0")
    values, w = _solve(gg, nn, ratio, kl, method, want_weights=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = nn.sum(axis=1)
        base = np.where(total > 0, np.abs(gg.sum(axis=1)).sum(axis=1) / total, np.nan)
    assert w is not None
    return np.fmax(values, base), w


def worst_case_ece(conf: np.ndarray, correct: np.ndarray, cells: np.ndarray, *,
                   ratio: float = 5.0, kl: float | None = None, n_bins: int = 15,
                   closed: Literal["right", "left"] = "right",
                   strategy: Literal["equal_width", "equal_mass"] = "equal_width",
                   sample_weight: np.ndarray | None = None,
                   method: Method = "auto") -> WorstShift:
    """The largest ECE over reweightings that depend on x only through its routing cell.

    Args:
        conf, correct: top-label confidence and correctness per example.
        cells: a non-negative integer routing cell per example (e.g. the top-1 expert).
        ratio: the likelihood-ratio cap R of the CVaR-type class (0 ≤ w ≤ R, E_P[w] = 1).
        kl: use the KL ball E_P[w log w] ≤ kl instead (``ratio`` is then ignored).
        n_bins, closed, strategy: the bins of :func:`routeaudit.metrics.ece`.
        sample_weight: P-weights of the examples (default 1 each).
        method: ``"vertices"`` or ``"signs"`` to force one of the two exact enumerations of
            the ratio class (the default picks the cheaper; both give the same maximum).

    Returns:
        :class:`WorstShift`. ``base`` equals ``metrics.ece(conf, correct, n_bins, ...)``
        (without sample weights); ``value >= base``; ``ratio=1`` or ``kl=0`` give ``base``.
    """
    _check_class(ratio, kl)
    residual, bins, k, v, n_cells = _inputs(conf, correct, cells, n_bins, closed, strategy,
                                            sample_weight)
    if residual.size == 0:
        raise ValueError("no examples")
    weights = np.ones((1, residual.size)) if v is None else v[None, :]
    g, n = _Sums(residual, bins, k, n_cells, int(n_bins))(weights)
    total = float(n.sum())
    if total <= 0:
        raise ValueError("sample_weight sums to 0")
    base = float(np.abs(g[0].sum(axis=0)).sum() / total)
    values, w = _solve(g, n, ratio, kl, method, want_weights=True)
    cell_weights = w[0]
    # never report less than w = 1 gives (the solvers reach it; this guards rounding only)
    value = max(float(values[0]), base)
    return WorstShift(value, base, cell_weights, cell_weights[k])


def worst_case_ece_resampled(conf: np.ndarray, correct: np.ndarray, cells: np.ndarray,
                             counts: np.ndarray, *, ratio: float = 5.0, kl: float | None = None,
                             n_bins: int = 15, closed: Literal["right", "left"] = "right",
                             strategy: Literal["equal_width", "equal_mass"] = "equal_width",
                             sample_weight: np.ndarray | None = None,
                             method: Method = "auto") -> np.ndarray:
    """:func:`worst_case_ece`'s value for every row of ``counts`` [B, N] (bootstrap
    multinomial counts, or any non-negative example weights; multiplied by
    ``sample_weight`` when given). Bins stay those of the unweighted data, as in the
    bootstrap of every other statistic. Vectorised over rows (in chunks) and candidates.
    A row whose weights sum to 0 gives NaN."""
    _check_class(ratio, kl)
    residual, bins, k, v, n_cells = _inputs(conf, correct, cells, n_bins, closed, strategy,
                                            sample_weight)
    w_all = np.asarray(counts, dtype=np.float64)
    if w_all.ndim != 2 or w_all.shape[1] != residual.size:
        raise ValueError(f"counts must be [B, N] with N = {residual.size}, got shape "
                         f"{w_all.shape}")
    if not (np.isfinite(w_all).all() and (w_all >= 0).all()):
        raise ValueError("counts must be finite and >= 0")
    out = np.empty(w_all.shape[0])
    if residual.size == 0:
        out[:] = np.nan
        return out
    sums = _Sums(residual, bins, k, n_cells, int(n_bins))
    chunk = max(1, CHUNK_KEYS // (4 * residual.size))
    for r0 in range(0, w_all.shape[0], chunk):  # chunks of rows, each vectorised
        weights = w_all[r0:r0 + chunk]
        if v is not None:
            weights = weights * v[None, :]
        g, n = sums(weights)
        values, _ = _solve(g, n, ratio, kl, method, want_weights=False)
        with np.errstate(invalid="ignore", divide="ignore"):
            total = n.sum(axis=1)
            base = np.where(total > 0, np.abs(g.sum(axis=1)).sum(axis=1) / total, np.nan)
        out[r0:r0 + chunk] = np.fmax(values, base)
    return out
