"""Synthetic models with a planted effect of known size, for simulation studies.

Every case has a top-label confidence c, a correctness draw y and a latent routing
"sharpness" β. Routing at layer l is ``softmax(β · w_l)`` over that layer's valid sources (a
ragged, Full-AttnRes-like mask: layer l sees l + 1 sources), so every routing summary is a
monotone function of β, and logits are built so that their softmax has top-label
probability exactly c. A latent u ~ U(0, 1) enters β; at fixed confidence P(correct) moves by
``effect · (u − ½)``. With ``effect = 0`` correctness depends on confidence only, so
Y ⟂ routing | confidence holds exactly while routing still tracks confidence: a
*confounded null*. The shapes differ in how routing is confounded with confidence:

* ``logit_linear``: log β linear in logit(c), the model of the bundled fixtures.
* ``quadratic``: log β grows with (logit c − m)², so routing is sharpest at both ends of the
  confidence range: a non-monotone confounder that a linear adjustment for c would miss.
* ``step``: log β jumps at c = 0.7: a discontinuous confounder that coarse bins straddle.
* ``capacity``: P(correct | c) is a steep sigmoid of c (a miscalibration curve that only a
  flexible calibrator fits), routing log-linear in logit(c): the case where a calibrator's
  gain over a linear map is capacity, not routing (with ``effect > 0`` the routing term is
  planted on top).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from routeaudit.traces import TraceSet

__all__ = ["GENERATORS", "describe_cases", "generate", "traces_from_core"]


def confidence_draw(rng: np.random.Generator, n: int) -> np.ndarray:
    """Top-label confidences in [0.1, 1), skewed high as a trained classifier's are."""
    return 0.1 + 0.9 * rng.beta(4.0, 1.5, size=n)


def logit(c: np.ndarray) -> np.ndarray:
    return np.log(c / (1 - c + 1e-12))


def traces_from_core(c: np.ndarray, y: np.ndarray, beta: np.ndarray, rng: np.random.Generator,
                     *, n_layers: int, n_classes: int, meta: dict[str, Any]) -> TraceSet:
    """Logits with top-label probability exactly c on a random predicted class (the label is
    that class where y, another one otherwise) and routing ``softmax(β · w_l)``."""
    if n_layers < 2 or n_classes < 2:
        raise ValueError(f"need n_layers >= 2 and n_classes >= 2, got {n_layers}, {n_classes}")
    n = c.size
    predicted = rng.integers(0, n_classes, size=n)
    rest = (1 - c) / (n_classes - 1)
    probs = np.repeat(rest[:, None], n_classes, axis=1)
    probs[np.arange(n), predicted] = c
    logits = np.log(probs).astype(np.float32)
    wrong = (predicted + rng.integers(1, n_classes, size=n)) % n_classes
    labels = np.where(y, predicted, wrong)
    mask = np.tril(np.ones((n_layers, n_layers), dtype=bool))  # layer l sees sources 0..l
    scores = rng.standard_normal((n_layers, n_layers)) * 1.5
    z = beta[:, None, None] * np.where(mask, scores, -np.inf)[None]
    z -= z.max(axis=2, keepdims=True)
    routing = np.exp(z)
    routing /= routing.sum(axis=2, keepdims=True)
    meta = {"family": "synthetic",
            "source_families": {"embedding": [0], "history": list(range(1, n_layers))}, **meta}
    return TraceSet(logits, labels, routing.astype(np.float32), source_mask=mask, meta=meta)


def _confounder(shape: str, c: np.ndarray, confound: float) -> np.ndarray:
    """The part of log β that depends on confidence only."""
    if shape in ("logit_linear", "capacity"):
        return confound * (logit(c) - 1.5) / 2
    if shape == "quadratic":
        return confound * ((logit(c) - 1.5) ** 2 / 4 - 0.5)
    if shape == "step":
        return confound * 1.5 * ((c > 0.7) - 0.5)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(GENERATORS)}")


def _accuracy(shape: str, c: np.ndarray, miscalibration: float) -> np.ndarray:
    """P(correct | c) before the planted term."""
    if shape == "capacity":
        return 0.05 + 0.9 / (1 + np.exp(-14.0 * (c - 0.65)))
    return c**miscalibration


def generate(shape: str, n: int, *, effect: float, seed: int, n_layers: int = 4,
             n_classes: int = 10, confound: float = 1.5, miscalibration: float = 1.3) -> TraceSet:
    """One synthetic model of the given shape (see the module docstring)."""
    if shape not in GENERATORS:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(GENERATORS)}")
    if not effect >= 0:
        raise ValueError(f"effect must be >= 0, got {effect}")
    rng = np.random.default_rng(seed)
    c = confidence_draw(rng, n)
    u = rng.random(n)
    noise = 0.3 * rng.standard_normal(n)
    log_beta = _confounder(shape, c, confound) + 1.5 * (u - 0.5) + noise
    p = np.clip(_accuracy(shape, c, miscalibration) - effect * (u - 0.5), 0.0, 1.0)
    y = rng.random(n) < p
    truth = ("Y independent of R given C (confounded null)" if effect == 0 else
             f"routing-conditional miscalibration, effect {effect:g}")
    meta = {"name": f"synthetic-{shape}", "seed": seed,
            "ground_truth": f"{shape} confounding; {truth}"}
    return traces_from_core(c, y, np.exp(log_beta), rng, n_layers=n_layers,
                            n_classes=n_classes, meta=meta)


GENERATORS: dict[str, Callable[..., TraceSet]] = {
    shape: (lambda n, *, shape=shape, **kw: generate(shape, n, **kw))
    for shape in ("logit_linear", "quadratic", "step", "capacity")
}


def describe_cases() -> list[tuple[str, str]]:
    """(shape, one line) for printing."""
    return [("logit_linear", "log β linear in logit(c) (the bundled fixtures' model)"),
            ("quadratic", "log β quadratic in logit(c): sharpest routing at both ends"),
            ("step", "log β jumps at c = 0.7"),
            ("capacity", "P(correct | c) a steep sigmoid; routing log-linear in logit(c)")]
