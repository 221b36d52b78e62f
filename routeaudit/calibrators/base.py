"""The calibrator contract: a scikit-learn style base class, ``clone`` and registration.

A calibrator maps the features it declares to P(correct of the top-label prediction)::

    cal = factory()                 # fresh, unfitted; parameters only in __init__
    cal.fit(X, y)                   # -> self; X float [n, d], y in {0, 1}
    p = cal.predict(X_new)          # -> float array [m] in [0, 1]

Rules (the same as scikit-learn's, so twins can be made with :func:`clone`):

* ``__init__`` stores its arguments unchanged under the same names and does nothing else;
  no validation happens there.
* Everything learned by ``fit`` lives in attributes whose names end in ``_``.
* ``predict`` before ``fit`` raises :class:`NotFittedError`.

What users register is a *factory*, a zero-argument callable returning a fresh calibrator,
marked with :func:`calibrator` to declare which routing features its columns are.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Attribute set on a registered factory by :func:`calibrator`.
CALIBRATOR_MARK = "__routeaudit_calibrator__"


class NotFittedError(ValueError):
    """``predict`` (or another method needing learned state) was called before ``fit``."""


@dataclass(frozen=True)
class CalibratorSpec:
    """A registered calibrator factory and the features its input columns are.

    ``features`` are routing-summary names (``"confidence"``, ``"depth_variance"``,
    ``"r_agg"``, ``"predictive_entropy"``, ...), ``"logits"`` (the K logit columns) or
    ``"profile"`` (the H_1..H_L columns), in column order. They are stored as a tuple.
    """

    name: str
    features: tuple[str, ...]
    factory: Callable[[], Any]

    def make(self) -> Any:
        """A fresh, unfitted calibrator from the factory."""
        return self.factory()


def calibrator(features: Sequence[str], name: str | None = None) -> Callable[[Any], Any]:
    """Mark a zero-argument factory as a calibrator with the given input features.

    Sets ``factory.__routeaudit_calibrator__ = CalibratorSpec(name, features, factory)`` and
    returns the factory unchanged::

        @routeaudit.calibrator(["confidence", "depth_variance"], name="ar_condcal")
        def my_calibrator():
            return NadarayaWatson(bandwidth="cv_nll")

    ``name`` defaults to the factory's ``__name__``.
    """
    if isinstance(features, str):
        raise TypeError(f"features must be a list of names, not the string {features!r}")
    feats = tuple(features)
    if not feats or not all(isinstance(f, str) and f for f in feats):
        raise ValueError(
            f"features must be a non-empty list of non-empty strings, got {features!r}"
        )

    def mark(factory: Any) -> Any:
        if not callable(factory):
            raise TypeError(f"@calibrator must decorate a zero-argument callable, not {factory!r}")
        spec_name = name if name is not None else getattr(factory, "__name__", repr(factory))
        setattr(factory, CALIBRATOR_MARK, CalibratorSpec(spec_name, feats, factory))
        return factory

    return mark


def spec_of(obj: Any) -> CalibratorSpec | None:
    """The :class:`CalibratorSpec` of a spec or a marked factory; ``None`` otherwise."""
    if isinstance(obj, CalibratorSpec):
        return obj
    spec = getattr(obj, CALIBRATOR_MARK, None)
    return spec if isinstance(spec, CalibratorSpec) else None


def find_calibrators(namespace: Any) -> list[CalibratorSpec]:
    """The specs of every marked factory in a module (or a dict), in definition order."""
    items: Iterable[Any] = (
        namespace.values() if isinstance(namespace, dict) else vars(namespace).values()
    )
    out: list[CalibratorSpec] = []
    for obj in items:
        spec = spec_of(obj)
        if spec is not None and spec.factory is obj and spec not in out:
            out.append(spec)
    return out


class BaseCalibrator:
    """Base class giving ``get_params``/``set_params``/``__repr__``/``with_setting``.

    Parameters are discovered from the ``__init__`` signature (no ``*args``/``**kwargs``),
    exactly as scikit-learn's ``BaseEstimator`` does.
    """

    @classmethod
    def _get_param_names(cls) -> list[str]:
        init = cls.__init__
        if init is object.__init__:
            return []
        sig = inspect.signature(init)
        names = []
        for p in sig.parameters.values():
            if p.name == "self":
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{cls.__name__}.__init__ must not take *args or **kwargs")
            names.append(p.name)
        return sorted(names)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters (and ``name__sub`` for nested calibrators if deep)."""
        out: dict[str, Any] = {}
        for key in self._get_param_names():
            value = getattr(self, key)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                for sub, sub_value in value.get_params(deep=True).items():
                    out[f"{key}__{sub}"] = sub_value
            out[key] = value
        return out

    def set_params(self, **params: Any) -> BaseCalibrator:
        """Set constructor parameters (``name__sub`` reaches nested calibrators); returns self."""
        valid = self._get_param_names()
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            head, sep, sub = key.partition("__")
            if head not in valid:
                raise ValueError(
                    f"invalid parameter {head!r} for {type(self).__name__}; valid: {valid}"
                )
            if sep:
                nested.setdefault(head, {})[sub] = value
            else:
                setattr(self, head, value)
        for head, sub_params in nested.items():
            getattr(self, head).set_params(**sub_params)
        return self

    @classmethod
    def fit_batch(cls, calibrators: Sequence[Any], Xs: Sequence[Any], ys: Sequence[Any]
                  ) -> list[Any]:
        """Fit each calibrator on its own ``(X, y)`` and return the fitted calibrators.

        A class method so that a class able to train many instances at once can: the
        calibrator study hands every instance of a class to one call (the batched MLP
        overrides it). The default fits them one by one, in order.
        """
        return [cal.fit(X, y) for cal, X, y in zip(calibrators, Xs, ys, strict=True)]

    def with_setting(self, name: str, value: Any) -> BaseCalibrator:
        """A fresh, unfitted copy with one parameter changed (for sensitivity audits)."""
        return clone(self).set_params(**{name: value})

    def __repr__(self) -> str:
        try:
            defaults = {
                k: p.default
                for k, p in inspect.signature(type(self).__init__).parameters.items()
                if p.default is not inspect.Parameter.empty
            }
        except (TypeError, ValueError):  # pragma: no cover - exotic __init__
            defaults = {}
        shown = []
        for key, value in self.get_params(deep=False).items():
            if key in defaults and _params_equal(defaults[key], value):
                continue
            shown.append(f"{key}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    # ----------------------------------------------------------------- helpers for subclasses
    def _check_fitted(self) -> None:
        check_is_fitted(self)

    def _validate_fit(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Checked float64 copies of X [n, d] and y [n]; fit sets ``n_features_in_`` last."""
        Xa = as_feature_matrix(X)
        ya = as_correctness(y, Xa.shape[0])
        return Xa, ya

    def _validate_predict(self, X: Any) -> np.ndarray:
        self._check_fitted()
        Xa = as_feature_matrix(X, name="X")
        if Xa.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {Xa.shape[1]} columns but {type(self).__name__} was fitted with "
                f"{self.n_features_in_}"
            )
        return Xa


def check_is_fitted(est: Any) -> None:
    """Raise :class:`NotFittedError` unless ``est`` has a learned attribute (``name_``)."""
    fitted = any(k.endswith("_") and not k.startswith("__") for k in vars(est))
    if not fitted:
        raise NotFittedError(
            f"This {type(est).__name__} instance is not fitted yet; call fit(X, y) before using it."
        )


def as_feature_matrix(X: Any, name: str = "X") -> np.ndarray:
    """A float64 copy of X as [n, d]; a 1-D array is one column. Rejects NaN/inf and n = 0."""
    arr = np.array(X, dtype=np.float64, copy=True)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr))[0, 0])
        raise ValueError(f"{name} contains NaN or inf (first at row {bad})")
    return arr


def as_correctness(y: Any, n: int) -> np.ndarray:
    """A float64 copy of the correctness labels, checked to be in {0, 1} and of length n."""
    arr = np.array(y, dtype=np.float64, copy=True).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"y has {arr.shape[0]} entries but X has {n} rows")
    bad = ~((arr == 0.0) | (arr == 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"y must be correctness in {{0, 1}}; y[{i}] = {arr[i]!r}")
    return arr


def clone(est: Any) -> Any:
    """A fresh, unfitted calibrator with the same parameters (deep-copied unless calibrators).

    Works on any object with ``get_params(deep=False)`` whose constructor accepts those
    parameters by name, exactly like ``sklearn.base.clone``.
    """
    if isinstance(est, (list, tuple)):
        return type(est)(clone(e) for e in est)
    if not hasattr(est, "get_params") or isinstance(est, type):
        return copy.deepcopy(est)
    params = est.get_params(deep=False)
    new_params = {
        k: clone(v) if hasattr(v, "get_params") and not isinstance(v, type) else copy.deepcopy(v)
        for k, v in params.items()
    }
    new = type(est)(**new_params)
    got = new.get_params(deep=False)
    for k in new_params:
        if got[k] is not new_params[k]:
            raise RuntimeError(
                f"cannot clone {type(est).__name__}: its __init__ does not store parameter "
                f"{k!r} unchanged"
            )
    return new


def _params_equal(a: Any, b: Any) -> bool:
    """Equality for parameter values (arrays, tuples, nested calibrators, NaN-safe)."""
    if a is b:
        return True
    if hasattr(a, "get_params") and hasattr(b, "get_params"):
        return type(a) is type(b) and _params_equal(
            a.get_params(deep=False), b.get_params(deep=False)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        try:
            return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))
        except TypeError:
            return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_params_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_params_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - objects with odd __eq__
        return False


def params_equal(a: Any, b: Any) -> bool:
    """Public alias of the parameter equality used by ``clone`` checks."""
    return _params_equal(a, b)
