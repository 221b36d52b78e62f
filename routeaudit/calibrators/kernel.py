"""Nadaraya–Watson calibrators (docs/methods.md §2.6): AR-CondCal and its matched controls.

Why a module of its own: this is the estimator side — the calibrator contract
(:class:`NadarayaWatson`, :class:`ARCondCal`, :func:`oracle_bandwidth`) and the registered
reference factories (``ar_condcal``, ``nw_confidence``, ``nw_predictive_entropy``,
``nw_r_agg``). The kernel evaluation engine is :mod:`routeaudit.calibrators.kde` and the
bandwidth selection is :mod:`routeaudit.calibrators.bandwidth`.

The estimator, with a Gaussian product kernel K(u) = exp(−u²/2)::

    p̂(x) = Σ_j Π_k K((x_k − X_jk) / h_k) · y_j  /  Σ_j Π_k K((x_k − X_jk) / h_k)

Bandwidth per coordinate: ``h_k = κ · σ̂_k · n^(−1/(d+4))`` (SciPy's Scott factor, σ̂ with
ddof=1). κ is fixed (``bandwidth="scott"`` with ``scott_multiplier``, or a number, or
``"scott×2"``), chosen by 5-fold CV of the Bernoulli NLL (``"cv_nll"``), or chosen to
minimise global ECE15 on evaluation data (``"ece_oracle"``: pass ``fit(X, y,
oracle=(X_eval, y_eval))``, or use :func:`oracle_bandwidth`). One κ is shared by all
coordinates. The first column must be the confidence: where the kernel denominator is below
1e-12 the prediction falls back to the 1-D confidence-only NW value (bandwidth
κ · σ̂_c · n^(−1/5)), and where that is below 1e-12 too, to the mean of y.

``method="exact"`` is the dense float64 reference (torch, ``device`` may be a GPU);
``method="binned"`` (default, d ≤ 2) is cubic binning + FFT with exact re-evaluation where
the grid is not trustworthy (max |Δp| ≤ 5e-4 against exact on realistic data). For d ≥ 3
the exact method is used. Details and accuracy: :mod:`routeaudit.calibrators.kde`.
"""

from __future__ import annotations

import numpy as np

from routeaudit.calibrators.bandwidth import (
    _check_grid,
    _fallback_model,
    cv_nll_scores,
    oracle_scores,
    parse_bandwidth,
)
from routeaudit.calibrators.base import BaseCalibrator, calibrator
from routeaudit.calibrators.kde import _binned_finish, _exact_predict, _Geometry, _interp, _Pyramid


# =========================================================================== estimator
class NadarayaWatson(BaseCalibrator):
    """Nadaraya–Watson calibrator with a Gaussian product kernel (1-D, 2-D, or more).

    X columns: the confidence first, then the auxiliary feature(s). Parameters:

    bandwidth
        ``"scott"`` (κ = ``scott_multiplier``), a positive number or ``"scott×κ"`` (fixed
        κ), ``"cv_nll"`` (κ from ``grid`` by ``n_folds``-fold CV of the Bernoulli NLL on the
        fit data, folds drawn with ``random_state``) or ``"ece_oracle"`` (κ from ``grid``
        minimising global ECE15 on evaluation data given as ``fit(X, y, oracle=(X_eval,
        y_eval))``; it uses test labels on purpose, an upper bound favouring the probe).
    method
        ``"binned"`` (default, fast; d ≤ 2) or ``"exact"`` (dense reference, torch on
        ``device``).
    grid_size
        ``None``: grid spacing ≤ h/4 per axis (at most 2048 cells per axis in 2-D);
        an integer: that many grid nodes per axis at the finest level.

    Learned: ``kappa_``, ``bandwidth_`` (h per column; inf for a constant column, which
    the kernel then ignores), ``bandwidth_1d_`` (the fall-back's h), ``method_``,
    ``cv_scores_``/``oracle_scores_`` (per grid value, when selected), ``grid_shape_``.
    """

    def __init__(
        self,
        bandwidth="scott",
        scott_multiplier=1.0,
        grid=(0.25, 0.5, 1.0, 2.0, 4.0),
        method="binned",
        grid_size=None,
        n_folds=5,
        random_state=0,
        device="cpu",
    ):
        self.bandwidth = bandwidth
        self.scott_multiplier = scott_multiplier
        self.grid = grid
        self.method = method
        self.grid_size = grid_size
        self.n_folds = n_folds
        self.random_state = random_state
        self.device = device

    @property
    def requires_oracle(self) -> bool:
        """True when ``fit`` needs ``oracle=(X_eval, y_eval)`` (``bandwidth="ece_oracle"``)."""
        return isinstance(self.bandwidth, str) and self.bandwidth.strip().lower() == "ece_oracle"

    def sensitivity_grid(self) -> dict[str, list]:
        """The bandwidth settings the sensitivity audit tries (values for ``with_setting``)."""
        labels = [f"scott×{k:g}" for k in _check_grid(self.grid)]
        return {"bandwidth": [*labels, "cv_nll", "ece_oracle"]}

    def equivalent_params(self) -> dict:
        """The parameters with the bandwidth normalised: ``("fixed", κ)``, ``"cv_nll"`` or
        ``"ece_oracle"`` (``"scott"`` with κ = 1 and ``"scott×1"`` are the same estimator).
        Once fitted, a bandwidth chosen by CV or the oracle is the fixed κ it chose: the
        fitted state (hence every prediction) is the one ``bandwidth=κ`` fits.

        Two instances with equal ``equivalent_params()`` on the same data predict the same
        numbers, bit for bit; the calibrator study reuses such fits across the sensitivity
        grid (:func:`routeaudit.calibration.study.fit_key`).
        """
        params = self.get_params(deep=False)
        try:
            mode, kappa = parse_bandwidth(self.bandwidth, self.scott_multiplier)
        except ValueError:
            return params  # fit raises; nothing to share
        params.pop("scott_multiplier")
        if mode != "fixed" and hasattr(self, "kappa_"):
            mode, kappa = "fixed", self.kappa_
        params["bandwidth"] = ("fixed", float(kappa)) if mode == "fixed" else mode
        return params

    def fit(self, X, y, oracle=None) -> NadarayaWatson:
        """Fit on (X, y); ``oracle=(X_eval, y_eval)`` is required iff ``bandwidth="ece_oracle"``."""
        mode, kappa = parse_bandwidth(self.bandwidth, self.scott_multiplier)
        if self.method not in ("binned", "exact"):
            raise ValueError(f"method must be 'binned' or 'exact', not {self.method!r}")
        Xa, ya = self._validate_fit(X, y)
        n, d = Xa.shape
        if n < 2:
            raise ValueError("NadarayaWatson needs at least 2 fit points")
        sd = Xa.std(axis=0, ddof=1)
        active = np.isfinite(sd) & (sd > 0)
        method = "exact" if (self.method == "exact" or int(active.sum()) > 2) else "binned"
        cv_scores = oracle_scores_ = None
        Xk = Xa[:, active]
        has_conf = bool(active[0])
        common = dict(
            method=method,
            device=self.device,
            d_declared=d,
            has_conf=has_conf,
            grid_size=self.grid_size,
        )
        if mode == "ece_oracle" and oracle is None:
            raise ValueError(
                "bandwidth='ece_oracle' needs evaluation data: fit(X, y, oracle=(X_eval, y_eval))"
            )
        if mode != "fixed" and Xk.shape[1] > 0:
            grid = _check_grid(self.grid)
            if mode == "cv_nll":
                scores = cv_nll_scores(
                    Xk, ya, grid, n_folds=self.n_folds, random_state=self.random_state, **common
                )
                cv_scores = scores
            else:
                Xe = np.asarray(oracle[0], np.float64)
                Xe = Xe[:, None] if Xe.ndim == 1 else Xe
                if Xe.ndim != 2 or Xe.shape[1] != d:
                    raise ValueError(f"oracle X has shape {Xe.shape}, expected [m, {d}]")
                ye = np.asarray(oracle[1], np.float64).reshape(-1)
                scores = oracle_scores(Xk, ya, Xe[:, active], ye, grid, **common)
                oracle_scores_ = scores
            kappa = float(grid[int(np.argmin(scores))])
        elif mode != "fixed":
            kappa = 1.0
        kappa = float(kappa)
        model = _fallback_model(Xk, ya, d, has_conf, self.device)
        h = np.full(d, np.inf)
        h[active] = kappa * model.scale
        geometry = grids = grid_shape = None
        if method == "binned" and Xk.shape[1] > 0:
            hk = kappa * model.scale
            geometry = _Geometry.build(Xk.min(axis=0), Xk.max(axis=0), hk, hk, self.grid_size)
            key = (0,) * Xk.shape[1]
            grids = _Pyramid(geometry, Xk, ya, [np.arange(n)], hk).smooth(key, hk, exclude=None)
            grid_shape = tuple(int(c) + 1 for c in geometry.cells(key))
        self.active_ = active
        self.y_mean_ = float(ya.mean())
        self.method_ = method
        self.kappa_ = kappa
        self.bandwidth_ = h
        self.bandwidth_1d_ = None if model.scale1 is None else kappa * model.scale1
        self.cv_scores_ = cv_scores
        self.oracle_scores_ = oracle_scores_
        self.grid_shape_ = grid_shape
        self._model_ = model
        self._geometry_ = geometry
        self._grids_ = grids
        self.n_features_in_ = d
        return self

    def predict(self, X) -> np.ndarray:
        Xa = self._validate_predict(X)
        Q = Xa[:, self.active_]
        if Q.shape[1] == 0:
            return np.full(Q.shape[0], self.y_mean_)
        model = self._model_
        if self.method_ == "exact":
            p = _exact_predict(model, Q, [self.kappa_])[0]
        else:
            key = (0,) * Q.shape[1]
            (num, den), inside = _interp(self._geometry_, key, self._grids_, Q)
            p = _binned_finish(
                num, den, inside, model, Q, self.kappa_, float(model.y.min()), float(model.y.max())
            )
        return np.clip(p, 0.0, 1.0)


def oracle_bandwidth(
    X, y, X_eval, y_eval, *, grid=(0.25, 0.5, 1.0, 2.0, 4.0), method="binned", device="cpu"
) -> tuple[float, np.ndarray]:
    """The ECE-oracle multiplier: κ in ``grid`` minimising global ECE15 on the evaluation data.

    Returns ``(κ, ece_per_grid_value)``. Equivalent to ``NadarayaWatson(bandwidth=
    "ece_oracle", grid=grid).fit(X, y, oracle=(X_eval, y_eval)).kappa_``.
    """
    est = NadarayaWatson(bandwidth="ece_oracle", grid=grid, method=method, device=device)
    est.fit(X, y, oracle=(X_eval, y_eval))
    return est.kappa_, est.oracle_scores_


class ARCondCal(NadarayaWatson):
    """AR-CondCal (docs/methods.md §2.6): 2-D NW on X = (confidence, depth_variance).

    The same estimator and defaults as :class:`NadarayaWatson`; only the declared features
    differ. Its matched controls are NadarayaWatson on (confidence,), (confidence,
    predictive_entropy) and (confidence, r_agg) with the same parameters.
    """

    features = ("confidence", "depth_variance")


# --------------------------------------------------------------------------- registrations
@calibrator(["confidence", "depth_variance"], name="ar_condcal")
def ar_condcal() -> ARCondCal:
    """AR-CondCal with Scott bandwidth (κ = 1)."""
    return ARCondCal()


@calibrator(["confidence"], name="nw_confidence")
def nw_confidence() -> NadarayaWatson:
    """The 1-D confidence-only NW control."""
    return NadarayaWatson()


@calibrator(["confidence", "predictive_entropy"], name="nw_predictive_entropy")
def nw_predictive_entropy() -> NadarayaWatson:
    """The predictive-entropy control: 2-D NW on (confidence, predictive entropy)."""
    return NadarayaWatson()


@calibrator(["confidence", "r_agg"], name="nw_r_agg")
def nw_r_agg() -> NadarayaWatson:
    """The aggregate-routing-entropy control: 2-D NW on (confidence, r_agg)."""
    return NadarayaWatson()
