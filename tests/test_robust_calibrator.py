"""The routing-robust calibrator (routeaudit/calibrators/robust.py): contract, optimiser,
objective against slow references, and the property it exists for."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import routeaudit.metrics as metrics
from benchmarks.robust_calibrator import shifted_moe
from routeaudit.calibrators import (
    LogisticCalibrator,
    NotFittedError,
    TemperatureScaling,
    calibrator_checks,
    check_calibrator,
    clone,
    spec_of,
)
from routeaudit.calibrators.robust import (
    RoutingRobustCalibrator,
    penalised_platt,
    per_expert_platt,
    routing_robust,
)
from routeaudit.stats.shift import worst_case_ece

N_BINS = 15


def small_moe(n: int, seed: int, n_cells: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """X = [confidence, cell] and y where cell j is over-confident by j − 1 logits."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.3, 0.99, n)
    cell = rng.integers(0, n_cells, n)
    true = 1.0 / (1.0 + np.exp(-((np.log(c) - np.log1p(-c)) - (cell - 1.0))))
    y = (rng.random(n) < true).astype(np.float64)
    return np.column_stack([c, cell.astype(np.float64)]), y


# ----------------------------------------------------------------------------- slow references
def slow_sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def slow_predict(est: RoutingRobustCalibrator, X: np.ndarray) -> list[float]:
    """Row by row from the learned table (categorical cells; unseen → global)."""
    values = list(est.cell_values_)
    out = []
    for c, cell in X:
        a, b = est.cell_coef_[values.index(cell)] if cell in values else est.global_coef_
        cc = min(max(c, est.eps), 1 - est.eps)
        out.append(slow_sigmoid(a * math.log(cc / (1 - cc)) + b))
    return out


def slow_nll(p: list[float], y: np.ndarray) -> float:
    total = 0.0
    for pi, yi in zip(p, y, strict=True):
        q = min(max(pi, 1e-6), 1 - 1e-6)
        total -= math.log(q) if yi == 1 else math.log(1 - q)
    return total / len(p)


def slow_bin(c: float) -> int:
    """(lo, hi] equal-width bins, [0, 1/15] first: the first edge at or above c."""
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    return next(m for m in range(N_BINS) if c <= edges[m + 1])


def slow_worst_case_ece(p: list[float], y: np.ndarray, cells: list[int], ratio: float) -> float:
    """Every vertex of {0 ≤ w ≤ R, mean w = 1}: cells at 0 or R except one free cell."""
    labels = sorted(set(cells))
    n = {j: cells.count(j) for j in labels}
    best = 0.0
    for mask in range(1 << len(labels)):
        at_cap = [j for k, j in enumerate(labels) if mask >> k & 1]
        for free in labels:
            if free in at_cap:
                continue
            w = {j: (ratio if j in at_cap else 0.0) for j in labels}
            w[free] = (len(p) - sum(ratio * n[j] for j in at_cap)) / n[free]
            if not -1e-12 <= w[free] <= ratio + 1e-12:
                continue
            sums = [0.0] * N_BINS
            for pi, yi, j in zip(p, y, cells, strict=True):
                sums[slow_bin(pi)] += w[j] * (pi - yi)
            best = max(best, sum(abs(s) for s in sums) / len(p))
    return best


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name, check", list(calibrator_checks(routing_robust)))
def test_contract_of_the_registered_factory(name, check):
    check()  # the synthetic "top1_expert" column is continuous here: quantile cells


def test_contract_without_adversary_and_with_confidence_only():
    check_calibrator(per_expert_platt)
    check_calibrator(RoutingRobustCalibrator(), features=["confidence"])


def test_confidence_only_is_global_platt_in_one_round():
    X, y = small_moe(800, 9)
    est = RoutingRobustCalibrator().fit(X[:, :1], y)
    ref = LogisticCalibrator(input="logit").fit(X[:, :1], y)
    assert est.cell_mode_ == "single" and len(est.objective_path_) == 1
    assert np.allclose(est.cell_coef_[0], [ref.coef_, ref.intercept_], atol=1e-4)
    assert est.worst_case_ece_ == pytest.approx(metrics.ece(est.predict(X[:, :1]), y), abs=1e-12)


def test_registration():
    spec = spec_of(routing_robust)
    assert spec.name == "routing_robust" and spec.features == ("confidence", "top1_expert")
    assert spec_of(per_expert_platt).make().lam == 0.0


def test_clone_is_unfitted_with_equal_params():
    X, y = small_moe(400, 0)
    est = RoutingRobustCalibrator(lam=2.0, shrinkage=7.0, ratio=3.0).fit(X, y)
    twin = clone(est)
    assert twin is not est and twin.get_params() == est.get_params()
    with pytest.raises(NotFittedError):
        twin.predict(X)
    assert repr(twin) == "RoutingRobustCalibrator(lam=2.0, ratio=3.0, shrinkage=7.0)"


def test_fit_predict_shapes_and_bit_identical_refits():
    logits, labels, cells = shifted_moe(6000, 3)
    conf, y = metrics.confidence_and_correct(logits, labels)
    X = np.column_stack([conf, cells])
    a = RoutingRobustCalibrator().fit(X[:3000], y[:3000])
    b = RoutingRobustCalibrator().fit(X[:3000].copy(), y[:3000].copy())
    p = a.predict(X[3000:])
    assert p.shape == (3000,) and p.dtype == np.float64 and ((p > 0) & (p < 1)).all()
    assert np.array_equal(p, b.predict(X[3000:]))
    assert np.array_equal(a.objective_path_, b.objective_path_)
    assert a.cell_mode_ == "categorical" and a.cell_coef_.shape == (6, 2)
    assert a.n_parameters_ == 14 and len(a.objective_path_) == a.n_rounds + 1


# ----------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("lam", [0.0, 1.0, 4.0])
def test_fitted_objective_matches_a_slow_obvious_implementation(lam):
    X, y = small_moe(300, 1, n_cells=3)
    est = RoutingRobustCalibrator(lam=lam, ratio=3.0).fit(X, y)
    p = slow_predict(est, X)
    assert np.allclose(est.predict(X), p, rtol=0, atol=1e-12)
    cells = [int(v) for v in X[:, 1]]
    nll, wce = slow_nll(p, y), slow_worst_case_ece(p, y, cells, 3.0)
    assert est.nll_ == pytest.approx(nll, abs=1e-10)
    assert est.worst_case_ece_ == pytest.approx(wce, abs=1e-10)
    assert est.objective_ == pytest.approx(nll + lam * wce, abs=1e-10)
    assert est.objective_ == est.objective_path_.min()
    assert est.best_round_ == int(np.argmin(est.objective_path_))
    # the adversary's cell weights are a point of the class: 0 ≤ w ≤ R, P-mean 1
    n = np.bincount(np.array(cells))
    assert (est.cell_weights_ >= 0).all() and (est.cell_weights_ <= 3.0 + 1e-12).all()
    assert float(n @ est.cell_weights_) == pytest.approx(len(cells))


def test_robust_fit_is_never_worse_than_the_plain_fit_on_its_objective():
    X, y = small_moe(300, 2, n_cells=3)
    plain = RoutingRobustCalibrator(lam=0.0, ratio=3.0, shrinkage=100.0).fit(X, y)
    robust = RoutingRobustCalibrator(lam=1.0, ratio=3.0, shrinkage=100.0).fit(X, y)
    p = slow_predict(plain, X)
    plain_objective = slow_nll(p, y) + slow_worst_case_ece(p, y, [int(v) for v in X[:, 1]], 3.0)
    assert robust.objective_path_[0] == pytest.approx(plain_objective, abs=1e-10)  # round 0
    assert robust.objective_ <= plain_objective + 1e-12


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_the_adversary_lowers_the_fitted_objective_under_strong_shrinkage(seed):
    """Small experts miscalibrated their own way, shrunk hard toward the global map: the
    reweighted refits must find a lower NLL + worst-case ECE than the plain fit (round 0),
    and the kept round is the best one even when the path is not monotone."""
    logits, labels, cells = shifted_moe(3000, seed)
    conf, y = metrics.confidence_and_correct(logits, labels)
    est = RoutingRobustCalibrator(shrinkage=100.0).fit(np.column_stack([conf, cells]), y)
    assert est.objective_ < est.objective_path_[0] - 1e-3
    assert est.objective_ == est.objective_path_.min()
    assert est.objective_path_[est.best_round_] == est.objective_


# ----------------------------------------------------------------------------- the optimiser
def explicit_objective(theta, x, y, v, prior, kappa):
    z = theta[0] * x + theta[1]
    return float(np.sum(v * (np.logaddexp(0.0, z) - y * z))
                 + 0.5 * kappa * np.sum((theta - prior) ** 2))


def test_penalised_platt_matches_scipy_per_cell():
    from scipy.optimize import minimize

    rng = np.random.default_rng(5)
    n = 900
    x = rng.normal(0.5, 2.0, n)
    codes = rng.choice(4, size=n, p=[0.6, 0.3, 0.098, 0.002])
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.7 * x - 0.3 * codes)))).astype(np.float64)
    y[codes == 2] = 1.0  # a cell with one class only: finite thanks to the prior
    v = rng.uniform(0.2, 3.0, n)
    prior = rng.normal(0.0, 1.0, size=(4, 2))
    kappa = 3.0
    got = penalised_platt(x, y, v, codes, 4, prior, kappa, np.zeros((4, 2)))
    for j in range(4):
        m = codes == j
        ref = minimize(explicit_objective, prior[j], args=(x[m], y[m], v[m], prior[j], kappa),
                       method="BFGS", options={"gtol": 1e-10})
        assert np.allclose(got[j], ref.x, atol=1e-5), (j, got[j], ref.x)
        assert explicit_objective(got[j], x[m], y[m], v[m], prior[j], kappa) <= ref.fun + 1e-9


def test_weak_shrinkage_gives_per_cell_platt_and_strong_shrinkage_the_global_map():
    X, y = small_moe(3000, 3, n_cells=3)
    weak = RoutingRobustCalibrator(lam=0.0, shrinkage=1e-8).fit(X, y)
    for j in range(3):
        m = X[:, 1] == j
        ref = LogisticCalibrator(input="logit").fit(X[m, :1], y[m])
        assert np.allclose(weak.cell_coef_[j], [ref.coef_, ref.intercept_], atol=1e-5)
    pooled = LogisticCalibrator(input="logit").fit(X[:, :1], y)
    assert np.allclose(weak.global_coef_, [pooled.coef_, pooled.intercept_], atol=1e-4)
    strong = RoutingRobustCalibrator(lam=0.0, shrinkage=1e9).fit(X, y)
    assert np.allclose(strong.cell_coef_, strong.global_coef_[None, :], atol=1e-5)


def test_upweighting_a_cell_weakens_its_shrinkage():
    """The mechanism by which the adversary acts: a cell with more mass keeps more of its
    own fit (the cells are otherwise separable)."""
    X, y = small_moe(600, 4, n_cells=3)
    cc = np.clip(X[:, 0], 1e-6, 1 - 1e-6)
    x = np.log(cc) - np.log1p(-cc)
    codes = X[:, 1].astype(np.int64)
    prior = np.tile([1.0, 0.0], (3, 1))
    base = penalised_platt(x, y, np.ones_like(y), codes, 3, prior, 50.0, prior)
    v = np.where(codes == 2, 3.0, 1.0)
    up = penalised_platt(x, y, v, codes, 3, prior, 50.0, prior)
    assert np.linalg.norm(up[2] - prior[2]) > np.linalg.norm(base[2] - prior[2]) + 1e-3
    assert np.allclose(up[:2], base[:2], atol=1e-9)


# ----------------------------------------------------------------------------- cells
def test_unseen_cell_uses_the_global_map_and_cells_are_labels():
    X, y = small_moe(500, 6, n_cells=3)
    est = RoutingRobustCalibrator().fit(X, y)
    Xn = np.array([[0.8, 7.0], [0.8, 1.0]])
    p = est.predict(Xn)
    a, b = est.global_coef_
    assert p[0] == pytest.approx(slow_sigmoid(a * math.log(0.8 / 0.2) + b), abs=1e-12)
    a1, b1 = est.cell_coef_[1]
    assert p[1] == pytest.approx(slow_sigmoid(a1 * math.log(0.8 / 0.2) + b1), abs=1e-12)


@settings(max_examples=15, deadline=None)
@given(st.permutations([0.0, 1.0, 2.0]), st.sampled_from([-3.5, 10.0, 1e6]))
def test_relabelling_cells_changes_nothing(perm, offset):
    X, y = small_moe(400, 7, n_cells=3)
    relabelled = X.copy()
    relabelled[:, 1] = np.asarray(perm)[X[:, 1].astype(np.int64)] * 2.0 + offset
    a = RoutingRobustCalibrator().fit(X, y)
    b = RoutingRobustCalibrator().fit(relabelled, y)
    assert np.allclose(a.predict(X), b.predict(relabelled), rtol=0, atol=1e-10)
    assert b.objective_ == pytest.approx(a.objective_, abs=1e-10)


def test_many_distinct_values_become_equal_mass_cells_with_lo_hi_rule():
    rng = np.random.default_rng(8)
    n = 2000
    X = np.column_stack([rng.uniform(0.2, 1.0, n), rng.normal(size=n)])
    y = (rng.random(n) < X[:, 0]).astype(np.float64)
    est = RoutingRobustCalibrator(max_cells=8).fit(X, y)
    assert est.cell_mode_ == "quantile" and len(est.cell_edges_) == 7
    assert est.cell_coef_.shape == (8, 2) and est.cell_weights_.shape == (8,)
    edge = est.cell_edges_[3]
    rows = np.array([[0.7, edge], [0.7, np.nextafter(edge, np.inf)]])
    assert np.array_equal(est.cell_params(rows), est.cell_coef_[[3, 4]])


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 60), st.integers(1, 5), st.integers(0, 2**31 - 1),
       st.sampled_from([0.0, 1.0]))
def test_degenerate_data_gives_finite_probabilities(n, n_cells, seed, lam):
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.choice([0.0, 0.5, 1.0, rng.uniform()], n),
                         rng.integers(0, n_cells, n).astype(np.float64)])
    y = rng.choice([0.0, 1.0], n, p=[0.1, 0.9]) if seed % 2 else np.ones(n)
    p = RoutingRobustCalibrator(lam=lam).fit(X, y).predict(X)
    assert p.shape == (n,) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()


@pytest.mark.parametrize(("params", "X", "match"), [
    ({}, np.full((5, 3), 0.5), "confidence, cell"),
    ({}, np.array([[1.5, 0.0]] * 5), "in \\[0, 1\\]"),
    ({"shrinkage": 0.0}, np.full((5, 2), 0.5), "shrinkage"),
    ({"lam": -1.0}, np.full((5, 2), 0.5), "lam"),
    ({"ratio": 0.5}, np.full((5, 2), 0.5), "ratio"),
])
def test_bad_input_is_refused_with_a_clear_message(params, X, match):
    with pytest.raises(ValueError, match=match):
        RoutingRobustCalibrator(**params).fit(X, np.ones(len(X)))


# ----------------------------------------------------------------------------- the claim
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_robust_beats_temperature_scaling_in_the_worst_case_on_held_out_data(seed):
    """Experts miscalibrated in opposite directions: one temperature cannot fix them all."""
    logits, labels, cells = shifted_moe(16000, seed)
    conf, y = metrics.confidence_and_correct(logits, labels)
    X = np.column_stack([conf, cells])
    fit, ev = slice(0, 8000), slice(8000, None)
    p_temp = TemperatureScaling().fit(logits[fit], y[fit]).predict(logits[ev])
    p_rob = RoutingRobustCalibrator().fit(X[fit], y[fit]).predict(X[ev])
    worst_temp = worst_case_ece(p_temp, y[ev], cells[ev], ratio=5.0).value
    worst_rob = worst_case_ece(p_rob, y[ev], cells[ev], ratio=5.0).value
    assert worst_rob < 0.5 * worst_temp, (worst_rob, worst_temp)
    assert metrics.ece(p_rob, y[ev]) <= metrics.ece(p_temp, y[ev]) + 0.005
