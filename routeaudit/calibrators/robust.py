"""A routing-robust recalibration: paper 4's adversarial reweighting as a post-hoc calibrator.

Why a calibrator of its own: docs/methods.md §4 reads paper 4's method as
``min_θ NLL_P(θ) + λ · max_{w ∈ W} CE_w(θ)``, a calibration error of the routed aggregate
under the worst routing shift. This module fits exactly that objective for a small model,
with ``W`` the routing-only class the ``expert_calibration`` audit checks: weights constant
on each routing cell, ``0 ≤ w ≤ ratio``, mean 1 under the data. So the audit and this
calibrator speak about the same shifts, and ``--calibrator routing_robust`` asks "does a
recalibration that plans for routing shift beat one that does not?".

The model (X = [confidence] or [confidence, cell], cell = ``top1_expert`` by default)::

    p = σ(a_j · logit(c) + b_j),    j = the routing cell of the example

Platt scaling on logit(confidence) per cell. Why Platt and not a temperature (b = 0): the
top-label confidence of a K-class model can be below 1/2, where a binary temperature acts
oddly, and an expert can be shifted up or down at every confidence; a cell needs a slope
and an offset. Why per cell: under hard routing, calibration of each expert on its own
region is what makes the aggregate calibrated under every routing-only shift (§4.2), so
the cells are the right granularity for this weight class.

Fitting (deterministic, no randomness at all):

* **Shrinkage.** θ_j = (a_j, b_j) minimises ``Σ_{i∈j} v_i ℓ_i(θ_j) + (κ/2)‖θ_j − θ_0‖²``
  where θ_0 is the v-weighted global Platt fit and κ = ``shrinkage`` is a prior worth κ
  examples: a cell with a few examples (or one class only) falls back to the global map,
  a large cell keeps its own. A cell value not seen in ``fit`` gets θ_0.
* **Adversary.** Binned worst-case ECE is piecewise constant in θ (examples jump between
  bins), so it has no useful gradient. Instead the fit alternates: (a) the adversary's
  exact worst cell weights w* for the current predictions
  (:func:`routeaudit.stats.shift.worst_case_ece`); (b) a refit under the example weights
  ``v = (1 − η) + η · w̄``, ``η = λ / (1 + λ)``, where w̄ is the running mean of the
  adversary's answers so far (fictitious play: a pure best response can flip between two
  cells every round; the mean damps that). Weighted NLL is the smooth proper-scoring
  surrogate of the calibration error under w̄: it asks for calibration where the adversary
  puts mass. Because weights are constant on cells, the reweighting acts through the
  shrinkage: a cell the adversary inflates gets a stronger own fit and pulls θ_0 toward
  it, which is what a shift that enlarges that cell needs.
* **Selection.** Round 0 is the plain penalised fit (λ = 0 is exactly "per-cell Platt
  without the adversary"); after ``n_rounds`` refits the round with the lowest
  ``NLL_P + λ · worst-case ECE`` on the fit data is kept, so the fitted objective is never
  worse than the non-adversarial fit's.

What to expect (``benchmarks/results/robust_calibrator.txt``): the adversary is worth most
where shrinkage bites, i.e. small or rarely routed experts, whose mass a routing shift can
multiply by ``ratio``; with a few large, balanced cells (the MoE fixtures) the robust and
the plain per-cell fits coincide, as the hard-routing result of §4 predicts.

Too many distinct cell values (a capacity twin puts a continuous confidence-derived column
where ``top1_expert`` was): more than ``max_cells`` distinct values are cut into
``max_cells`` equal-mass cells, ``(lo, hi]`` like every bin in the package.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import routeaudit.metrics as metrics
from routeaudit.calibrators.base import BaseCalibrator, calibrator
from routeaudit.stats.shift import worst_case_ece

#: Prior (in examples) pulling the global map toward the identity σ(logit c) = c: it keeps
#: the global fit finite when the data are separable or one class only, and is otherwise
#: negligible.
GLOBAL_PRIOR = 1e-3
_IDENTITY = np.array([1.0, 0.0])


class RoutingRobustCalibrator(BaseCalibrator):
    """Per-routing-cell Platt scaling, shrunk to a global map, robust to routing shift.

    X: column 0 the top-label confidence in [0, 1]; optional column 1 a routing cell label
    (``top1_expert``). Parameters:

    lam
        λ ≥ 0, the weight of the worst-case ECE in the objective; 0 fits without the
        adversary (per-cell Platt with shrinkage).
    ratio
        the largest routing-cell weight the adversary may put (≥ 1; the audit's default 5).
    shrinkage
        κ > 0, the strength (in examples) of the pull of every cell toward the global map.
        The default 20 is negligible for a cell of thousands of examples and decisive for
        one of a few dozen.
    n_rounds
        adversary rounds after the plain fit (a fixed number: determinism and a known cost).
    n_bins
        equal-width (lo, hi] bins of the worst-case ECE.
    max_cells
        the most distinct cell values treated as categories; beyond, equal-mass cells.
    eps
        confidence clip before the logit.
    max_iter, tol
        Newton iterations per fit; a cell stops when its Newton decrement g·H⁻¹g (twice the
        predicted decrease of its loss) is below tol × (1 + its loss).

    Learned: ``global_coef_`` [2] and ``cell_coef_`` [J, 2] (slope, intercept),
    ``cell_values_`` (categories) or ``cell_edges_`` (quantile cut points), ``cell_mode_``,
    ``cell_weights_`` (the adversary's worst cell weights at the kept round), ``objective_``,
    ``nll_``, ``worst_case_ece_``, ``objective_path_`` (one value per round), ``best_round_``,
    ``n_parameters_``, ``n_features_in_``.
    """

    def __init__(self, lam=1.0, ratio=5.0, shrinkage=20.0, n_rounds=5, n_bins=15, max_cells=64,
                 eps=1e-6, max_iter=50, tol=1e-14):
        self.lam = lam
        self.ratio = ratio
        self.shrinkage = shrinkage
        self.n_rounds = n_rounds
        self.n_bins = n_bins
        self.max_cells = max_cells
        self.eps = eps
        self.max_iter = max_iter
        self.tol = tol

    # ------------------------------------------------------------------------------ fit
    def fit(self, X, y) -> RoutingRobustCalibrator:
        Xa, ya = self._validate_fit(X, y)
        self._check_params()
        conf = _confidence_column(Xa)
        x = self._logit(conf)
        self._reset()
        codes, n_cells = self._fit_cells(Xa)
        lam = float(self.lam)
        eta = lam / (1.0 + lam)
        v = np.ones_like(ya)
        theta0, theta = _IDENTITY.copy(), np.tile(_IDENTITY, (n_cells, 1))
        w_sum = np.zeros_like(ya)
        path: list[float] = []
        best: tuple[float, int, np.ndarray, np.ndarray, Any, float] | None = None
        # one cell: every weight of the class is 1, so a reweighted refit changes nothing
        rounds = int(self.n_rounds) + 1 if lam > 0 and n_cells > 1 else 1
        for r in range(rounds):
            theta0, theta = self._fit_params(x, ya, codes, n_cells, v, theta0, theta)
            p = _sigmoid(theta[codes, 0] * x + theta[codes, 1])
            shift = self._adversary(p, ya, codes)
            nll = metrics.binary_nll(p, ya)
            objective = nll + lam * shift.value
            path.append(objective)
            if best is None or objective < best[0]:
                best = (objective, r, theta0.copy(), theta.copy(), shift, nll)
            w_sum += shift.weights
            v = (1.0 - eta) + eta * w_sum / (r + 1)
        assert best is not None
        objective, r_best, theta0, theta, shift, nll = best
        self.global_coef_ = theta0
        self.cell_coef_ = theta
        self.cell_weights_ = np.ones(n_cells)
        self.cell_weights_[: len(shift.cell_weights)] = shift.cell_weights
        self.objective_ = float(objective)
        self.nll_ = float(nll)
        self.worst_case_ece_ = float(shift.value)
        self.objective_path_ = np.asarray(path)
        self.best_round_ = r_best
        self.n_parameters_ = 2 * (n_cells + 1)
        self.n_features_in_ = Xa.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        Xa = self._validate_predict(X)
        x = self._logit(_confidence_column(Xa))
        coef = self.cell_params(Xa)
        return _sigmoid(coef[:, 0] * x + coef[:, 1])

    def cell_params(self, X) -> np.ndarray:
        """(slope, intercept) [n, 2] that ``predict`` uses for each row of X."""
        Xa = self._validate_predict(X)
        if Xa.shape[1] == 1:
            return np.tile(self.cell_coef_[0], (Xa.shape[0], 1))
        col = Xa[:, 1]
        if self.cell_mode_ == "quantile":
            return self.cell_coef_[np.searchsorted(self.cell_edges_, col, side="left")]
        idx = np.minimum(np.searchsorted(self.cell_values_, col), len(self.cell_values_) - 1)
        seen = self.cell_values_[idx] == col
        return np.where(seen[:, None], self.cell_coef_[idx], self.global_coef_[None, :])

    # ------------------------------------------------------------------------------ pieces
    def _check_params(self) -> None:
        lam, ratio, kappa = float(self.lam), float(self.ratio), float(self.shrinkage)
        if not (np.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if not (np.isfinite(ratio) and ratio >= 1):
            raise ValueError(f"ratio must be a finite number >= 1, got {self.ratio!r}")
        if not (np.isfinite(kappa) and kappa > 0):
            raise ValueError(f"shrinkage must be a finite number > 0 (a cell with one class only "
                             f"has no finite own fit), got {self.shrinkage!r}")
        if int(self.n_rounds) < 0 or int(self.max_cells) < 1 or int(self.max_iter) < 1:
            raise ValueError("n_rounds must be >= 0, max_cells and max_iter >= 1; got "
                             f"{self.n_rounds!r}, {self.max_cells!r}, {self.max_iter!r}")
        if not 0 < float(self.eps) < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {self.eps!r}")

    def _reset(self) -> None:
        """Forget a previous fit's cell map (refit must not depend on it)."""
        for name in ("cell_values_", "cell_edges_"):
            self.__dict__.pop(name, None)

    def _logit(self, c: np.ndarray) -> np.ndarray:
        cc = np.clip(c, float(self.eps), 1.0 - float(self.eps))
        return np.log(cc) - np.log1p(-cc)

    def _fit_cells(self, Xa: np.ndarray) -> tuple[np.ndarray, int]:
        """Cell codes 0..J-1 of the fit rows; stores the map ``predict`` applies."""
        if Xa.shape[1] == 1:
            self.cell_mode_ = "single"
            return np.zeros(Xa.shape[0], dtype=np.int64), 1
        col = Xa[:, 1]
        values, codes = np.unique(col, return_inverse=True)
        if len(values) <= int(self.max_cells):
            self.cell_mode_ = "categorical"
            self.cell_values_ = values
            return codes.reshape(-1).astype(np.int64), len(values)
        self.cell_mode_ = "quantile"
        qs = np.quantile(col, np.linspace(0.0, 1.0, int(self.max_cells) + 1)[1:-1])
        self.cell_edges_ = np.unique(qs)
        return np.searchsorted(self.cell_edges_, col, side="left"), len(self.cell_edges_) + 1

    def _fit_params(self, x, y, codes, n_cells, v, theta0, theta):
        """The v-weighted global map, then every cell shrunk toward it (warm-started)."""
        zeros = np.zeros_like(codes)
        g = penalised_platt(x, y, v, zeros, 1, _IDENTITY[None, :], GLOBAL_PRIOR, theta0[None, :],
                            max_iter=int(self.max_iter), tol=float(self.tol))[0]
        cells = penalised_platt(x, y, v, codes, n_cells, np.tile(g, (n_cells, 1)),
                                float(self.shrinkage), theta, max_iter=int(self.max_iter),
                                tol=float(self.tol))
        return g, cells

    def _adversary(self, p: np.ndarray, y: np.ndarray, codes: np.ndarray):
        """The exact worst routing shift for predictions p (an empty cell gets weight 1)."""
        return worst_case_ece(p, y, codes, ratio=float(self.ratio), n_bins=int(self.n_bins))


def penalised_platt(x: np.ndarray, y: np.ndarray, v: np.ndarray, codes: np.ndarray, n_cells: int,
                    prior: np.ndarray, kappa: float, init: np.ndarray, *, max_iter: int = 50,
                    tol: float = 1e-14) -> np.ndarray:
    """Per-cell weighted Platt fits with a Gaussian prior, all cells at once: [J, 2].

    Cell j minimises ``Σ_{i∈j} v_i ℓ(a_j x_i + b_j, y_i) + (κ/2)‖θ_j − prior_j‖²`` with
    ℓ(z, y) = log(1 + e^z) − y z. The problems are independent (one 2×2 Newton system per
    cell, solved in closed form); each cell halves its own step until its objective does
    not increase (beyond the rounding of its sum) and stops once its Newton decrement is
    negligible. κ > 0 makes each problem strictly convex: the minimiser is unique and finite.
    """
    theta = np.array(init, dtype=np.float64, copy=True)

    def losses(th: np.ndarray) -> np.ndarray:
        z = th[codes, 0] * x + th[codes, 1]
        data = np.bincount(codes, weights=v * (np.logaddexp(0.0, z) - y * z), minlength=n_cells)
        return data + 0.5 * kappa * ((th - prior) ** 2).sum(axis=1)

    current = losses(theta)
    active = np.ones(n_cells, dtype=bool)
    for _ in range(max_iter):
        z = theta[codes, 0] * x + theta[codes, 1]
        p = _sigmoid(z)
        r = v * (p - y)
        h = v * p * (1.0 - p)
        d = theta - prior
        ga = np.bincount(codes, weights=r * x, minlength=n_cells) + kappa * d[:, 0]
        gb = np.bincount(codes, weights=r, minlength=n_cells) + kappa * d[:, 1]
        haa = np.bincount(codes, weights=h * x * x, minlength=n_cells) + kappa
        hab = np.bincount(codes, weights=h * x, minlength=n_cells)
        hbb = np.bincount(codes, weights=h, minlength=n_cells) + kappa
        det = haa * hbb - hab * hab
        step = np.column_stack([(hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det])
        # Newton decrement g·H⁻¹g: half of it is the predicted decrease of the cell's loss
        active &= (ga * step[:, 0] + gb * step[:, 1]) > tol * (1.0 + np.abs(current))
        if not active.any():
            break
        t = active.astype(np.float64)
        slack = 1e-13 * np.abs(current)  # rounding of a sum of many terms
        for _ in range(30):
            cand = theta - t[:, None] * step
            new = losses(cand)
            ok = new <= current + slack
            if ok.all():
                break
            t = np.where(ok, t, 0.5 * t)
        else:  # no decrease found: the cell is at its optimum to rounding
            active &= ok
            t = np.where(ok, t, 0.0)
            cand = theta - t[:, None] * step
            new = losses(cand)
        theta, current = cand, new
    return theta


def _confidence_column(Xa: np.ndarray) -> np.ndarray:
    if Xa.shape[1] > 2:
        raise ValueError(f"RoutingRobustCalibrator takes X = [confidence] or [confidence, cell], "
                         f"got {Xa.shape[1]} columns")
    c = Xa[:, 0]
    if c.min() < 0.0 or c.max() > 1.0:
        raise ValueError("column 0 of X must be the top-label confidence in [0, 1], got values "
                         f"in [{c.min():.4g}, {c.max():.4g}]")
    return c


def _sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(z)


# --------------------------------------------------------------------------- registration
@calibrator(["confidence", "top1_expert"], name="routing_robust")
def routing_robust() -> RoutingRobustCalibrator:
    """Per-expert Platt scaling fitted against the worst routing shift (ratio 5, λ = 1)."""
    return RoutingRobustCalibrator()


@calibrator(["confidence", "top1_expert"], name="per_expert_platt")
def per_expert_platt() -> RoutingRobustCalibrator:
    """The same model without the adversary (λ = 0): the robust calibrator's control."""
    return RoutingRobustCalibrator(lam=0.0)
