"""Worst-case ECE over routing-only reweightings (routeaudit.stats.shift), checked against
independent references: scipy's LP solver per sign pattern, a brute-force vertex walk written
here with itertools, SLSQP over the KL ball, random feasible weights, closed forms, and
hypothesis invariants."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routeaudit.metrics import bin_indices, ece
from routeaudit.stats.shift import (
    worst_case_ece,
    worst_case_ece_resampled,
    worst_case_ece_sums,
)


def _case(seed: int, n: int = 300, cells: int = 4, gap: float = 0.08):
    rng = np.random.default_rng(seed)
    c = 0.1 + 0.9 * rng.beta(4.0, 1.5, n)
    k = rng.integers(0, cells, n)
    p = np.clip(c + np.where(k % 2 == 0, gap, -gap), 0.0, 1.0)
    y = (rng.random(n) < p).astype(float)
    return c, y, k


def _ece_w(c, y, k, w_cells, n_bins=15, closed="right", v=None):
    """ECE under per-cell weights, written out directly (a loop over bins)."""
    v = np.ones(c.size) if v is None else v
    w = np.asarray(w_cells)[k] * v
    b = bin_indices(c, n_bins, closed)
    total = 0.0
    for m in range(n_bins):
        sel = b == m
        total += abs(float(np.sum(w[sel] * (c[sel] - y[sel]))))
    return total / float(w.sum())


def _tables(c, y, k, n_bins):
    """G [J, B] and n [J] by explicit loops (independent of the module's sums)."""
    b = bin_indices(c, n_bins, "right")
    n_cells = int(k.max()) + 1
    g = np.zeros((n_cells, n_bins))
    n = np.zeros(n_cells)
    for i in range(c.size):
        g[k[i], b[i]] += c[i] - y[i]
        n[k[i]] += 1
    return g, n


def _brute_vertices(g, n, ratio):
    """Max of Σ_b |Σ_j w_j G_jb| / N over the vertices of {0 ≤ w ≤ R, Σ n_j w_j = N}."""
    cells = np.flatnonzero(n > 0)
    total = n.sum()
    best, best_w = -1.0, None
    for f in cells:
        others = [j for j in cells if j != f]
        for r in range(len(others) + 1):
            for capped in itertools.combinations(others, r):
                w = np.zeros(n.size)
                w[list(capped)] = ratio
                w_f = (total - ratio * n[list(capped)].sum()) / n[f]
                if -1e-12 <= w_f <= ratio + 1e-12:
                    w[f] = min(max(w_f, 0.0), ratio)
                    value = np.abs(w @ g).sum() / total
                    if value > best:
                        best, best_w = value, w
    return best, best_w


# --------------------------------------------------------------------------- base and exactness


@pytest.mark.parametrize("closed", ["right", "left"])
@pytest.mark.parametrize("strategy", ["equal_width", "equal_mass"])
def test_base_is_metrics_ece(closed, strategy):
    c, y, k = _case(0, n=500)
    c[:5] = [0.0, 1.0, 1 / 3, 2 / 15, 0.5]  # edges and ends
    r = worst_case_ece(c, y, k, closed=closed, strategy=strategy)
    assert r.base == pytest.approx(ece(c, y, 15, closed=closed, strategy=strategy), abs=1e-13)
    assert r.value >= r.base


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [1.3, 2.0, 5.0])
def test_vertex_walk_equals_sign_patterns_equals_brute_force(seed, ratio):
    c, y, k = _case(seed, n=200, cells=2 + seed % 4)
    g, n = _tables(c, y, k, 15)
    brute, _ = _brute_vertices(g, n, ratio)
    v1 = worst_case_ece(c, y, k, ratio=ratio, method="vertices").value
    v2 = worst_case_ece(c, y, k, ratio=ratio, method="signs").value
    assert v1 == pytest.approx(brute, abs=1e-12)
    assert v2 == pytest.approx(brute, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_matches_linprog_over_every_sign_pattern(seed):
    from scipy.optimize import linprog

    c, y, k = _case(100 + seed, n=120, cells=3)
    n_bins = 5
    g, n = _tables(c, y, k, n_bins)
    active = np.flatnonzero(np.abs(g).sum(axis=0) > 0)
    ratio = 2.5
    best = 0.0
    for signs in itertools.product([-1.0, 1.0], repeat=active.size):
        h = g[:, active] @ np.array(signs)  # objective per cell
        res = linprog(-h, A_eq=n[None, :], b_eq=[n.sum()], bounds=[(0, ratio)] * n.size,
                      method="highs")
        assert res.status == 0
        best = max(best, -res.fun / n.sum())
    got = worst_case_ece(c, y, k, ratio=ratio, n_bins=n_bins)
    assert got.value == pytest.approx(best, abs=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_weights_attain_the_value_and_are_feasible(seed):
    c, y, k = _case(seed, n=400, cells=5)
    v = np.random.default_rng(seed).integers(0, 3, c.size).astype(float)  # sample weights
    ratio = 3.0
    r = worst_case_ece(c, y, k, ratio=ratio, sample_weight=v)
    assert r.value == pytest.approx(_ece_w(c, y, k, r.cell_weights, v=v), abs=1e-12)
    assert np.all(r.cell_weights >= 0) and np.all(r.cell_weights <= ratio + 1e-12)
    assert np.sum(v * r.weights) / v.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.array_equal(r.weights, r.cell_weights[k])


@pytest.mark.parametrize("seed", range(3))
def test_random_feasible_weights_never_exceed_the_value(seed):
    c, y, k = _case(seed, n=300, cells=4)
    g, n = _tables(c, y, k, 15)
    ratio = 4.0
    value = worst_case_ece(c, y, k, ratio=ratio).value
    rng = np.random.default_rng(seed)
    # feasible points: convex combinations of random vertices (brute-force enumerated)
    verts = []
    for f in range(n.size):
        for capped in itertools.product([0, 1], repeat=n.size):
            if capped[f]:
                continue
            w = ratio * np.array(capped, dtype=float)
            w[f] = (n.sum() - w @ n) / n[f]
            if 0 <= w[f] <= ratio:
                verts.append(w)
    verts = np.array(verts)
    mix = rng.dirichlet(np.ones(len(verts)) * 0.3, size=2000) @ verts
    values = np.abs(mix @ g).sum(axis=1) / n.sum()
    assert values.max() <= value + 1e-12
    assert np.allclose(mix @ n, n.sum())


def test_two_opposite_cells_closed_form():
    # cell 0: residual +0.1 everywhere, cell 1: −0.1, equal sizes, one confidence bin
    c = np.full(200, 0.8)
    y = np.r_[np.full(100, 0.7), np.full(100, 0.9)]  # fractional outcomes are allowed
    k = np.r_[np.zeros(100, int), np.ones(100, int)]
    for ratio in (1.0, 1.25, 1.5, 2.0, 3.0):
        r = worst_case_ece(c, y, k, ratio=ratio)
        assert r.base == pytest.approx(0.0, abs=1e-12)
        assert r.value == pytest.approx(0.1 * min(ratio - 1.0, 1.0), abs=1e-12)
    from scipy.optimize import brentq

    for rho in (0.01, 0.1, 0.3):
        # q0 with KL((q0, 1 − q0) ‖ (½, ½)) = ρ; the worst ECE is 0.1·(2 q0 − 1)
        q0 = brentq(lambda q, rho=rho: q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q))
                    - rho, 0.5, 1 - 1e-12)
        r = worst_case_ece(c, y, k, kl=rho)
        assert r.value == pytest.approx(0.1 * (2 * q0 - 1), abs=1e-9)
    # beyond log 2 the adversary may drop cell 1 entirely
    assert worst_case_ece(c, y, k, kl=1.0).value == pytest.approx(0.1, abs=1e-12)


# --------------------------------------------------------------------------- KL ball


def _slsqp_pattern_max(h, p, rho):
    """max Σ_j q_j h_j over KL(q‖p) ≤ ρ by SLSQP (a concave problem: the global optimum)."""
    from scipy.optimize import minimize

    cons = [{"type": "eq", "fun": lambda q: q.sum() - 1.0},
            {"type": "ineq",
             "fun": lambda q: rho - np.sum(np.where(q > 1e-300, q * np.log(np.maximum(q, 1e-300)
                                                                            / p), 0.0))}]
    res = minimize(lambda q: -q @ h, p.copy(), method="SLSQP", constraints=cons,
                   bounds=[(0.0, 1.0)] * p.size, options={"ftol": 1e-13, "maxiter": 500})
    return -res.fun


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rho", [0.02, 0.2])
def test_kl_matches_slsqp_over_every_sign_pattern(seed, rho):
    c, y, k = _case(200 + seed, n=150, cells=3)
    n_bins = 5
    g, n = _tables(c, y, k, n_bins)
    p = n / n.sum()
    active = np.flatnonzero(np.abs(g).sum(axis=0) > 0)
    best = 0.0
    for signs in itertools.product([-1.0, 1.0], repeat=active.size):
        h = (g[:, active] @ np.array(signs)) / n  # per-cell mean signed residual
        best = max(best, _slsqp_pattern_max(h, p, rho))
    got = worst_case_ece(c, y, k, kl=rho, n_bins=n_bins)
    assert got.value == pytest.approx(best, abs=2e-6)
    w = got.cell_weights
    kl = float(np.sum(np.where(w > 0, p * w * np.log(np.where(w > 0, w, 1.0)), 0.0)))
    assert kl <= rho + 1e-9
    assert float(p @ w) == pytest.approx(1.0, abs=1e-12)
    assert got.value == pytest.approx(_ece_w(c, y, k, w, n_bins=n_bins), abs=1e-12)


def test_kl_random_points_of_the_ball_never_exceed_the_value():
    c, y, k = _case(7, n=300, cells=4)
    g, n = _tables(c, y, k, 15)
    p = n / n.sum()
    rho = 0.15
    value = worst_case_ece(c, y, k, kl=rho).value
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(4), size=20000)
    kl = np.sum(q * np.log(q / p), axis=1)
    inside = q[kl <= rho]
    assert inside.shape[0] > 100
    w = inside / p
    assert (np.abs(w @ g).sum(axis=1) / n.sum()).max() <= value + 1e-12


# --------------------------------------------------------------------------- resampled


def test_resampled_rows_equal_one_call_per_row():
    c, y, k = _case(3, n=400)
    counts = np.random.default_rng(1).integers(0, 4, size=(25, c.size)).astype(float)
    counts[3] = 0.0  # a row with no mass gives NaN
    for kw in ({"ratio": 5.0}, {"ratio": 1.5, "method": "signs"}, {"kl": 0.1}):
        got = worst_case_ece_resampled(c, y, k, counts, **kw)
        for i in (0, 1, 7, 24):
            assert got[i] == pytest.approx(
                worst_case_ece(c, y, k, sample_weight=counts[i], **kw).value, abs=1e-12)
        assert np.isnan(got[3])


def test_sums_interface_agrees():
    c, y, k = _case(4, n=300)
    g, n = _tables(c, y, k, 15)
    values, w = worst_case_ece_sums(g[None], n[None], ratio=3.0)
    r = worst_case_ece(c, y, k, ratio=3.0)
    assert values[0] == pytest.approx(r.value, abs=1e-12)
    assert _ece_w(c, y, k, w[0]) == pytest.approx(r.value, abs=1e-12)


# --------------------------------------------------------------------------- invariants


@st.composite
def problems(draw):
    n = draw(st.integers(3, 40))
    c = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)))
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=float)
    k = np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    return c, y, k


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(1.0, 8.0), st.floats(0.0, 3.0))
def test_invariants(problem, ratio, extra):
    c, y, k = problem
    r = worst_case_ece(c, y, k, ratio=ratio)
    assert r.value >= r.base - 1e-15
    assert r.base == pytest.approx(ece(c, y), abs=1e-12)
    # ratio 1 is the base; the value grows with the ratio
    assert worst_case_ece(c, y, k, ratio=1.0).value == pytest.approx(r.base, abs=1e-12)
    assert worst_case_ece(c, y, k, ratio=ratio + extra).value >= r.value - 1e-12
    # feasible weights that attain the value
    assert np.all(r.cell_weights >= 0) and np.all(r.cell_weights <= ratio * (1 + 1e-12))
    assert float(r.weights.mean()) == pytest.approx(1.0, abs=1e-12)
    assert _ece_w(c, y, k, r.cell_weights) == pytest.approx(r.value, abs=1e-12)
    # relabelling the cells permutes the weights and changes nothing else
    perm = np.array([2, 0, 3, 1])
    r2 = worst_case_ece(c, y, perm[k], ratio=ratio)
    assert r2.value == pytest.approx(r.value, abs=1e-12)
    assert _ece_w(c, y, perm[k], r2.cell_weights) == pytest.approx(r.value, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(problems(), st.floats(0.0, 2.0), st.floats(0.0, 2.0))
def test_kl_invariants(problem, rho, extra):
    c, y, k = problem
    r = worst_case_ece(c, y, k, kl=rho)
    assert r.value >= r.base - 1e-15
    assert worst_case_ece(c, y, k, kl=0.0).value == pytest.approx(r.base, abs=1e-12)
    assert worst_case_ece(c, y, k, kl=rho + extra).value >= r.value - 1e-9
    w = r.weights
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-9)
    assert float(np.mean(np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0))) <= rho + 1e-9
    assert _ece_w(c, y, k, r.cell_weights) == pytest.approx(r.value, abs=1e-12)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ratio": 0.5}, "ratio"), ({"ratio": float("inf")}, "ratio"), ({"kl": -0.1}, "kl"),
    ({"n_bins": 0}, "n_bins"), ({"closed": "both"}, "closed"),
    ({"sample_weight": -np.ones(10)}, "sample_weight"),
])
def test_bad_options(kwargs, match):
    c, y, k = _case(0, n=10)
    with pytest.raises(ValueError, match=match):
        worst_case_ece(c, y, k, **kwargs)


def test_bad_arrays():
    c, y, k = _case(0, n=10)
    with pytest.raises(ValueError, match="same length"):
        worst_case_ece(c, y[:5], k)
    with pytest.raises(ValueError, match="cells"):
        worst_case_ece(c, y, k[:5])
    with pytest.raises(ValueError, match="non-negative"):
        worst_case_ece(c, y, -k - 1)
    with pytest.raises(ValueError, match="integer"):
        worst_case_ece(c, y, k + 0.5)
    with pytest.raises(ValueError, match=r"correct\[0\]"):
        worst_case_ece(c, np.r_[2.0, y[1:]], k)
    with pytest.raises(ValueError, match="counts"):
        worst_case_ece_resampled(c, y, k, np.ones((3, 4)))
    with pytest.raises(ValueError, match="too many"):
        rng = np.random.default_rng(0)
        worst_case_ece(rng.random(3000), rng.integers(0, 2, 3000), rng.integers(0, 40, 3000),
                       n_bins=40)
