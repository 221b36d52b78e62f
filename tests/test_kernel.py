"""Nadaraya–Watson (AR-CondCal): exact vs independent references, binned vs exact, selection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from routeaudit import metrics
from routeaudit.calibrators import ARCondCal, NadarayaWatson, kde, kernel_sums, oracle_bandwidth
from routeaudit.calibrators import bandwidth as B


def realistic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Skewed confidence (most mass near 1) and a bounded, skewed depth-variance feature."""
    rng = np.random.default_rng(seed)
    c = rng.beta(5.0, 1.5, n) * 0.9 + 0.1
    v = 0.05 + 0.1 * rng.random(n) ** 2 + 0.05 * (1 - c) * rng.random(n)
    p = np.clip(c - 0.3 * (v - 0.1), 0.0, 1.0)
    y = (rng.random(n) < p).astype(np.float64)
    return np.column_stack([c, v]), y


def naive_nw(Xf, yf, Q, h):
    """The obvious double loop."""
    out = np.empty(len(Q))
    for i, q in enumerate(Q):
        num = den = 0.0
        for x, yy in zip(Xf, yf, strict=True):
            w = 1.0
            for k in range(len(h)):
                w *= np.exp(-0.5 * ((q[k] - x[k]) / h[k]) ** 2)
            num += w * yy
            den += w
        out[i] = num / den
    return out


def dense_nw(Xf, yf, Q, h, h1=None):
    """A plain numpy dense NW with the documented guard (test-side reference).

    Where the denominator is < 1e-12: the 1-D NW on the first column with bandwidth h1,
    and where that is < 1e-12 too, the mean of y.
    """
    D = (((Q[:, None, :] - Xf[None, :, :]) / h) ** 2).sum(-1)
    W = np.exp(-0.5 * D)
    den = W.sum(1)
    out = np.full(len(Q), yf.mean())
    ok = den >= 1e-12
    out[ok] = (W[ok] @ yf) / den[ok]
    if h1 is not None and (~ok).any():
        W1 = np.exp(-0.5 * ((Q[~ok, None, 0] - Xf[None, :, 0]) / h1) ** 2)
        d1 = W1.sum(1)
        out[np.flatnonzero(~ok)[d1 >= 1e-12]] = (W1 @ yf)[d1 >= 1e-12] / d1[d1 >= 1e-12]
    return out


# --------------------------------------------------------------------------- bandwidths
@pytest.mark.parametrize("d", [1, 2, 3])
def test_scott_matches_scipy_gaussian_kde(d):
    rng = np.random.default_rng(d)
    X = rng.normal(size=(300, d)) * np.arange(1, d + 1)
    gkde = stats.gaussian_kde(X.T)
    assert B.scott_factor(300, d) == pytest.approx(gkde.factor, rel=1e-14)
    # gaussian_kde's kernel covariance is the data covariance × factor²: its diagonal's root
    # is the per-coordinate Scott bandwidth.
    np.testing.assert_allclose(B.scott_scale(X), np.sqrt(np.diag(gkde.covariance)), rtol=1e-12)


def test_fitted_bandwidth_is_kappa_times_scott():
    X, y = realistic(1000)
    est = NadarayaWatson(bandwidth=2.0).fit(X, y)
    expect = 2.0 * X.std(axis=0, ddof=1) * 1000 ** (-1 / 6)
    np.testing.assert_allclose(est.bandwidth_, expect, rtol=1e-13)
    assert est.bandwidth_1d_ == pytest.approx(2.0 * X[:, 0].std(ddof=1) * 1000 ** (-1 / 5))
    for spelled in ("scott×2", "scott*2", "scott x 2"):
        assert NadarayaWatson(bandwidth=spelled).fit(X, y).kappa_ == 2.0
    assert NadarayaWatson(scott_multiplier=0.5).fit(X, y).kappa_ == 0.5


@pytest.mark.parametrize("bad", ["silverman", -1.0, 0.0, float("nan"), True, "scott×-2"])
def test_bad_bandwidth_is_rejected(bad):
    X, y = realistic(100)
    with pytest.raises(ValueError):
        NadarayaWatson(bandwidth=bad).fit(X, y)


# --------------------------------------------------------------------------- exact
@pytest.mark.parametrize("d", [1, 2])
def test_exact_matches_double_loop(d):
    rng = np.random.default_rng(10 + d)
    X = rng.random((60, d))
    y = (rng.random(60) < 0.6).astype(float)
    Q = rng.random((25, d)) * 1.2 - 0.1
    est = NadarayaWatson(bandwidth=0.7, method="exact").fit(X, y)
    np.testing.assert_allclose(
        est.predict(Q), naive_nw(X, y, Q, est.bandwidth_), rtol=0, atol=1e-12
    )
    num, den = kernel_sums(X, y, Q, est.bandwidth_)
    np.testing.assert_allclose(num / den, naive_nw(X, y, Q, est.bandwidth_), rtol=0, atol=1e-12)


def test_exact_sums_numpy_on_cpu_and_torch_agree(monkeypatch):
    """The exact sums run on numpy on CPU and on torch elsewhere: the same steps, chunked
    alike, so equal to float64 rounding (torch on CPU stands in for a GPU here)."""
    import torch

    rng = np.random.default_rng(8)
    X, Q = rng.normal(size=(500, 3)), rng.normal(size=(70, 3))
    y = (rng.random(500) < 0.5).astype(float)
    monkeypatch.setattr(kde, "_CHUNK_ELEMS", 500 * 16)  # several query chunks
    kappas = [0.25, 1.0, 3.0]
    num, den = kde._kernel_sums(X, y, Q, kappas, "cpu")
    tnum, tden = kde._dense_kernel_sums(torch, X, y, Q, kappas, torch.device("cpu"))
    np.testing.assert_allclose(num, tnum, rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(den, tden, rtol=1e-13, atol=1e-300)
    for k, kappa in enumerate(kappas):  # and the obvious loop
        w = np.exp(-0.5 * ((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1) / kappa**2)
        np.testing.assert_allclose(den[k], w.sum(1), rtol=1e-12)
        np.testing.assert_allclose(num[k], w @ y, rtol=1e-12)


def test_exact_matches_statsmodels_kernelreg():
    from statsmodels.nonparametric.kernel_regression import KernelReg

    X, y = realistic(300, seed=3)
    Q, _ = realistic(40, seed=4)
    est = NadarayaWatson(method="exact").fit(X, y)
    kr = KernelReg(
        y,
        X,
        var_type="cc",
        reg_type="lc",
        bw=est.bandwidth_,
        ckertype="gaussian",
        rng=np.random.default_rng(0),
    )
    mean, _ = kr.fit(Q)
    np.testing.assert_allclose(est.predict(Q), mean, rtol=0, atol=1e-12)


def test_far_query_falls_back_to_confidence_only_then_mean():
    X, y = realistic(500, seed=5)
    est = NadarayaWatson(bandwidth=0.5, method="exact").fit(X, y)
    # aux feature 1e3 bandwidths away: 2-D denominator underflows; 1-D on confidence does not
    Q = np.array([[0.8, X[:, 1].max() + 1e3 * est.bandwidth_[1]]])
    one_d = naive_nw(X[:, :1], y, Q[:, :1], [est.bandwidth_1d_])
    assert est.predict(Q) == pytest.approx(one_d, abs=1e-12)
    for method in ("binned", "exact"):
        far = NadarayaWatson(bandwidth=0.5, method=method).fit(X, y)
        Q2 = np.array([[50.0, 50.0]])  # far on both: the mean of y
        assert far.predict(Q2) == pytest.approx([y.mean()], abs=1e-15)
        assert far.predict(Q) == pytest.approx(one_d, abs=1e-12)


# --------------------------------------------------------------------------- binned
@pytest.mark.parametrize("n", [2000, 20000])
@pytest.mark.parametrize("kappa", [0.25, 1.0, 4.0])
def test_binned_close_to_exact(n, kappa):
    X, y = realistic(n, seed=n)
    Q, _ = realistic(4000, seed=n + 1)
    fast = NadarayaWatson(bandwidth=kappa).fit(X, y)
    ref = NadarayaWatson(bandwidth=kappa, method="exact").fit(X, y)
    assert fast.method_ == "binned" and ref.method_ == "exact"
    err = np.abs(fast.predict(Q) - ref.predict(Q))
    assert err.max() <= 1e-3, err.max()
    assert err.mean() <= 1e-4, err.mean()


def test_binned_1d_close_to_exact():
    X, y = realistic(5000, seed=8)
    Q, _ = realistic(2000, seed=9)
    for kappa in (0.25, 1.0):
        fast = NadarayaWatson(bandwidth=kappa).fit(X[:, :1], y)
        ref = NadarayaWatson(bandwidth=kappa, method="exact").fit(X[:, :1], y)
        err = np.abs(fast.predict(Q[:, :1]) - ref.predict(Q[:, :1]))
        assert err.max() <= 1e-3 and err.mean() <= 1e-4


def test_binned_spacing_is_at_most_a_quarter_bandwidth():
    X, y = realistic(3000)
    est = NadarayaWatson(bandwidth=0.5).fit(X, y)
    assert np.all(est._geometry_.delta0 <= est.bandwidth_ / 4 + 1e-15)
    assert len(est.grid_shape_) == 2


def test_cubic_binning_and_prolongation_are_exact_for_cubics():
    rng = np.random.default_rng(0)
    f = rng.random(50)
    w = kde._cubic_weights(f)
    for power in range(4):
        nodes = np.array([-1.0, 0.0, 1.0, 2.0])
        np.testing.assert_allclose((w * nodes**power).sum(1), f**power, atol=1e-13)
    P = kde._prolongation(10)
    coarse = np.arange(11.0)
    fine = np.arange(21.0) / 2
    for power in range(4):
        np.testing.assert_allclose(P @ coarse**power, fine**power, atol=1e-9)


def test_pyramid_levels_match_direct_binning():
    """A coarse level from restriction ≈ binning directly at that spacing (4th order)."""
    X, y = realistic(3000, seed=2)
    h = B.scott_scale(X)
    geom = kde._Geometry.build(X.min(0), X.max(0), 0.5 * h, 4 * h)
    assert tuple(geom.levels) == (3, 3)
    pyr = kde._Pyramid(geom, X, y, [np.arange(3000)], 4 * h)
    key = geom.level_for(3.5 * h)
    num, den = pyr.smooth(key, 3.5 * h, exclude=None)
    (nq, dq), inside = kde._interp(geom, key, (num, den), X[:500])
    ne, de = kernel_sums(X, y, X[:500], 3.5 * h)
    assert inside.all()
    assert np.max(np.abs(nq / dq - ne / de)) < 2e-4
    assert np.max(np.abs(dq / de - 1)) < 1e-3


# --------------------------------------------------------------------------- selection
def clear_optimum_data(n, seed):
    """A smooth, strongly curved P(correct | c, z): CV-NLL has a clear interior optimum."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.2, 1.0, n)
    z = rng.normal(size=n)
    p = 0.5 + 0.45 * np.sin(8 * c) * np.tanh(2 * z)
    return np.column_stack([c, z]), (rng.random(n) < p).astype(float)


def slow_cv_nll(X, y, grid, n_folds=5, random_state=0):
    """The documented CV, written out: each held-out fold from NW fitted on the rest."""
    perm = np.random.default_rng(random_state).permutation(len(y))
    folds = np.array_split(perm, n_folds)
    out = []
    for kappa in grid:
        nll = np.empty(len(y))
        for f in folds:
            tr = np.setdiff1d(np.arange(len(y)), f)
            n_tr = len(tr)
            h = kappa * X[tr].std(0, ddof=1) * n_tr ** (-1 / (X.shape[1] + 4))
            h1 = kappa * X[tr, 0].std(ddof=1) * n_tr ** (-1 / 5)
            p = np.clip(dense_nw(X[tr], y[tr], X[f], h, h1), 1e-6, 1 - 1e-6)
            nll[f] = -(y[f] * np.log(p) + (1 - y[f]) * np.log(1 - p))
        out.append(nll.mean())
    return np.array(out)


def test_cv_nll_matches_slow_loop_and_picks_same_kappa():
    X, y = clear_optimum_data(1500, seed=1)
    grid = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    slow = slow_cv_nll(X, y, grid)
    best = int(np.argmin(slow))
    assert 0 < best < len(grid) - 1  # interior optimum
    assert np.sort(slow)[1] - slow[best] > 2e-3  # and a clear one
    for method in ("binned", "exact"):
        est = NadarayaWatson(bandwidth="cv_nll", grid=grid, method=method).fit(X, y)
        np.testing.assert_allclose(
            est.cv_scores_, slow, rtol=0, atol=5e-5 if method == "binned" else 1e-12
        )
        assert est.kappa_ == grid[best]
        np.testing.assert_allclose(est.bandwidth_, grid[best] * B.scott_scale(X), rtol=1e-12)


def test_cv_many_bandwidths_binned_vs_exact():
    X, y = realistic(6000, seed=11)
    grid = np.geomspace(0.25, 4, 10)
    fast = B.cv_nll_scores(X, y, grid)
    exact = B.cv_nll_scores(X, y, grid, method="exact")
    np.testing.assert_allclose(fast, exact, rtol=0, atol=2e-5)


def test_ece_oracle_minimises_ece_on_eval_data():
    X, y = clear_optimum_data(1500, seed=3)
    Xe, ye = clear_optimum_data(1500, seed=4)
    grid = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

    def ece15(c, yy):
        total = 0.0
        for m in range(15):
            lo, hi = m / 15, (m + 1) / 15
            sel = (c > lo) & (c <= hi)
            if sel.any():
                total += sel.sum() / len(c) * abs(yy[sel].mean() - c[sel].mean())
        return total

    eces = [
        ece15(NadarayaWatson(bandwidth=k, method="exact").fit(X, y).predict(Xe), ye) for k in grid
    ]
    kappa, scores = oracle_bandwidth(X, y, Xe, ye, grid=grid, method="exact")
    np.testing.assert_allclose(scores, eces, atol=1e-12)
    assert kappa == grid[int(np.argmin(eces))]
    est = NadarayaWatson(bandwidth="ece_oracle", grid=grid).fit(X, y, oracle=(Xe, ye))
    # ECE15 jumps when a prediction crosses a bin edge, so binned (|Δp| ~ 1e-4) ECEs may
    # differ by a few crossings × 1/1500; the clear optimum must be the same.
    np.testing.assert_allclose(est.oracle_scores_, eces, atol=5e-3)
    assert est.kappa_ == kappa
    with pytest.raises(ValueError, match="oracle"):
        NadarayaWatson(bandwidth="ece_oracle").fit(X, y)
    assert NadarayaWatson(bandwidth="ece_oracle").requires_oracle
    assert not NadarayaWatson().requires_oracle


def drop_zero_ece15(conf, correct):
    """The oracle's former private ECE15, which left out predictions of exactly 0."""
    keep = conf > 0
    conf, correct = conf[keep], correct[keep]
    idx = np.searchsorted(np.linspace(0.0, 1.0, 16)[1:-1], conf, side="left")
    gap = np.abs(np.bincount(idx, correct, 15) - np.bincount(idx, conf, 15))
    return float(gap.sum() / max(conf.size, 1))


def separated_clusters():
    """Fit data in two tied clusters (c = 0.2, all wrong; c = 0.9, all right) far apart in
    units of the small bandwidths, so NW predicts exactly 0.0 and 1.0 at the clusters."""
    X = np.r_[np.full(100, 0.2), np.full(100, 0.9)][:, None]
    y = np.r_[np.zeros(100), np.ones(100)]
    Xe = np.r_[np.full(60, 0.2), np.full(60, 0.9), np.linspace(0.3, 0.8, 30)][:, None]
    ye = np.r_[np.ones(20), np.zeros(40), np.ones(50), np.zeros(10), np.tile([0.0, 1.0], 15)]
    return X, y, Xe, ye


@pytest.mark.parametrize("method", ["exact", "binned"])
def test_oracle_scores_are_the_reported_ece_even_with_exact_zeros(method):
    X, y, Xe, ye = separated_clusters()
    grid = (0.05, 0.1, 1.0, 4.0)
    preds = [NadarayaWatson(bandwidth=k, method=method).fit(X, y).predict(Xe) for k in grid]
    # the data are what the test is about: exact 0.0 and 1.0 predictions at the small κ
    for p in preds[:2]:
        assert (p == 0.0).sum() == 60 and (p == 1.0).sum() == 60
    reported = [metrics.ece(p, ye, 15) for p in preds]
    # one κ at a time the oracle evaluates exactly what the fitted NW predicts
    single = [B.oracle_scores(X, y, Xe, ye, [k], method=method)[0] for k in grid]
    np.testing.assert_allclose(single, reported, rtol=0, atol=1e-15)
    # the old drop-zero formula gives a different number where predictions are exactly 0
    old = [drop_zero_ece15(p, ye) for p in preds]
    assert min(abs(o - r) for o, r in zip(old[:2], reported[:2], strict=True)) > 0.05
    # the whole grid at once: identical for exact; binned shares one grid pyramid across κ,
    # so predictions (and ECEs) may move by the binning error where they are not 0 or 1
    scores = B.oracle_scores(X, y, Xe, ye, grid, method=method)
    np.testing.assert_allclose(scores, reported, rtol=0, atol=1e-15 if method == "exact" else 1e-4)
    np.testing.assert_array_equal(scores[:2], reported[:2])
    est = NadarayaWatson(bandwidth="ece_oracle", grid=grid, method=method).fit(X, y, oracle=(Xe, ye))
    np.testing.assert_array_equal(est.oracle_scores_, scores)
    assert est.kappa_ == grid[int(np.argmin(reported))]


# --------------------------------------------------------------------------- API details
def test_sensitivity_grid_and_with_setting():
    est = ARCondCal(grid=(0.5, 2.0))
    grid = est.sensitivity_grid()
    assert grid == {"bandwidth": ["scott×0.5", "scott×2", "cv_nll", "ece_oracle"]}
    X, y = realistic(800)
    for value in grid["bandwidth"][:3]:
        variant = est.with_setting("bandwidth", value)
        assert type(variant) is ARCondCal and variant.bandwidth == value
        variant.fit(X, y)
    assert est.with_setting("bandwidth", "scott×2").fit(X, y).kappa_ == 2.0
    assert ARCondCal.features == ("confidence", "depth_variance")


def test_constant_column_is_ignored():
    X, y = realistic(1000, seed=6)
    Xc = np.column_stack([X[:, 0], np.full(1000, 3.0)])
    est = NadarayaWatson(method="exact").fit(Xc, y)
    assert np.isinf(est.bandwidth_[1])
    Q = np.column_stack([X[:50, 0], np.full(50, 7.0)])
    h = est.bandwidth_[0]
    np.testing.assert_allclose(est.predict(Q), naive_nw(X[:, :1], y, Q[:, :1], [h]), atol=1e-12)
    const = NadarayaWatson().fit(np.ones((10, 2)), np.r_[np.ones(5), np.zeros(5)])
    assert np.all(const.predict(np.zeros((3, 2))) == 0.5)


def test_three_columns_use_exact():
    rng = np.random.default_rng(0)
    X = rng.random((300, 3))
    y = (rng.random(300) < X[:, 0]).astype(float)
    est = NadarayaWatson().fit(X, y)
    assert est.method_ == "exact"
    np.testing.assert_allclose(
        est.predict(X[:20]), naive_nw(X, y, X[:20], est.bandwidth_), atol=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(5, 60),
    seed=st.integers(0, 10_000),
    kappa=st.sampled_from([0.1, 0.5, 1.0, 3.0]),
    method=st.sampled_from(["binned", "exact"]),
    y_kind=st.sampled_from(["mixed", "ones", "zeros"]),
)
def test_property_prediction_within_y_range(n, seed, kappa, method, y_kind):
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.uniform(0.1, 1, n), rng.exponential(size=n)])
    y = {"mixed": (rng.random(n) < 0.5).astype(float), "ones": np.ones(n), "zeros": np.zeros(n)}[
        y_kind
    ]
    Q = np.vstack([X, rng.normal(0.5, 3.0, size=(20, 2))])
    p = NadarayaWatson(bandwidth=kappa, method=method).fit(X, y).predict(Q)
    assert p.shape == (len(Q),)
    assert np.all(p >= y.min()) and np.all(p <= y.max())


def test_cv_1d_binned_vs_exact():
    X, y = realistic(4000, seed=12)
    grid = np.geomspace(0.25, 4, 6)
    fast = B.cv_nll_scores(X[:, :1], y, grid)
    exact = B.cv_nll_scores(X[:, :1], y, grid, method="exact")
    np.testing.assert_allclose(fast, exact, rtol=0, atol=2e-5)


def test_cv_bins_each_fold_once(monkeypatch):
    calls = []
    real_bin = kde._bin

    def counting_bin(geom, X, weights):
        calls.append(len(X))
        return real_bin(geom, X, weights)

    monkeypatch.setattr(kde, "_bin", counting_bin)  # looked up by kde._Pyramid
    X, y = realistic(3000, seed=13)
    B.cv_nll_scores(X, y, np.geomspace(0.25, 4, 10), n_folds=5)
    assert sorted(calls) == sorted(len(f) for f in np.array_split(np.arange(3000), 5))


def test_failed_fit_leaves_it_unfitted_and_fitted_state_pickles():
    import pickle

    from routeaudit.calibrators import NotFittedError

    X, y = realistic(500, seed=14)
    est = NadarayaWatson(bandwidth="ece_oracle")
    with pytest.raises(ValueError):
        est.fit(X, y)
    with pytest.raises(NotFittedError):
        est.predict(X)
    est = NadarayaWatson().fit(X, y)
    far = np.array([[0.5, 40.0], [0.9, 0.1]])
    p = est.predict(far)  # the first point is evaluated exactly (KD-tree built)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict(far), p)
