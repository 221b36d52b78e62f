"""Bandwidth selection for the Nadaraya–Watson calibrators (docs/methods.md §2.6).

Why a module of its own: how κ is chosen (a rule, cross-validation, or an oracle that looks
at evaluation labels) is a separate question from how the kernel is evaluated
(:mod:`routeaudit.calibrators.kde`) and from the estimator's contract
(:mod:`routeaudit.calibrators.kernel`); the bandwidth-sensitivity audit varies exactly this
part, so it is kept in one place.

Bandwidth per coordinate: ``h_k = κ · σ̂_k · n^(−1/(d+4))`` (SciPy's Scott factor, σ̂ with
ddof=1; :func:`scott_factor`, :func:`scott_scale`). κ is fixed (``bandwidth="scott"`` with
``scott_multiplier``, or a number, or ``"scott×2"``; :func:`parse_bandwidth`), chosen by
5-fold CV of the Bernoulli NLL (``"cv_nll"``, :func:`cv_nll_scores`), or chosen to minimise
global ECE15 on evaluation data (``"ece_oracle"``, :func:`oracle_scores`). One κ is shared
by all coordinates. Both scores are the package's own metrics
(:func:`routeaudit.metrics.binary_nll`, :func:`routeaudit.metrics.ece`), so the κ chosen is
chosen on the number that is reported.

For bandwidth selection every CV fold is binned once, at the spacing of the smallest
bandwidth; a larger bandwidth h is convolved on the coarsest level of a grid pyramid
(spacing doubling per level) whose spacing is still ≤ h/4, obtained by restriction (the
transpose of cubic midpoint interpolation, itself 4th-order accurate). Each training set is
"all folds − one fold" in Fourier space, so 10 bandwidths × 5 folds cost 5 binnings, a few
forward FFTs per level and one inverse FFT pair per (fold, bandwidth).
"""

from __future__ import annotations

import math
import re

import numpy as np

import routeaudit.metrics as metrics
from routeaudit.calibrators.kde import (
    _binned_finish,
    _exact_predict,
    _FallbackModel,
    _Geometry,
    _interp,
    _Pyramid,
)


# =========================================================================== bandwidths
def scott_factor(n: int, d: int) -> float:
    """SciPy's Scott factor ``n ** (-1 / (d + 4))`` (``gaussian_kde(...).factor``)."""
    return float(n) ** (-1.0 / (d + 4))


def scott_scale(X: np.ndarray, d: int | None = None) -> np.ndarray:
    """Per-coordinate Scott bandwidth at κ = 1: ``σ̂_k · n^(−1/(d+4))`` (σ̂ with ddof=1)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    n = X.shape[0]
    d = X.shape[1] if d is None else d
    sd = X.std(axis=0, ddof=1) if n > 1 else np.zeros(X.shape[1])
    return sd * scott_factor(n, d)


_SCOTT_TIMES = re.compile(r"^scott\s*[×x*]\s*([0-9.eE+-]+)$")


def parse_bandwidth(bandwidth, scott_multiplier=1.0) -> tuple[str, float | None]:
    """``("fixed", κ)``, ``("cv_nll", None)`` or ``("ece_oracle", None)``."""
    if isinstance(bandwidth, str):
        text = bandwidth.strip().lower()
        if text == "scott":
            kappa = scott_multiplier
        elif text in ("cv_nll", "ece_oracle"):
            return text, None
        else:
            m = _SCOTT_TIMES.match(text)
            if m is None:
                raise ValueError(
                    "bandwidth must be 'scott', 'scott×κ', a positive number (the Scott "
                    f"multiplier κ), 'cv_nll' or 'ece_oracle'; got {bandwidth!r}"
                )
            kappa = float(m.group(1))
    elif isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.number)):
        raise ValueError(f"bandwidth must be a string or a number, got {bandwidth!r}")
    else:
        kappa = bandwidth
    kappa = float(kappa)
    if not (math.isfinite(kappa) and kappa > 0):
        raise ValueError(f"the Scott multiplier must be a positive finite number, got {kappa!r}")
    return "fixed", kappa


def _check_grid(grid) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64).reshape(-1)
    if g.size == 0 or not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise ValueError(f"grid must be a non-empty list of positive multipliers, got {grid!r}")
    return g


# =========================================================================== selection
def _folds(n: int, n_folds: int, random_state) -> list[np.ndarray]:
    if n_folds < 2 or n < n_folds:
        raise ValueError(f"need 2 <= n_folds <= n for CV, got n_folds={n_folds}, n={n}")
    perm = np.random.default_rng(random_state).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, n_folds)]


def _fallback_model(X, y, d_decl, has_conf, device) -> _FallbackModel:
    scale = scott_scale(X, d_decl)
    scale1 = None
    if has_conf and X.shape[1] > 1:
        scale1 = float(scott_scale(X[:, :1], 1)[0])
        if not scale1 > 0:
            scale1 = None
    return _FallbackModel(X, y, scale, scale1, device)


def _safe_scale(scale: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, scale, ref)


def cv_nll_scores(
    X,
    y,
    grid,
    *,
    n_folds=5,
    random_state=0,
    method="binned",
    device="cpu",
    d_declared=None,
    has_conf=True,
    grid_size=None,
) -> np.ndarray:
    """Mean held-out Bernoulli NLL for each multiplier in ``grid`` (K-fold CV on X, y).

    The NLL is :func:`routeaudit.metrics.binary_nll` (predictions clipped to
    [1e-6, 1 − 1e-6]) of the out-of-fold predictions of all n points.

    X holds the kernel's columns (first = confidence when ``has_conf``); κ's bandwidth in
    each fold is κ times the Scott scale of that fold's training part, i.e. each held-out
    fold is predicted by ``NadarayaWatson(bandwidth=κ)`` fitted on the other folds.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    grid = _check_grid(grid)
    d_decl = X.shape[1] if d_declared is None else d_declared
    folds = _folds(X.shape[0], int(n_folds), random_state)
    full = scott_scale(X, d_decl)
    models = []
    for f in range(len(folds)):
        tr = np.setdiff1d(np.arange(X.shape[0]), folds[f], assume_unique=True)
        mdl = _fallback_model(X[tr], y[tr], d_decl, has_conf, device)
        mdl.scale = _safe_scale(mdl.scale, full)
        models.append(mdl)
    preds = np.empty((grid.size, X.shape[0]))
    if method == "exact" or X.shape[1] > 2:
        for f, idx in enumerate(folds):
            preds[:, idx] = _exact_predict(models[f], X[idx], grid)
    else:
        hs = np.array([[k * m.scale for m in models] for k in grid])  # [K, F, d]
        h_min = hs.reshape(-1, X.shape[1]).min(axis=0)
        h_max = hs.reshape(-1, X.shape[1]).max(axis=0)
        geom = _Geometry.build(X.min(axis=0), X.max(axis=0), h_min, h_max, grid_size)
        pyr = _Pyramid(geom, X, y, folds, h_max)
        for f, idx in enumerate(folds):
            ytr = models[f].y
            lo, hi = float(ytr.min()), float(ytr.max())
            for k, kappa in enumerate(grid):
                h = hs[k, f]
                key = geom.level_for(h)
                grids = pyr.smooth(key, h, exclude=f)
                (num, den), inside = _interp(geom, key, grids, X[idx])
                preds[k, idx] = _binned_finish(num, den, inside, models[f], X[idx], kappa, lo, hi)
    return np.array([metrics.binary_nll(preds[k], y) for k in range(grid.size)])


def oracle_scores(
    X,
    y,
    X_eval,
    y_eval,
    grid,
    *,
    method="binned",
    device="cpu",
    d_declared=None,
    has_conf=True,
    grid_size=None,
) -> np.ndarray:
    """Global ECE15 on (X_eval, y_eval) of the NW fitted on (X, y), for each κ in ``grid``.

    ECE15 is :func:`routeaudit.metrics.ece` with 15 bins, the reported ECE: equal-width
    (lo, hi] bins, a prediction of exactly 0 in bin 0, divided by the full m.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    Q = np.asarray(X_eval, np.float64)
    grid = _check_grid(grid)
    d_decl = X.shape[1] if d_declared is None else d_declared
    model = _fallback_model(X, y, d_decl, has_conf, device)
    if method == "exact" or X.shape[1] > 2:
        preds = _exact_predict(model, Q, grid)
    else:
        hs = np.array([k * model.scale for k in grid])
        geom = _Geometry.build(X.min(axis=0), X.max(axis=0), hs.min(0), hs.max(0), grid_size)
        pyr = _Pyramid(geom, X, y, [np.arange(X.shape[0])], hs.max(0))
        preds = np.empty((grid.size, Q.shape[0]))
        for k, kappa in enumerate(grid):
            key = geom.level_for(hs[k])
            grids = pyr.smooth(key, hs[k], exclude=None)
            (num, den), inside = _interp(geom, key, grids, Q)
            preds[k] = _binned_finish(num, den, inside, model, Q, kappa, y.min(), y.max())
    return np.array([metrics.ece(preds[k], y_eval, 15) for k in range(grid.size)])
