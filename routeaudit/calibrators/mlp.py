"""The full-vector MLP calibrator of docs/methods.md §2.7 (the estimator; no torch here).

Why a module of its own: the estimator and its registered factory ``mlp_profile`` are what
the rest of the package touches (the registry, the contract checks, predictions), and none
of that needs torch. Training is :mod:`routeaudit.calibrators.mlp_training`, imported the
first time a model is fitted; ``predict`` is a float64 numpy forward pass of the stored
float32 weights (with ``scipy.special.expit``), so a fitted model predicts without torch.

Architecture and training (defaults; all are ``__init__`` parameters):

* input standardised with the fit data's mean and standard deviation (ddof=0); a column
  with zero variance becomes 0 (so a capacity twin with zeroed routing columns sees
  nothing from them);
* ``[d → 64 → 64 → 1]``, ReLU, sigmoid output, binary cross-entropy;
* Adam (lr 1e-3, β = (0.9, 0.999), ε = 1e-8) with L2 weight decay 1e-4 added to the
  gradient of every parameter (``torch.optim.Adam(weight_decay=...)`` semantics);
* ≤ 200 epochs of minibatches of 256 in a fresh random order each epoch; early stopping
  on a random 20% validation split of the fit data (patience 10 epochs without a strict
  decrease of the validation BCE; the best weights are restored);
* ``restarts`` independent initialisations (PyTorch's ``nn.Linear`` default,
  U(±1/√fan_in)) and minibatch orders on the same split; the restart with the lowest
  best validation loss is kept.

:func:`fit_many` trains many such models — e.g. 3 seeds × 4 control variants × 3 restarts
— as one batched model, bit for bit what each gets trained alone (see
:mod:`routeaudit.calibrators.mlp_training`). ``MLPCalibrator.fit`` is ``fit_many`` with one
model. ``random_state=None`` draws fresh entropy (not reproducible), as in scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from routeaudit.calibrators.base import BaseCalibrator, calibrator


class MLPCalibrator(BaseCalibrator):
    """Full-vector MLP calibrator, ``[d → 64 → 64 → 1]`` (see the module docstring).

    X: the columns it is given (e.g. confidence then H_1..H_L). Learned: ``mean_``,
    ``scale_``, ``active_columns_``, ``coefs_``/``intercepts_`` (per layer, [in, out]),
    ``best_val_loss_``, ``best_epoch_``, ``n_epochs_``, ``restart_val_losses_``,
    ``restart_n_epochs_``,
    ``selected_restart_``, ``n_parameters_``.
    """

    def __init__(
        self,
        hidden_layer_sizes=(64, 64),
        lr=1e-3,
        weight_decay=1e-4,
        max_epochs=200,
        patience=10,
        batch_size=256,
        val_fraction=0.2,
        restarts=3,
        random_state=0,
        device="cpu",
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.restarts = restarts
        self.random_state = random_state
        self.device = device

    def fit(self, X, y) -> MLPCalibrator:
        params = self.get_params(deep=False)
        params.pop("random_state")
        fitted = fit_many([X], [y], [self.random_state], **params)[0]
        for key, value in vars(fitted).items():
            if key.endswith("_"):
                setattr(self, key, value)
        return self

    @classmethod
    def fit_batch(cls, calibrators, Xs, ys) -> list[MLPCalibrator]:
        """Train the instances with equal parameters (but for ``random_state``) and input
        width as one batched model each (:func:`fit_many`); bit for bit the same as one by one."""
        groups: dict[tuple, list[int]] = {}
        for i, (cal, X) in enumerate(zip(calibrators, Xs, strict=True)):
            params = cal.get_params(deep=False)
            params.pop("random_state")
            key = (repr(sorted(params.items())), np.shape(X)[1] if np.ndim(X) == 2 else 1)
            groups.setdefault(key, []).append(i)
        out: list[MLPCalibrator | None] = [None] * len(calibrators)
        for members in groups.values():
            params = calibrators[members[0]].get_params(deep=False)
            params.pop("random_state")
            fitted = fit_many([Xs[i] for i in members], [ys[i] for i in members],
                              [calibrators[i].random_state for i in members], **params)
            for i, model in zip(members, fitted, strict=True):
                out[i] = model
        return out  # type: ignore[return-value]

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        Z = (X - self.mean_) / self.scale_
        Z[:, ~self.active_columns_] = 0.0
        return Z

    def predict(self, X) -> np.ndarray:
        """float64 numpy forward pass of the stored weights (no torch), sigmoid output."""
        from scipy.special import expit

        Xa = self._validate_predict(X)
        h = self._standardize(Xa)
        n_layers = len(self.coefs_)
        for k, (W, b) in enumerate(zip(self.coefs_, self.intercepts_, strict=True)):
            h = h @ W.astype(np.float64) + b.astype(np.float64)
            if k < n_layers - 1:
                h = np.maximum(h, 0.0)
        return expit(h[:, 0])


def fit_many(
    Xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], seeds: Sequence[int | None], **params
) -> list[MLPCalibrator]:
    """Train ``len(Xs)`` independent :class:`MLPCalibrator` models at once.

    Model i is ``MLPCalibrator(**params, random_state=seeds[i]).fit(Xs[i], ys[i])``: the same
    result (to float rounding) as training it alone, but all models × restarts are one
    batched network. Every X must have the same number of columns; the numbers of rows
    may differ (shorter models are padded and masked). Deterministic on CPU given seeds.

    Training is :func:`routeaudit.calibrators.mlp_training.fit_templates` (compiled on CPU,
    batched torch on GPUs), imported on the first call that has models to train.
    """
    if not (len(Xs) == len(ys) == len(seeds)):
        raise ValueError(f"Xs, ys and seeds differ in length: {len(Xs)}, {len(ys)}, {len(seeds)}")
    if "random_state" in params:
        raise TypeError("fit_many takes one seed per model in `seeds`, not random_state")
    templates = [MLPCalibrator(**params, random_state=s) for s in seeds]
    if not templates:
        return []
    from routeaudit.calibrators.mlp_training import fit_templates

    return fit_templates(templates, Xs, ys)


# --------------------------------------------------------------------------- registrations
@calibrator(["confidence", "profile"], name="mlp_profile")
def mlp_profile() -> MLPCalibrator:
    """The full-vector MLP over (c, H_1..H_L) of docs/methods.md §2.7."""
    return MLPCalibrator()
