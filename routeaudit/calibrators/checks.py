"""``check_calibrator``: the calibrator contract as a runnable battery (like scikit-learn's).

Run the whole battery (raises ``AssertionError`` naming the failed check)::

    from routeaudit.calibrators import check_calibrator
    check_calibrator(my_factory)            # a @calibrator-marked factory, a spec, or a class

or one pytest item per check::

    @pytest.mark.parametrize("name, check", calibrator_checks(my_factory))
    def test_contract(name, check):
        check()

The checks fit on synthetic data with one column per declared feature: confidence
c ~ U(0.1, 1) and correctness y ~ Bernoulli(c); ``"logits"`` is 5 logit columns (and then
c = max softmax); ``"profile"`` is 4 columns; any other feature is one U(0, 1) column.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import routeaudit.metrics as metrics
from routeaudit.calibrators.base import NotFittedError, clone, params_equal, spec_of

N_LOGITS = 5
N_PROFILE = 4


def synthetic_data(features: Sequence[str], n: int = 500, seed: int = 0):
    """(X, y) with one block of columns per declared feature (see the module docstring)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, N_LOGITS))
    # c = the top softmax probability of the logits, else an independent U(0.1, 1) draw
    conf = metrics.softmax(logits).max(axis=1) if "logits" in features else rng.uniform(0.1, 1.0, size=n)
    y = (rng.random(n) < conf).astype(np.float64)
    cols = []
    for f in features:
        if f == "confidence":
            cols.append(conf[:, None])
        elif f == "logits":
            cols.append(logits)
        elif f == "profile":
            cols.append(rng.normal(size=(n, N_PROFILE)))
        else:
            cols.append(rng.uniform(0.0, 1.0, size=(n, 1)))
    return np.hstack(cols), y


@dataclass
class _Case:
    name: str
    make: Callable[[], Any]
    features: tuple[str, ...]
    n: int
    seed: int
    _fitted: Any = field(default=None, repr=False)

    @functools.cached_property
    def data(self):
        return synthetic_data(self.features, self.n, self.seed)

    def fail(self, check: str, message: str) -> AssertionError:
        return AssertionError(f"[{check}] {self.name}: {message}")

    def fresh(self, check: str) -> Any:
        est = self.make()
        if not (hasattr(est, "fit") and hasattr(est, "predict")):
            raise self.fail(
                check, f"the factory returned {type(est).__name__}, which has no fit/predict"
            )
        return est

    def fitted(self, check: str) -> Any:
        if self._fitted is None:
            X, y = self.data
            est = self.fresh(check)
            est.fit(X.copy(), y.copy())
            self._fitted = est
        return self._fitted

    def predictions(self, check: str) -> np.ndarray:
        return np.asarray(self.fitted(check).predict(self.data[0].copy()))


def _raises_not_fitted(fn: Callable[[], Any]) -> tuple[bool, str]:
    try:
        fn()
    except NotFittedError:
        return True, ""
    except Exception as exc:  # a scikit-learn or home-made NotFittedError counts
        if type(exc).__name__ == "NotFittedError":
            return True, ""
        return False, f"raised {type(exc).__name__}: {exc}"
    return False, "returned without raising"


# --------------------------------------------------------------------------- the checks
def check_init_params(case: _Case) -> None:
    """``__init__`` stores parameters only: get_params works and no learned state exists."""
    c = "check_init_params"
    est = case.fresh(c)
    if not (hasattr(est, "get_params") and hasattr(est, "set_params")):
        raise case.fail(
            c, "no get_params/set_params; inherit routeaudit.calibrators.BaseCalibrator"
        )
    params = est.get_params(deep=False)
    learned = [k for k in vars(est) if k.endswith("_") and not k.startswith("__")]
    if learned:
        raise case.fail(c, f"__init__ sets learned-looking attributes {learned}")
    extra = [k for k in vars(est) if k not in params]
    if extra:
        raise case.fail(c, f"__init__ sets attributes that are not parameters: {extra}")


def check_not_fitted(case: _Case) -> None:
    """predict before fit raises NotFittedError."""
    c = "check_not_fitted"
    ok, why = _raises_not_fitted(lambda: case.fresh(c).predict(case.data[0].copy()))
    if not ok:
        raise case.fail(c, f"predict before fit should raise NotFittedError but {why}")


def check_fit_returns_self(case: _Case) -> None:
    c = "check_fit_returns_self"
    est = case.fresh(c)
    X, y = case.data
    out = est.fit(X.copy(), y.copy())
    if out is not est:
        raise case.fail(c, f"fit returned {type(out).__name__} instead of self")


def check_predict_shape(case: _Case) -> None:
    """predict returns a finite float array of shape (n,)."""
    c = "check_predict_shape"
    p = case.predictions(c)
    if p.shape != (case.n,):
        raise case.fail(c, f"predict returned shape {p.shape}, expected ({case.n},)")
    if not np.issubdtype(p.dtype, np.floating):
        raise case.fail(c, f"predict returned dtype {p.dtype}, expected a float dtype")
    if not np.isfinite(p).all():
        raise case.fail(c, f"predict returned {int((~np.isfinite(p)).sum())} NaN/inf values")


def check_predict_range(case: _Case) -> None:
    """Predictions are probabilities in [0, 1]."""
    c = "check_predict_range"
    p = case.predictions(c)
    bad = np.flatnonzero(~((p >= 0.0) & (p <= 1.0)))
    if bad.size:
        i = int(bad[0])
        raise case.fail(c, f"{bad.size} predictions outside [0, 1], e.g. p[{i}] = {p[i]!r}")


def check_no_input_mutation(case: _Case) -> None:
    """fit and predict leave X and y unchanged."""
    c = "check_no_input_mutation"
    X, y = case.data
    Xc, yc = X.copy(), y.copy()
    est = case.fresh(c)
    est.fit(Xc, yc)
    if not (np.array_equal(Xc, X) and np.array_equal(yc, y)):
        raise case.fail(c, "fit modified its input X or y in place")
    est.predict(Xc)
    if not np.array_equal(Xc, X):
        raise case.fail(c, "predict modified its input X in place")


def check_deterministic(case: _Case) -> None:
    """Two fresh instances fitted on the same data predict identically."""
    c = "check_deterministic"
    X, y = case.data
    p1 = np.asarray(case.fresh(c).fit(X.copy(), y.copy()).predict(X.copy()))
    p2 = np.asarray(case.fresh(c).fit(X.copy(), y.copy()).predict(X.copy()))
    if not np.array_equal(p1, p2):
        diff = float(np.max(np.abs(p1 - p2)))
        raise case.fail(
            c,
            f"two fresh fits differ (max |Δp| = {diff:.3g}); seed every "
            "random choice from a parameter such as random_state",
        )


def check_clone(case: _Case) -> None:
    """clone gives a new, unfitted calibrator of the same type with equal parameters."""
    c = "check_clone"
    fitted = case.fitted(c)
    try:
        twin = clone(fitted)
    except Exception as exc:
        raise case.fail(c, f"clone failed: {type(exc).__name__}: {exc}") from exc
    if twin is fitted or type(twin) is not type(fitted):
        raise case.fail(c, "clone did not return a new object of the same type")
    if not params_equal(twin.get_params(deep=False), fitted.get_params(deep=False)):
        raise case.fail(c, "clone changed the parameters")
    ok, why = _raises_not_fitted(lambda: twin.predict(case.data[0].copy()))
    if not ok:
        raise case.fail(c, f"a clone must be unfitted, but its predict {why}")


def check_set_params(case: _Case) -> None:
    """set_params(**get_params()) returns self and changes nothing."""
    c = "check_set_params"
    est = case.fresh(c)
    before = est.get_params(deep=False)
    out = est.set_params(**before)
    if out is not est:
        raise case.fail(c, "set_params did not return self")
    if not params_equal(est.get_params(deep=False), before):
        raise case.fail(c, "set_params(**get_params()) changed the parameters")


def check_refit(case: _Case) -> None:
    """Refitting forgets the previous fit: fit(A); fit(B) predicts like a fresh fit(B)."""
    c = "check_refit"
    X, y = case.data
    X2, y2 = synthetic_data(case.features, case.n, case.seed + 1)
    est = case.fresh(c).fit(X2, y2)
    est.fit(X.copy(), y.copy())
    p = np.asarray(est.predict(X.copy()))
    ref = case.predictions(c)
    if not np.allclose(p, ref, rtol=0.0, atol=1e-12):
        raise case.fail(
            c,
            "a refitted calibrator predicts differently from a fresh one "
            f"(max |Δp| = {float(np.max(np.abs(p - ref))):.3g}); state leaks "
            "between fits",
        )


def check_row_independence(case: _Case) -> None:
    """Each prediction depends only on its own row: predict(X[:k]) == predict(X)[:k]."""
    c = "check_row_independence"
    X = case.data[0]
    full = case.predictions(c)
    k = max(1, min(7, case.n // 2))
    part = np.asarray(case.fitted(c).predict(X[:k].copy()))
    if part.shape != (k,) or not np.allclose(part, full[:k], rtol=0.0, atol=1e-9):
        raise case.fail(
            c, "predictions on a subset of rows differ from the same rows predicted together"
        )


def check_pickle(case: _Case) -> None:
    """A fitted calibrator survives pickling (parallel executors ship them between processes)."""
    c = "check_pickle"
    fitted = case.fitted(c)
    try:
        again = pickle.loads(pickle.dumps(fitted))
    except Exception as exc:
        raise case.fail(c, f"pickling failed: {type(exc).__name__}: {exc}") from exc
    if not np.array_equal(np.asarray(again.predict(case.data[0].copy())), case.predictions(c)):
        raise case.fail(c, "the unpickled calibrator predicts differently")


def check_sensitivity_grid(case: _Case) -> None:
    """If sensitivity_grid exists, every setting makes an unfitted variant via with_setting."""
    c = "check_sensitivity_grid"
    est = case.fresh(c)
    if not hasattr(est, "sensitivity_grid"):
        return
    grid = est.sensitivity_grid()
    if not isinstance(grid, dict):
        raise case.fail(c, f"sensitivity_grid() returned {type(grid).__name__}, not a dict")
    if grid and not hasattr(est, "with_setting"):
        raise case.fail(c, "sensitivity_grid() without with_setting(name, value)")
    base = est.get_params(deep=False)
    for name, values in grid.items():
        if name not in base:
            raise case.fail(c, f"sensitivity_grid names {name!r}, which is not a parameter")
        for value in values:
            variant = est.with_setting(name, value)
            if variant is est or type(variant) is not type(est):
                raise case.fail(
                    c, f"with_setting({name!r}, {value!r}) must return a new {type(est).__name__}"
                )
            got = variant.get_params(deep=False)
            want = {**base, name: value}
            if not params_equal(got, want):
                raise case.fail(c, f"with_setting({name!r}, {value!r}) gave parameters {got}")
    if not params_equal(est.get_params(deep=False), base):
        raise case.fail(c, "with_setting modified the original calibrator")


_CHECKS: tuple[Callable[[_Case], None], ...] = (
    check_init_params,
    check_not_fitted,
    check_fit_returns_self,
    check_predict_shape,
    check_predict_range,
    check_no_input_mutation,
    check_deterministic,
    check_clone,
    check_set_params,
    check_refit,
    check_row_independence,
    check_pickle,
    check_sensitivity_grid,
)


def _resolve(obj: Any, features: Sequence[str] | None) -> tuple[str, Callable[[], Any], tuple]:
    spec = spec_of(obj)
    if spec is not None:
        return spec.name, spec.make, tuple(features or spec.features)
    if hasattr(obj, "fit") and hasattr(obj, "predict") and not isinstance(obj, type):
        template = obj

        def make() -> Any:
            return clone(template)

        name = type(obj).__name__
        feats = features or getattr(obj, "features", None) or ("confidence",)
        return name, make, tuple(feats)
    if callable(obj):
        name = getattr(obj, "__name__", repr(obj))
        feats = features or getattr(obj, "features", None)
        if feats is None:
            feats = getattr(obj(), "features", None) or ("confidence",)
        return name, obj, tuple(feats)
    raise TypeError(f"expected a calibrator factory, spec or instance, got {obj!r}")


def calibrator_checks(
    factory_or_spec: Any, *, n: int = 500, seed: int = 0, features: Sequence[str] | None = None
) -> Iterator[tuple[str, Callable[[], None]]]:
    """``(check_name, zero-argument callable)`` pairs, one per check, for ``parametrize``.

    Each callable builds its own data and calibrators, so checks run independently.
    """
    name, make, feats = _resolve(factory_or_spec, features)
    for check in _CHECKS:

        def run(check=check) -> None:
            check(_Case(name, make, feats, n, seed))

        run.__name__ = check.__name__
        yield check.__name__, run


def check_calibrator(
    factory_or_spec: Any, *, n: int = 500, seed: int = 0, features: Sequence[str] | None = None
) -> None:
    """Run every contract check; raise ``AssertionError`` naming the first that fails.

    ``factory_or_spec``: a ``@calibrator``-marked factory, a ``CalibratorSpec``, a plain
    zero-argument factory or class (its ``features`` attribute, else ``["confidence"]``),
    or an unfitted calibrator instance (cloned for each use). ``features`` overrides the
    declared features. One synthetic data set of ``n`` rows (``seed``) is shared.
    """
    name, make, feats = _resolve(factory_or_spec, features)
    case = _Case(name, make, feats, n, seed)
    for check in _CHECKS:
        check(case)


__all__ = [
    "calibrator_checks",
    "check_calibrator",
    "synthetic_data",
]
