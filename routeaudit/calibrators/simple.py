"""Confidence-only reference calibrators: raw, temperature, logistic, histogram, isotonic.

Every one is top-label: it predicts P(the model's top-label prediction is correct). All but
:class:`TemperatureScaling` read the confidence from the first column of X and ignore the
rest; :class:`TemperatureScaling` reads the K logit columns.

scipy (``optimize``, ``special``) is imported inside the methods that use it, so importing
this module (and the calibrator registry) stays cheap.
"""

from __future__ import annotations

import numpy as np

import routeaudit.metrics as metrics
from routeaudit.calibrators.base import BaseCalibrator, calibrator


class RawCalibrator(BaseCalibrator):
    """No calibration: predicts the first column (the model's confidence), clipped to [0, 1]."""

    def fit(self, X, y) -> RawCalibrator:
        Xa, _ = self._validate_fit(X, y)
        self.n_parameters_ = 0
        self.n_features_in_ = Xa.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        Xa = self._validate_predict(X)
        return np.clip(Xa[:, 0], 0.0, 1.0)


# --------------------------------------------------------------------------- temperature
def _top_label_terms(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits shifted so the top logit is 0, and the same with the top entry set to -inf."""
    top = np.argmax(logits, axis=1)  # ties: lowest index, as argmax does
    rows = np.arange(logits.shape[0])
    shifted = logits - logits[rows, top][:, None]
    others = shifted.copy()
    others[rows, top] = -np.inf
    return shifted, others


def top_label_nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean binary NLL of correctness under c(T) = max softmax(z / T), in float64.

    log c = −logsumexp(d / T) and log(1 − c) = logsumexp_{k ≠ top}(d / T) − logsumexp(d / T),
    with d = z − z_top ≤ 0, so nothing overflows and 1 − c is never rounded to 0.
    """
    shifted, others = _top_label_terms(np.asarray(logits, dtype=np.float64))
    return _top_label_nll(shifted, others, np.asarray(y, dtype=np.float64), temperature)


def _top_label_nll(shifted, others, y, temperature) -> float:
    from scipy.special import logsumexp

    inv = 1.0 / temperature
    lse_all = logsumexp(shifted * inv, axis=1)
    log_c = -lse_all
    log_1mc = logsumexp(others * inv, axis=1) - lse_all
    return float(-np.mean(y * log_c + (1.0 - y) * log_1mc))


class TemperatureScaling(BaseCalibrator):
    """Temperature scaling, **top-label variant**; X = the K logit columns.

    Fits one T > 0 minimising the binary NLL of *correctness* under the top-label probability
    ``c(T) = max_k softmax(z / T)_k``. Classic temperature scaling (Guo et al. 2017) minimises
    the multiclass NLL of the *labels*; the calibrator contract only sees correctness, so
    this is the top-label analogue. T does not change the argmax, so the top label is fixed.

    The objective is not convex in T, so the optimiser is a coarse scan of ``n_scan`` points
    evenly spaced in log T over ``bounds``, then bounded Brent refinement (scipy
    ``minimize_scalar``) on the bracket around the best scan point, all in float64.
    ``predict`` returns ``max softmax(z / T)``.
    """

    def __init__(self, bounds=(0.01, 100.0), n_scan=41, xatol=1e-7):
        self.bounds = bounds
        self.n_scan = n_scan
        self.xatol = xatol

    def fit(self, X, y) -> TemperatureScaling:
        from scipy.optimize import minimize_scalar

        Xa, ya = self._validate_fit(X, y)
        if Xa.shape[1] < 2:
            raise ValueError("TemperatureScaling needs X = logits with K >= 2 columns")
        lo, hi = (float(b) for b in self.bounds)
        if not 0 < lo < hi:
            raise ValueError(f"bounds must satisfy 0 < lo < hi, got {self.bounds!r}")
        shifted, others = _top_label_terms(Xa)

        def objective(log_t: float) -> float:
            return _top_label_nll(shifted, others, ya, float(np.exp(log_t)))

        grid = np.linspace(np.log(lo), np.log(hi), int(self.n_scan))
        values = np.array([objective(g) for g in grid])
        best = int(np.argmin(values))
        a = grid[max(best - 1, 0)]
        b = grid[min(best + 1, len(grid) - 1)]
        res = minimize_scalar(
            objective, bounds=(a, b), method="bounded", options={"xatol": float(self.xatol)}
        )
        log_t = float(res.x) if res.fun <= values[best] else float(grid[best])
        self.temperature_ = float(np.exp(log_t))
        self.nll_ = float(min(res.fun, values[best]))
        self.n_parameters_ = 1
        self.n_features_in_ = Xa.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        Xa = self._validate_predict(X)
        # the top entry of the max-shifted softmax is exp(0) / Σ = 1 / Σ
        return np.clip(metrics.softmax(Xa / self.temperature_).max(axis=1), 0.0, 1.0)


# --------------------------------------------------------------------------- logistic
class LogisticCalibrator(BaseCalibrator):
    """``σ(a·x + b)`` on the first column, fitted by unpenalised binary cross-entropy.

    ``input="confidence"`` uses x = c; ``input="logit"`` uses x = log(c / (1 − c)) with c
    clipped to [eps, 1 − eps]. Fitted by Newton's method with step halving in float64 (the
    same optimum as scikit-learn's ``LogisticRegression(penalty=None)``). If y is constant
    the slope is 0 and σ(b) is the clipped mean of y.
    """

    def __init__(self, input="confidence", eps=1e-6, max_iter=100, tol=1e-10):
        self.input = input
        self.eps = eps
        self.max_iter = max_iter
        self.tol = tol

    def _transform(self, c: np.ndarray) -> np.ndarray:
        if self.input == "confidence":
            return c
        if self.input == "logit":
            cc = np.clip(c, self.eps, 1.0 - self.eps)
            return np.log(cc) - np.log1p(-cc)
        raise ValueError(f"input must be 'confidence' or 'logit', not {self.input!r}")

    def fit(self, X, y) -> LogisticCalibrator:
        from scipy.special import expit

        Xa, ya = self._validate_fit(X, y)
        x = self._transform(Xa[:, 0])
        ybar = float(ya.mean())
        if ybar in (0.0, 1.0):
            m = min(max(ybar, self.eps), 1.0 - self.eps)
            self.coef_, self.intercept_ = 0.0, float(np.log(m) - np.log1p(-m))
            self.n_iter_ = 0
            self.n_parameters_ = 2
            self.n_features_in_ = Xa.shape[1]
            return self
        A = np.column_stack([x, np.ones_like(x)])
        w = np.array([0.0, np.log(ybar) - np.log1p(-ybar)])

        def loss(wv: np.ndarray) -> float:
            z = A @ wv
            return float(np.mean(np.logaddexp(0.0, z) - ya * z))

        current = loss(w)
        n_iter = 0
        for n_iter in range(1, int(self.max_iter) + 1):  # noqa: B007
            p = expit(A @ w)
            grad = A.T @ (p - ya) / len(ya)
            hess = (A * (p * (1 - p))[:, None]).T @ A / len(ya)
            if np.max(np.abs(grad)) < self.tol:
                break
            step = np.linalg.lstsq(hess + 1e-12 * np.eye(2), grad, rcond=None)[0]
            t = 1.0
            while t > 1e-10:
                cand = w - t * step
                new = loss(cand)
                if new <= current:
                    break
                t *= 0.5
            else:
                break
            w, current = cand, new
        self.coef_, self.intercept_ = float(w[0]), float(w[1])
        self.n_iter_ = n_iter
        self.n_parameters_ = 2
        self.n_features_in_ = Xa.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        from scipy.special import expit

        Xa = self._validate_predict(X)
        return expit(self.coef_ * self._transform(Xa[:, 0]) + self.intercept_)


# --------------------------------------------------------------------------- histogram
class HistogramBinning(BaseCalibrator):
    """Per-bin empirical accuracy on the first column (Zadrozny & Elkan 2001).

    ``strategy="equal_mass"``: edges at the quantiles of the fitted confidences (outer bins
    open-ended); ``"equal_width"``: ``linspace(0, 1, n_bins + 1)``. Bins are (lo, hi] as in
    ECE15: a value on an edge goes to the lower bin. An empty bin predicts its centre
    (the outer equal-mass bins use the data minimum/maximum as their outer edge).
    """

    def __init__(self, n_bins=15, strategy="equal_mass"):
        self.n_bins = n_bins
        self.strategy = strategy

    def fit(self, X, y) -> HistogramBinning:
        Xa, ya = self._validate_fit(X, y)
        c = Xa[:, 0]
        B = int(self.n_bins)
        if B < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins!r}")
        if self.strategy == "equal_mass":
            edges = np.quantile(c, np.linspace(0.0, 1.0, B + 1))
        elif self.strategy == "equal_width":
            edges = np.linspace(0.0, 1.0, B + 1)
        else:
            raise ValueError(
                f"strategy must be 'equal_mass' or 'equal_width', not {self.strategy!r}"
            )
        self.bin_edges_ = edges
        idx = np.searchsorted(edges[1:-1], c, side="left")
        counts = np.bincount(idx, minlength=B).astype(np.float64)
        sums = np.bincount(idx, weights=ya, minlength=B)
        centres = 0.5 * (edges[:-1] + edges[1:])
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(counts > 0, sums / np.maximum(counts, 1.0), centres)
        self.bin_values_ = np.clip(values, 0.0, 1.0)
        self.bin_counts_ = counts.astype(np.int64)
        self.n_parameters_ = B
        self.n_features_in_ = Xa.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        Xa = self._validate_predict(X)
        idx = np.searchsorted(self.bin_edges_[1:-1], Xa[:, 0], side="left")
        return self.bin_values_[idx].astype(np.float64)


# --------------------------------------------------------------------------- isotonic
def pava(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of ``y`` (pool adjacent violators), O(n).

    A stack of blocks (mean, weight, length); each new point is merged with the block below
    while that block's mean is not smaller.
    """
    y = np.asarray(y, dtype=np.float64)
    n = y.shape[0]
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    means = np.empty(n)
    weights = np.empty(n)
    lengths = np.empty(n, dtype=np.int64)
    top = -1
    for i in range(n):
        m, wt, ln = y[i], w[i], 1
        while top >= 0 and means[top] >= m:
            tot = weights[top] + wt
            m = (means[top] * weights[top] + m * wt) / tot
            wt = tot
            ln += lengths[top]
            top -= 1
        top += 1
        means[top], weights[top], lengths[top] = m, wt, ln
    return np.repeat(means[: top + 1], lengths[: top + 1])


class IsotonicCalibrator(BaseCalibrator):
    """Non-decreasing piecewise-linear map of the first column, fitted by isotonic regression.

    Tied confidences are first pooled (weighted mean of y); the pooled points are fitted by
    weighted pool-adjacent-violators (scipy's ``isotonic_regression`` when available, else
    :func:`pava`); ``predict`` interpolates linearly between the fitted points and clips to
    the end values outside the fitted range (scikit-learn ``out_of_bounds="clip"``).
    """

    def __init__(self, solver="auto"):
        self.solver = solver

    def fit(self, X, y) -> IsotonicCalibrator:
        Xa, ya = self._validate_fit(X, y)
        c = Xa[:, 0]
        xs, inverse, counts = np.unique(c, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse.reshape(-1), weights=ya, minlength=len(xs))
        wts = counts.astype(np.float64)
        ym = sums / wts
        fitted = None
        if self.solver in ("auto", "scipy"):
            try:
                from scipy.optimize import isotonic_regression
            except ImportError:  # scipy < 1.12
                if self.solver == "scipy":
                    raise
            else:
                fitted = isotonic_regression(ym, weights=wts, increasing=True).x
        elif self.solver != "pava":
            raise ValueError(f"solver must be 'auto', 'scipy' or 'pava', not {self.solver!r}")
        if fitted is None:
            fitted = pava(ym, wts)
        self.X_thresholds_ = xs
        self.y_thresholds_ = np.clip(np.asarray(fitted, dtype=np.float64), 0.0, 1.0)
        self.n_parameters_ = len(np.unique(self.y_thresholds_))
        self.n_features_in_ = Xa.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        Xa = self._validate_predict(X)
        c = np.clip(Xa[:, 0], self.X_thresholds_[0], self.X_thresholds_[-1])
        if len(self.X_thresholds_) == 1:
            return np.full(c.shape, self.y_thresholds_[0])
        return np.interp(c, self.X_thresholds_, self.y_thresholds_)


# --------------------------------------------------------------------------- registrations
@calibrator(["confidence"], name="raw")
def raw() -> RawCalibrator:
    """No calibration (the "Raw" row)."""
    return RawCalibrator()


@calibrator(["logits"], name="temperature")
def temperature() -> TemperatureScaling:
    """Top-label temperature scaling on the logits."""
    return TemperatureScaling()


@calibrator(["confidence"], name="logistic")
def logistic() -> LogisticCalibrator:
    """The linear confidence baseline σ(a·c + b) of docs/methods.md §2.7."""
    return LogisticCalibrator()


@calibrator(["confidence"], name="histogram")
def histogram() -> HistogramBinning:
    """15 equal-mass bins."""
    return HistogramBinning()


@calibrator(["confidence"], name="isotonic")
def isotonic() -> IsotonicCalibrator:
    """Isotonic regression on confidence."""
    return IsotonicCalibrator()
