"""The calibrator contract, the confidence-only calibrators and ``check_calibrator``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import softmax

from routeaudit.calibrators import (
    REFERENCE_CALIBRATORS,
    BaseCalibrator,
    CalibratorSpec,
    HistogramBinning,
    IsotonicCalibrator,
    LogisticCalibrator,
    MLPCalibrator,
    NadarayaWatson,
    NotFittedError,
    RawCalibrator,
    TemperatureScaling,
    calibrator,
    calibrator_checks,
    check_calibrator,
    clone,
    find_calibrators,
    spec_of,
)
from routeaudit.calibrators.base import CALIBRATOR_MARK, params_equal
from routeaudit.calibrators.checks import synthetic_data
from routeaudit.calibrators.simple import pava, top_label_nll


def conf_data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.beta(4, 1.5, n) * 0.9 + 0.1
    y = (rng.random(n) < c**1.5).astype(float)  # over-confident
    return c[:, None], y


# --------------------------------------------------------------------------- base
def test_get_set_params_repr_and_clone():
    est = NadarayaWatson(bandwidth="cv_nll", grid=(1.0, 2.0))
    params = est.get_params()
    assert params["bandwidth"] == "cv_nll" and params["grid"] == (1.0, 2.0)
    assert set(params) == {
        "bandwidth",
        "scott_multiplier",
        "grid",
        "method",
        "grid_size",
        "n_folds",
        "random_state",
        "device",
    }
    assert repr(est) == "NadarayaWatson(bandwidth='cv_nll', grid=(1.0, 2.0))"
    assert est.set_params(method="exact") is est and est.method == "exact"
    with pytest.raises(ValueError, match="invalid parameter 'nope'"):
        est.set_params(nope=1)
    X, y = synthetic_data(["confidence", "r_agg"], 300)
    est.fit(X, y)
    twin = clone(est)
    assert type(twin) is NadarayaWatson and twin is not est
    assert params_equal(twin.get_params(), est.get_params())
    assert not hasattr(twin, "kappa_")
    with pytest.raises(NotFittedError, match="not fitted"):
        twin.predict(X)
    assert isinstance(NotFittedError("x"), ValueError)


def test_clone_refuses_an_init_that_changes_parameters():
    class Bad(BaseCalibrator):
        def __init__(self, grid=(1, 2)):
            self.grid = list(grid)

    with pytest.raises(RuntimeError, match="does not store parameter 'grid' unchanged"):
        clone(Bad())


def test_nested_params_and_clone():
    class Wrapper(BaseCalibrator):
        def __init__(self, inner=None, shift=0.0):
            self.inner = inner
            self.shift = shift

    w = Wrapper(inner=HistogramBinning(n_bins=5))
    assert w.get_params()["inner__n_bins"] == 5
    w.set_params(inner__n_bins=7)
    assert w.inner.n_bins == 7
    twin = clone(w)
    assert twin.inner is not w.inner and twin.inner.n_bins == 7


def test_calibrator_decorator_and_spec():
    @calibrator(["confidence", "depth_variance"], name="mine")
    def factory():
        return NadarayaWatson()

    spec = getattr(factory, CALIBRATOR_MARK)
    assert isinstance(spec, CalibratorSpec)
    assert spec == spec_of(factory)
    assert spec.name == "mine" and spec.features == ("confidence", "depth_variance")
    assert spec.factory is factory
    a, b = spec.make(), spec.make()
    assert isinstance(a, NadarayaWatson) and a is not b
    with pytest.raises(AttributeError):
        spec.name = "other"  # frozen

    @calibrator(["confidence"])
    def default_name():
        return RawCalibrator()

    assert spec_of(default_name).name == "default_name"
    assert find_calibrators({"f": factory, "g": default_name, "x": 3}) == [
        spec,
        spec_of(default_name),
    ]
    with pytest.raises(TypeError):
        calibrator("confidence")
    with pytest.raises(ValueError):
        calibrator([])


def test_reference_registry():
    assert {
        "raw",
        "temperature",
        "logistic",
        "histogram",
        "isotonic",
        "nw_confidence",
        "ar_condcal",
        "nw_predictive_entropy",
        "nw_r_agg",
        "mlp_profile",
        "routing_robust",
        "per_expert_platt",
    } == set(REFERENCE_CALIBRATORS)
    assert REFERENCE_CALIBRATORS["ar_condcal"].features == ("confidence", "depth_variance")
    assert REFERENCE_CALIBRATORS["mlp_profile"].features == ("confidence", "profile")


def test_input_validation():
    c, y = conf_data(50)
    with pytest.raises(ValueError, match=r"y must be correctness in \{0, 1\}"):
        RawCalibrator().fit(c, y * 0.5 + 0.25)
    with pytest.raises(ValueError, match="NaN or inf"):
        RawCalibrator().fit(np.r_[c[:-1, 0], np.nan][:, None], y)
    with pytest.raises(ValueError, match="entries but X has"):
        RawCalibrator().fit(c, y[:-1])
    est = HistogramBinning().fit(c, y)
    with pytest.raises(ValueError, match="fitted with 1"):
        est.predict(np.hstack([c, c]))
    # a 1-D X is one column
    np.testing.assert_array_equal(est.predict(c[:, 0]), est.predict(c))


# --------------------------------------------------------------------------- simple
def test_raw_is_clipped_identity():
    X = np.array([[0.3, 9.0], [1.2, 0.0], [-0.1, 1.0]])
    est = RawCalibrator().fit(X, [1, 0, 1])
    np.testing.assert_array_equal(est.predict(X), [0.3, 1.0, 0.0])
    assert est.n_parameters_ == 0


def naive_top_label_nll(z, y, T):
    c = softmax(z / T, axis=1).max(axis=1)
    c = np.clip(c, 1e-300, 1 - 1e-16)
    return -np.mean(y * np.log(c) + (1 - y) * np.log(1 - c))


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_temperature_matches_grid_search(t_true):
    rng = np.random.default_rng(int(t_true * 10))
    z = rng.normal(0, 3, size=(2000, 10))
    y = (rng.random(2000) < softmax(z / t_true, axis=1).max(axis=1)).astype(float)
    est = TemperatureScaling().fit(z, y)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    losses = np.array([naive_top_label_nll(z, y, t) for t in grid])
    t_grid = grid[np.argmin(losses)]
    step = grid[1] / grid[0]
    assert t_grid / step <= est.temperature_ <= t_grid * step
    assert naive_top_label_nll(z, y, est.temperature_) <= losses.min() + 1e-9
    assert top_label_nll(z, y, est.temperature_) == pytest.approx(
        naive_top_label_nll(z, y, est.temperature_), rel=1e-10
    )
    assert est.temperature_ == pytest.approx(t_true, rel=0.2)
    np.testing.assert_allclose(
        est.predict(z), softmax(z / est.temperature_, axis=1).max(1), rtol=1e-12
    )
    assert est.n_parameters_ == 1


def test_temperature_is_stable_for_extreme_logits():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 200, size=(500, 5))  # fp32-style saturated softmax
    y = (rng.random(500) < 0.7).astype(float)
    est = TemperatureScaling().fit(z, y)
    p = est.predict(z)
    assert np.isfinite(est.nll_) and np.all((p >= 0) & (p <= 1))


@pytest.mark.parametrize("inp", ["confidence", "logit"])
def test_logistic_matches_sklearn(inp):
    from sklearn.linear_model import LogisticRegression

    c, y = conf_data(3000, seed=2)
    est = LogisticCalibrator(input=inp).fit(c, y)
    x = c if inp == "confidence" else np.log(c) - np.log1p(-c)
    # penalty=None is spelled C=inf since scikit-learn 1.8
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x, y)
    assert est.coef_ == pytest.approx(ref.coef_[0, 0], abs=1e-4)
    assert est.intercept_ == pytest.approx(ref.intercept_[0], abs=1e-4)
    np.testing.assert_allclose(est.predict(c), ref.predict_proba(x)[:, 1], atol=1e-6)


def test_logistic_constant_labels():
    c, _ = conf_data(100)
    est = LogisticCalibrator().fit(c, np.ones(100))
    assert est.coef_ == 0.0 and np.all(est.predict(c) > 0.999)


def slow_histogram(c, y, q, n_bins, strategy):
    if strategy == "equal_width":
        edges = np.linspace(0, 1, n_bins + 1)
    else:
        edges = np.quantile(c, np.linspace(0, 1, n_bins + 1))
    values = []
    for m in range(n_bins):
        lo, hi = edges[m], edges[m + 1]
        inside = [
            i for i in range(len(c)) if (m == 0 or c[i] > lo) and (m == n_bins - 1 or c[i] <= hi)
        ]
        values.append(np.mean(y[inside]) if inside else (lo + hi) / 2)
    out = []
    for v in q:
        for m in range(n_bins):
            last = m == n_bins - 1
            if (m == 0 or v > edges[m]) and (last or v <= edges[m + 1]):
                out.append(values[m])
                break
    return np.array(out)


@pytest.mark.parametrize("strategy", ["equal_mass", "equal_width"])
@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_histogram_matches_slow_loop(strategy, n_bins):
    c, y = conf_data(400, seed=n_bins)
    c = np.round(c, 2)  # ties, and values on the equal-width edges
    q = np.r_[np.linspace(0, 1, 61), c[:40, 0]]
    est = HistogramBinning(n_bins=n_bins, strategy=strategy).fit(c, y)
    np.testing.assert_allclose(
        est.predict(q), slow_histogram(c[:, 0], y, q, n_bins, strategy), atol=1e-15
    )


def test_histogram_edge_goes_to_lower_bin_and_empty_bin_uses_centre():
    c = np.array([[0.2], [0.2], [0.9]])
    est = HistogramBinning(n_bins=5, strategy="equal_width").fit(c, [1, 1, 0])
    # 0.2 is the upper edge of bin 1 (0, 0.2]: accuracy 1; bin (0.2, 0.4] is empty: centre 0.3
    np.testing.assert_allclose(est.predict([0.2, 0.3, 0.9, 0.5]), [1.0, 0.3, 0.0, 0.5])


@pytest.mark.parametrize("solver", ["auto", "pava"])
def test_isotonic_matches_sklearn(solver):
    from sklearn.isotonic import IsotonicRegression

    c, y = conf_data(1500, seed=4)
    c = np.round(c, 3)  # ties
    q = np.r_[np.linspace(-0.2, 1.2, 200), c[:100, 0]]
    est = IsotonicCalibrator(solver=solver).fit(c, y)
    ref = IsotonicRegression(out_of_bounds="clip").fit(c[:, 0], y)
    np.testing.assert_allclose(est.predict(q), ref.predict(q), atol=1e-12)


def test_pava_matches_sklearn_isotonic_regression():
    from sklearn.isotonic import isotonic_regression

    rng = np.random.default_rng(0)
    for _ in range(20):
        yv = rng.normal(size=50)
        w = rng.uniform(0.1, 3, size=50)
        np.testing.assert_allclose(
            pava(yv, w), isotonic_regression(yv, sample_weight=w), atol=1e-12
        )


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=1, max_size=80),
    st.sampled_from(["auto", "pava"]),
)
def test_property_isotonic_is_monotone(points, solver):
    c = np.array([p[0] for p in points])[:, None]
    y = np.array([float(p[1]) for p in points])
    est = IsotonicCalibrator(solver=solver).fit(c, y)
    q = np.linspace(-0.5, 1.5, 101)
    p = est.predict(q)
    assert np.all(np.diff(p) >= -1e-12)
    assert np.all((p >= 0) & (p <= 1))


@settings(max_examples=50, deadline=None)
@given(
    bandwidth=st.one_of(
        st.sampled_from(["scott", "cv_nll", "ece_oracle", "scott×2"]), st.floats(0.01, 10.0)
    ),
    grid=st.lists(st.floats(0.1, 5.0), min_size=1, max_size=4).map(tuple),
    n_bins=st.integers(1, 40),
    strategy=st.sampled_from(["equal_mass", "equal_width"]),
    restarts=st.integers(1, 4),
)
def test_property_clone_keeps_params(bandwidth, grid, n_bins, strategy, restarts):
    for est in (
        NadarayaWatson(bandwidth=bandwidth, grid=grid),
        HistogramBinning(n_bins=n_bins, strategy=strategy),
        MLPCalibrator(restarts=restarts, hidden_layer_sizes=(n_bins, 3)),
    ):
        twin = clone(est)
        assert twin is not est and type(twin) is type(est)
        assert params_equal(twin.get_params(), est.get_params())
        assert repr(twin) == repr(est)


# --------------------------------------------------------------------------- check_calibrator
def _small_mlp():
    return MLPCalibrator(max_epochs=8, restarts=2, hidden_layer_sizes=(16, 16))


@pytest.mark.parametrize("name", sorted(REFERENCE_CALIBRATORS))
def test_check_calibrator_passes_on_references(name):
    spec = REFERENCE_CALIBRATORS[name]
    if name == "mlp_profile":  # same class, fewer epochs to keep the suite fast
        spec = CalibratorSpec(name, spec.features, _small_mlp)
    check_calibrator(spec, n=300)


@pytest.mark.parametrize(
    "est",
    [
        NadarayaWatson(bandwidth="cv_nll", grid=(0.5, 1.0, 2.0)),
        NadarayaWatson(method="exact"),
        HistogramBinning(strategy="equal_width"),
        LogisticCalibrator(input="logit"),
    ],
)
def test_check_calibrator_passes_on_variants(est):
    check_calibrator(est, features=["confidence", "r_agg"], n=300)


@pytest.mark.parametrize(
    "name, check", list(calibrator_checks(REFERENCE_CALIBRATORS["ar_condcal"], n=200))
)
def test_calibrator_checks_as_pytest_items(name, check):
    assert name.startswith("check_")
    check()


class _Base(BaseCalibrator):
    def fit(self, X, y):
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def predict(self, X):
        self._check_fitted()
        return np.clip(np.asarray(X, dtype=float)[:, 0], 0, 1)


class OverOne(_Base):
    def predict(self, X):
        return super().predict(X) + 0.5


class Mutates(_Base):
    def fit(self, X, y):
        X[:, 0] = np.sort(X[:, 0])  # "harmless" in-place preprocessing
        return super().fit(X, y)


class Nondeterministic(_Base):
    def fit(self, X, y):
        self.noise_ = np.random.default_rng().normal(0, 1e-3)
        return super().fit(X, y)

    def predict(self, X):
        return np.clip(super().predict(X) + self.noise_, 0, 1)


class NoNotFittedError(_Base):
    def predict(self, X):
        return np.clip(np.asarray(X, dtype=float)[:, 0], 0, 1)


class StateInInit(_Base):
    def __init__(self, alpha=1.0):
        self.alpha = alpha
        self.cache_ = {}


class ParamChangedInInit(_Base):
    def __init__(self, bins=(1, 2)):
        self.bins = list(bins)


class Leaky(_Base):
    def fit(self, X, y):
        self.total_ = getattr(self, "total_", 0.0) + float(np.mean(y))
        return super().fit(X, y)

    def predict(self, X):
        return np.clip(super().predict(X) * 0 + self.total_ / 2, 0, 1)


class ReturnsNone(_Base):
    def fit(self, X, y):
        super().fit(X, y)


class WrongShape(_Base):
    def predict(self, X):
        return super().predict(X)[:, None]


class NaNs(_Base):
    def predict(self, X):
        p = super().predict(X)
        p[3] = np.nan
        return p


class BadGrid(_Base):
    def __init__(self, k=1.0):
        self.k = k

    def sensitivity_grid(self):
        return {"k": [1.0, 2.0]}

    def with_setting(self, name, value):
        return self  # not a new calibrator


@pytest.mark.parametrize(
    "cls, check",
    [
        (OverOne, "check_predict_range"),
        (Mutates, "check_no_input_mutation"),
        (Nondeterministic, "check_deterministic"),
        (NoNotFittedError, "check_not_fitted"),
        (StateInInit, "check_init_params"),
        (ParamChangedInInit, "check_clone"),
        (Leaky, "check_refit"),
        (ReturnsNone, "check_fit_returns_self"),
        (WrongShape, "check_predict_shape"),
        (NaNs, "check_predict_shape"),
        (BadGrid, "check_sensitivity_grid"),
    ],
)
def test_check_calibrator_fails_on_broken_calibrators(cls, check):
    with pytest.raises(AssertionError, match=rf"\[{check}\] {cls.__name__}"):
        check_calibrator(cls)
    # the same check, run alone through calibrator_checks, fails too
    checks = dict(calibrator_checks(cls))
    with pytest.raises(AssertionError, match=check):
        checks[check]()


def test_the_well_behaved_base_passes():
    check_calibrator(_Base)


def test_check_calibrator_on_real_calibrator_with_injected_bug():
    class Overconfident(NadarayaWatson):
        def predict(self, X):
            return super().predict(X) * 1.2

    with pytest.raises(AssertionError, match="check_predict_range"):
        check_calibrator(Overconfident, features=["confidence", "r_agg"])
