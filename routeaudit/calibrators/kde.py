"""The Nadaraya–Watson evaluation engine: kernel sums, exact and binned (docs/methods.md §2.6).

Why a module of its own: :mod:`routeaudit.calibrators.kernel` (the estimators) and
:mod:`routeaudit.calibrators.bandwidth` (bandwidth selection) both need to evaluate the
same Gaussian-product-kernel sums many times, and almost all of the numerical work — and all
of the accuracy trade-offs — live here. Nothing in this module knows how a bandwidth was
chosen: every function takes the scales (κ = 1 bandwidths) and the multipliers κ it is given.

The estimator, with a Gaussian product kernel K(u) = exp(−u²/2)::

    p̂(x) = Σ_j Π_k K((x_k − X_jk) / h_k) · y_j  /  Σ_j Π_k K((x_k − X_jk) / h_k)

The guard: the first column must be the confidence; where the kernel denominator is below
``DEN_GUARD`` = 1e-12 the prediction falls back to the 1-D confidence-only NW value
(bandwidth κ · σ̂_c · n^(−1/5)), and where that is below 1e-12 too, to the mean of y
(:class:`_FallbackModel`, :func:`_exact_predict`).

Two evaluation methods:

* ``method="exact"``: dense O(n·m) float64 kernel sums in chunks with torch (``device``
  may be a GPU): :func:`kernel_sums` / :func:`_kernel_sums`. This is the reference.
* ``method="binned"`` (default, d ≤ 2): the fit data are binned (weights y and 1) onto a
  regular grid with spacing ≤ h/4 per axis using 4-point cubic Lagrange weights (4th-order
  "binning": Σ_a w_a(x) φ(a) = φ(x) + O(Δ⁴) for smooth φ; plain linear binning was
  measured to be ~20× less accurate at the same spacing), convolved with the separable
  Gaussian by FFT (truncated at 8h, zero-padded: no wrap-around), and numerator and
  denominator are interpolated at the query points with the same cubic weights. Query
  points whose stencil leaves the grid, or whose interpolated denominator is below 1 (less
  than one effective neighbour, where the relative binning error is largest), are
  recomputed exactly from the fit points within 10h (KD-tree, :func:`_local_predict`).
  Measured against exact on realistic data (n = 1e3..1e5, κ = 0.25..4): max |Δp| ≤ 5e-4,
  mean ≤ 5e-5 (``tests/test_kernel.py`` asserts 1e-3 and 1e-4).
  Many bandwidths share one binning through the grid pyramid (:class:`_Geometry`,
  :class:`_Pyramid`): a larger bandwidth h is convolved on the coarsest level (spacing
  doubling per level) whose spacing is still ≤ h/4, obtained by restriction (the transpose
  of cubic midpoint interpolation, itself 4th-order accurate), and the FFTs of each level
  are cached, so a held-out group is "all groups − one group" in Fourier space.
  For d ≥ 3 the exact method is used.

torch (exact sums on a GPU), ``scipy.fft``, ``scipy.sparse`` and ``scipy.spatial.cKDTree`` are
imported inside the functions that use them, so importing this module is cheap.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scipy import sparse

DEN_GUARD = 1e-12  #: kernel denominators below this trigger the documented fall-back
GRID_RATIO = 4.0  #: binned grid spacing ≤ h / GRID_RATIO per axis
TRUNCATE = 8.0  #: binned kernel truncated at TRUNCATE·h (exp(−32) ≈ 1e-14 relative)
EXACT_BELOW = 1.0  #: binned denominators below this (< 1 effective point) are recomputed exactly
MAX_CELLS = {1: 1 << 16, 2: 2048}  #: cap on grid cells per axis for the binned method
_CHUNK_ELEMS = 1 << 22  #: elements of one dense [chunk, n] kernel block
EXTREME_P = 1e-3  #: binned predictions within this of 0 or 1 are recomputed exactly
LOCAL_RADIUS = 10.0  #: binned-mode exact re-evaluation sums over points within 10 h


# =========================================================================== exact
def _kernel_sums(Xs: np.ndarray, y: np.ndarray, Qs: np.ndarray, kappas, device) -> tuple:
    """Σ_j W y_j and Σ_j W for W = exp(−½‖q − x_j‖² / κ²), one row per κ (inputs pre-scaled):
    numpy on CPU (no torch import), torch on other devices; the same steps either way, equal
    to float64 rounding (``tests/test_kernel.py`` asserts 1e-13 relative)."""
    if str(device) == "cpu":
        return _dense_kernel_sums(np, Xs, y, Qs, kappas, None)
    import torch

    return _dense_kernel_sums(torch, Xs, y, Qs, kappas, torch.device(device))


def _dense_kernel_sums(xp, Xs, y, Qs, kappas, device) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_kernel_sums` with the array module ``xp`` (numpy, or torch on ``device``), over
    [chunk, n] blocks of squared distances."""
    if xp is np:
        X, Q, yt = (np.asarray(a, dtype=np.float64) for a in (Xs, Qs, y))
    else:
        X, Q, yt = (xp.as_tensor(a, dtype=xp.float64, device=device) for a in (Xs, Qs, y))
    n, d = X.shape
    m = Q.shape[0]
    kappas = [float(k) for k in kappas]
    num = np.empty((len(kappas), m))
    den = np.empty_like(num)
    chunk = max(1, _CHUNK_ELEMS // max(n, 1))
    for start in range(0, m, chunk):
        q = Q[start : start + chunk]
        D = (q[:, None, 0] - X[None, :, 0]) ** 2
        for j in range(1, d):
            D += (q[:, None, j] - X[None, :, j]) ** 2
        for k, kappa in enumerate(kappas):
            W = xp.exp(D * (-0.5 / (kappa * kappa)))
            sums = (W @ yt, W.sum(1))
            if xp is not np:
                sums = tuple(a.cpu().numpy() for a in sums)
            num[k, start : start + chunk], den[k, start : start + chunk] = sums
    return num, den


def kernel_sums(X_fit, y_fit, X_query, bandwidth, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact Gaussian-product-kernel sums (numerator Σ K·y, denominator Σ K), float64.

    ``bandwidth`` is the per-coordinate h (scalar or [d]). The reference for every binned
    approximation.
    """
    Xf = np.asarray(X_fit, dtype=np.float64)
    Q = np.asarray(X_query, dtype=np.float64)
    if Xf.ndim == 1:
        Xf, Q = Xf[:, None], Q.reshape(-1, 1)
    h = np.broadcast_to(np.asarray(bandwidth, dtype=np.float64), (Xf.shape[1],))
    centre = Xf.mean(axis=0)
    num, den = _kernel_sums(
        (Xf - centre) / h, np.asarray(y_fit, np.float64), (Q - centre) / h, [1.0], device
    )
    return num[0], den[0]


@dataclass
class _FallbackModel:
    """What the guarded exact evaluation needs: fit data (active columns) and scales."""

    X: np.ndarray  # [n, d_active]
    y: np.ndarray
    scale: np.ndarray  # κ = 1 bandwidth per active column
    scale1: float | None  # κ = 1 bandwidth of the 1-D confidence fall-back (None: none)
    device: str
    _tree: object = field(default=None, repr=False)

    @property
    def ymean(self) -> float:
        return float(self.y.mean())

    def tree(self):
        """A KD-tree of the centred, scaled fit points (built on first use)."""
        if self._tree is None:
            from scipy.spatial import cKDTree

            self._centre = self.X.mean(axis=0)
            self._tree = cKDTree((self.X - self._centre) / self.scale)
        return self._tree, self._centre


def _exact_predict(model: _FallbackModel, Q: np.ndarray, kappas) -> np.ndarray:
    """Guarded exact NW predictions [len(kappas), m]."""
    kappas = [float(k) for k in kappas]
    out = np.empty((len(kappas), Q.shape[0]))
    if Q.shape[0] == 0:
        return out
    centre = model.X.mean(axis=0)
    num, den = _kernel_sums(
        (model.X - centre) / model.scale, model.y, (Q - centre) / model.scale, kappas, model.device
    )
    ok = den >= DEN_GUARD
    out[ok] = num[ok] / den[ok]
    for k, kappa in enumerate(kappas):
        bad = np.flatnonzero(~ok[k])
        if bad.size == 0:
            continue
        fill = np.full(bad.size, model.ymean)
        if model.scale1 is not None:
            c0 = model.X[:, 0].mean()
            n1, d1 = _kernel_sums(
                ((model.X[:, 0] - c0) / model.scale1)[:, None],
                model.y,
                ((Q[bad, 0] - c0) / model.scale1)[:, None],
                [kappa],
                model.device,
            )
            good1 = d1[0] >= DEN_GUARD
            fill[good1] = n1[0, good1] / d1[0, good1]
        out[k, bad] = fill
    return np.clip(out, model.y.min(), model.y.max())


def _local_predict(model: _FallbackModel, Q: np.ndarray, kappa: float) -> np.ndarray:
    """Guarded NW at (few) points, summing over fit points within LOCAL_RADIUS·h only.

    Points further away weigh < exp(−LOCAL_RADIUS²/2) = e⁻⁵⁰ each, so the sums equal the
    dense ones to ~1e-22·n; where the local denominator is below the guard the dense
    evaluation (with its fall-backs) is used.
    """
    m = Q.shape[0]
    if m == 0:
        return np.empty(0)
    tree, centre = model.tree()
    Qs = (Q - centre) / model.scale
    lists = tree.query_ball_point(Qs, r=LOCAL_RADIUS * kappa)
    counts = np.fromiter(map(len, lists), dtype=np.int64, count=m)
    idx = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(counts.sum()))
    qid = np.repeat(np.arange(m), counts)
    # Σ_k (q_k − x_k)², column by column: the additions of ``(...).sum(axis=1)``, in order
    D = (Qs[qid, 0] - tree.data[idx, 0]) ** 2
    for k in range(1, Qs.shape[1]):
        D += (Qs[qid, k] - tree.data[idx, k]) ** 2
    W = np.exp(D * (-0.5 / (kappa * kappa)))
    num = np.bincount(qid, W * model.y[idx], minlength=m)
    den = np.bincount(qid, W, minlength=m)
    p = np.empty(m)
    ok = den >= DEN_GUARD
    p[ok] = num[ok] / den[ok]
    if not ok.all():
        p[~ok] = _exact_predict(model, Q[~ok], [kappa])[0]
    return np.clip(p, model.y.min(), model.y.max())


# =========================================================================== binned
def _cubic_weights(f: np.ndarray) -> np.ndarray:
    """Cubic Lagrange weights of nodes −1, 0, 1, 2 at fractions f ∈ [0, 1]: [..., 4]."""
    return np.stack(
        [
            -f * (f - 1.0) * (f - 2.0) / 6.0,
            (f + 1.0) * (f - 1.0) * (f - 2.0) / 2.0,
            -(f + 1.0) * f * (f - 2.0) / 2.0,
            (f + 1.0) * f * (f - 1.0) / 6.0,
        ],
        axis=-1,
    )


@functools.lru_cache(maxsize=64)
def _prolongation(coarse_cells: int) -> sparse.csr_matrix:
    """Cubic interpolation from a grid of ``m + 1`` nodes to its ``2m + 1`` midpoint refinement.

    Even fine nodes copy their coarse node; odd ones use the 4-point cubic stencil, shifted
    to stay inside the grid at the ends (needs m ≥ 3). Its transpose is the pyramid's
    restriction: binning at spacing Δ then restricting is cubic binning at spacing 2Δ up to
    O(Δ⁴).
    """
    from scipy import sparse

    m = int(coarse_cells)
    i = np.arange(m)
    start = np.clip(i - 1, 0, m - 3)
    w = _cubic_weights(i + 0.5 - (start + 1.0))  # [m, 4]
    rows = np.concatenate([2 * np.arange(m + 1), np.repeat(2 * i + 1, 4)])
    cols = np.concatenate([np.arange(m + 1), (start[:, None] + np.arange(4)).reshape(-1)])
    vals = np.concatenate([np.ones(m + 1), w.reshape(-1)])
    return sparse.csr_matrix((vals, (rows, cols)), shape=(2 * m + 1, m + 1))


@functools.lru_cache(maxsize=64)
def _restriction(coarse_cells: int) -> sparse.csr_matrix:
    """The transpose of :func:`_prolongation` as CSR (built once per size)."""
    return _prolongation(coarse_cells).T.tocsr()


@dataclass
class _Geometry:
    """A regular grid per axis with a pyramid of coarser levels (spacing × 2 per level)."""

    lo: np.ndarray  # first grid node per axis (the data minimum minus padding)
    delta0: np.ndarray
    cells0: np.ndarray  # intervals per axis at level 0, a multiple of 2**levels
    levels: np.ndarray  # the coarsest level per axis

    @classmethod
    def build(cls, lo, hi, h_min, h_max, grid_size=None) -> _Geometry:
        """Spacing ≤ h_min/4 at level 0; the data range padded by ≥ 2 coarsest-level nodes."""
        d = lo.shape[0]
        cap = MAX_CELLS.get(d, 256)
        lo_g = np.empty(d)
        delta0 = np.empty(d)
        cells0 = np.empty(d, dtype=np.int64)
        levels = np.empty(d, dtype=np.int64)
        for j in range(d):
            data_span = max(hi[j] - lo[j], 0.0)
            pad = 0.5 * h_max[j]  # ≥ 2 nodes at the coarsest level (spacing ≤ h_max/4)
            if grid_size is not None:
                cells = max(int(grid_size) - 1, 8)
                dlt = (data_span + 2.0 * pad) / (cells - 6)
                pad = max(pad, 3.0 * dlt)
            else:
                dlt = h_min[j] / GRID_RATIO
                pad = max(pad, 3.0 * dlt)
                cells = math.ceil((data_span + 2.0 * pad) / dlt)
                if cells > cap:
                    cells = cap
                    dlt = (data_span + 2.0 * pad) / (cap - 6)
                    pad = max(pad, 3.0 * dlt)
            span = data_span + 2.0 * pad
            cells = max(cells, math.ceil(span / dlt))
            ratio = h_max[j] / (GRID_RATIO * dlt)
            k = max(0, math.floor(math.log2(ratio))) if ratio > 0 else 0
            while k > 0 and cells < 8 * (1 << k):  # keep ≥ 8 cells at the coarsest level
                k -= 1
            step = 1 << k
            lo_g[j] = lo[j] - pad
            delta0[j], cells0[j], levels[j] = dlt, -(-cells // step) * step, k
        return cls(lo_g, delta0, cells0, levels)

    def level_for(self, h: np.ndarray) -> tuple[int, ...]:
        ratio = h / (GRID_RATIO * self.delta0)
        raw = np.floor(np.log2(np.maximum(ratio, 1e-300)))
        return tuple(int(v) for v in np.clip(raw, 0, self.levels))

    def delta(self, key) -> np.ndarray:
        return self.delta0 * (2.0 ** np.asarray(key))

    def cells(self, key) -> np.ndarray:
        return self.cells0 // (1 << np.asarray(key))

    def fft_shape(self, key, h_max: np.ndarray) -> tuple[int, ...]:
        import scipy.fft as sfft

        cells = self.cells(key)
        delta = self.delta(key)
        out = []
        for j, c in enumerate(cells):
            # below the top level a bandwidth is < 2·GRID_RATIO·Δ (level_for's floor)
            h = h_max[j] if key[j] >= self.levels[j] else min(h_max[j], 2 * GRID_RATIO * delta[j])
            r = min(int(c), math.ceil(TRUNCATE * h / delta[j]))
            out.append(sfft.next_fast_len(int(c) + 1 + r, real=True))
        return tuple(out)

    def locate(self, Q: np.ndarray, key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cell index, fraction and mask of points whose 4-node stencils lie in the grid."""
        cells = self.cells(key)
        t = (Q - self.lo) / self.delta(key)
        i = np.floor(t)
        inside = np.all((i >= 1) & (i <= cells - 2), axis=1)
        i = np.clip(i, 1, cells - 2).astype(np.int64)
        f = np.clip(t - i, 0.0, 1.0)
        return i, f, inside

    def stencil(self, i, f, key):
        """(flat index, weight) of the 4^d nodes of each point's cubic stencil."""
        shape = self.cells(key) + 1
        d = i.shape[1]
        w1 = _cubic_weights(f)  # [m, d, 4]
        axis_parts = []
        for j in range(d):
            stride = int(np.prod(shape[j + 1 :]))
            base = (i[:, j] - 1) * stride
            axis_parts.append([(base + o * stride, w1[:, j, o]) for o in range(4)])
        for combo in itertools.product(*axis_parts):
            idx, w = combo[0]
            for idx_j, w_j in combo[1:]:
                idx = idx + idx_j
                w = w * w_j
            yield idx, w


def _bin(geom: _Geometry, X: np.ndarray, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Cubic (4th-order) binning of X onto the level-0 grid, one grid per weight vector.

    Each point spreads its weight over its 4^d stencil nodes with cubic Lagrange weights, so
    Σ_a w_a(x) φ(a) = φ(x) + O(Δ⁴) for smooth φ (weights may be negative).
    """
    key = (0,) * X.shape[1]
    shape = tuple(int(c) + 1 for c in geom.cells(key))
    size = int(np.prod(shape))
    i, f, inside = geom.locate(X, key)
    if not inside.all():  # pragma: no cover - the geometry pads the data range
        raise AssertionError("binned point outside the grid")
    idx_parts, w_parts = zip(*geom.stencil(i, f, key), strict=True)
    idx = np.concatenate(idx_parts)
    base = np.concatenate(w_parts)
    return [
        np.bincount(idx, weights=base * np.tile(w, len(w_parts)), minlength=size).reshape(shape)
        for w in weights
    ]


def _restrict(g: np.ndarray, axis: int) -> np.ndarray:
    """Restriction to the next coarser level along one axis (transpose of cubic prolongation)."""
    fine = g.shape[axis] - 1
    R = _restriction(fine // 2)
    moved = np.moveaxis(g, axis, 0)
    out = R @ moved.reshape(moved.shape[0], -1)
    return np.moveaxis(out.reshape((R.shape[0], *moved.shape[1:])), 0, axis)


def _kernel_spectrum(n_fft: int, delta: float, h: float, cells: int, last: bool) -> np.ndarray:
    import scipy.fft as sfft

    r = min(int(cells), math.ceil(TRUNCATE * h / delta))
    if n_fft < int(cells) + 1 + r:  # pragma: no cover - fft_shape guarantees this
        raise AssertionError("FFT length too short for the kernel")
    o = np.arange(r + 1)
    vals = np.exp(-0.5 * (o * delta / h) ** 2)
    g = np.zeros(n_fft)
    g[: r + 1] = vals
    if r > 0:
        g[n_fft - r :] = vals[1:][::-1]
    spec = sfft.rfft(g) if last else sfft.fft(g)
    return spec.real


class _Pyramid:
    """Binned (numerator, denominator) grids of groups of points, at every level.

    Each group is binned once at level 0; coarser levels come from restriction, and FFTs
    are cached per level, so many bandwidths × held-out groups cost one inverse FFT pair
    each. ``h_max`` sets the FFT padding (no wrap-around for any bandwidth up to it).
    """

    def __init__(
        self,
        geom: _Geometry,
        X: np.ndarray,
        y: np.ndarray,
        groups: list[np.ndarray],
        h_max: np.ndarray,
    ):
        self.geom = geom
        self.d = X.shape[1]
        self.h_max = np.asarray(h_max, np.float64)
        self._grids: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._ffts: dict[tuple, tuple] = {}
        zero = (0,) * self.d
        for g, idx in enumerate(groups):
            num, den = _bin(geom, X[idx], [y[idx], np.ones(idx.size)])
            self._grids[(g, zero)] = (num, den)
        self.n_groups = len(groups)

    def grid(self, g: int, key: tuple) -> tuple[np.ndarray, np.ndarray]:
        if (g, key) not in self._grids:
            axis = next(j for j in range(self.d) if key[j] > 0)
            finer = tuple(k - (j == axis) for j, k in enumerate(key))
            num, den = self.grid(g, finer)
            self._grids[(g, key)] = (_restrict(num, axis), _restrict(den, axis))
        return self._grids[(g, key)]

    def spectra(self, key: tuple) -> tuple:
        """FFTs (numerator, denominator) per group and their total, at a level."""
        if key not in self._ffts:
            import scipy.fft as sfft

            shape = self.geom.fft_shape(key, self.h_max)
            per = []
            for g in range(self.n_groups):
                num, den = self.grid(g, key)
                per.append(tuple(sfft.rfftn(a, s=shape, workers=1) for a in (num, den)))
            tot_num = per[0][0].copy()
            tot_den = per[0][1].copy()
            for fn, fd in per[1:]:
                tot_num += fn
                tot_den += fd
            self._ffts[key] = (shape, per, (tot_num, tot_den))
        return self._ffts[key]

    def smooth(self, key: tuple, h: np.ndarray, exclude: int | None) -> tuple:
        """Smoothed (numerator, denominator) grids of all groups but ``exclude``."""
        import scipy.fft as sfft

        geom = self.geom
        cells = geom.cells(key)
        delta = geom.delta(key)
        shape, per, (tot_num, tot_den) = self.spectra(key)
        if exclude is None:
            fn, fd = tot_num, tot_den
        else:
            fn, fd = tot_num - per[exclude][0], tot_den - per[exclude][1]
        kern = None
        for j in range(self.d):
            s = _kernel_spectrum(shape[j], delta[j], h[j], cells[j], last=(j == self.d - 1))
            s = s.reshape((-1,) + (1,) * (self.d - 1 - j))
            kern = s if kern is None else kern * s
        crop = tuple(slice(0, int(c) + 1) for c in cells)
        num = sfft.irfftn(fn * kern, s=shape, workers=1)[crop]
        den = sfft.irfftn(fd * kern, s=shape, workers=1)[crop]
        return num, den


def _interp(geom: _Geometry, key, grids, Q: np.ndarray):
    """Cubic interpolation of grids at Q, and the mask of points the grid covers."""
    i, f, inside = geom.locate(Q, key)
    flat = [np.ascontiguousarray(g).reshape(-1) for g in grids]
    out = [np.zeros(Q.shape[0]) for _ in grids]
    for idx, w in geom.stencil(i, f, key):
        for o, g in zip(out, flat, strict=True):
            o += g[idx] * w
    return out, inside


def _binned_finish(num, den, inside, model: _FallbackModel, Q, kappa, lo, hi) -> np.ndarray:
    """Ratio where the grid is trustworthy; guarded exact evaluation elsewhere."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.clip(num / den, lo, hi)
    good = inside & (den >= EXACT_BELOW)
    if hi - lo == 1.0:  # both classes present: near 0 or 1 relative error matters (NLL)
        good &= np.minimum(p - lo, hi - p) >= EXTREME_P
    redo = np.flatnonzero(~good)
    if redo.size:
        p[redo] = _local_predict(model, Q[redo], kappa)
    return p
