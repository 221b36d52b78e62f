"""Synthetic models with a planted effect of known size, for simulation studies.

Every case has a top-label confidence c, a correctness draw y and a latent routing
"sharpness" β. Routing at layer l is ``softmax(β · w_l)`` over that layer's valid sources (a
ragged, Full-AttnRes-like mask: layer l sees l + 1 sources), so every routing summary is a
monotone function of β, and logits are built so that their softmax has top-label
probability exactly c. A latent u ~ U(0, 1) enters log β with weight ``latent``; at fixed
confidence P(correct) moves by ``effect · (u − ½)``. With ``effect = 0`` correctness depends
on confidence only, so Y ⟂ routing | confidence holds exactly while routing still tracks
confidence: a *confounded null*. An audit must not pass there, whatever the shape. With
``effect > 0`` the routing-conditional miscalibration is real, and an audit should find it.
The shapes differ in how routing is confounded with confidence:

``logit_linear``: log β linear in logit(c), P(correct | c) = c ** 1.3. This is the model of
the bundled fixtures (``fixtures/synthetic.py`` draws through :func:`sample_case`). It tests
the baseline: a matched-confidence audit must remove a smooth, monotone confounder.

``quadratic``: log β grows with (logit c − m)², so routing is sharpest at both ends of the
confidence range. It tests a non-monotone confounder: adjusting linearly for c (or using a
single routing-vs-confidence slope) leaves the confounding in place, and matching within
confidence bins does not.

``step``: log β jumps at c = 0.7, plus noise. It tests a discontinuous confounder: a bin
that straddles the jump mixes two routing regimes with different accuracy, so coarse
binning leaves residual confounding.

``capacity``: P(correct | c) is a steep sigmoid of c (a miscalibration curve far from any
linear map), and routing is log-linear in logit(c). A flexible calibrator gains over a
linear one from confidence alone, so this is the capacity-only null of the calibrator
audits: a gain that is capacity, not routing. With ``effect > 0`` the routing term is
planted on top.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from routeaudit.traces import TraceSet

__all__ = ["GENERATORS", "SHAPES", "describe_cases", "generate", "sample_case", "traces_from_core"]


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
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _accuracy(shape: str, c: np.ndarray, miscalibration: float) -> np.ndarray:
    """P(correct | c) before the planted term."""
    if shape == "capacity":
        return 0.05 + 0.9 / (1 + np.exp(-14.0 * (c - 0.65)))
    return c**miscalibration


def sample_case(shape: str, n: int, rng: np.random.Generator, *, effect: float,
                confound: float = 1.5, miscalibration: float = 1.3, latent: float = 1.5
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence c, correctness y and routing sharpness β of one case.

    The draws come in a fixed order (c, u, noise, y), so a seed gives the same case in every
    release and the bundled fixtures can be rebuilt bit for bit. ``latent = 0`` leaves u out
    of β, which is how the bundled null was drawn.
    """
    c = confidence_draw(rng, n)
    u = rng.random(n)
    noise = 0.3 * rng.standard_normal(n)
    log_beta = _confounder(shape, c, confound) + latent * (u - 0.5) + noise
    p = np.clip(_accuracy(shape, c, miscalibration) - effect * (u - 0.5), 0.0, 1.0)
    y = rng.random(n) < p
    return c, y, np.exp(log_beta)


def generate(shape: str, n: int, *, effect: float, seed: int, n_layers: int = 4,
             n_classes: int = 10, confound: float = 1.5, miscalibration: float = 1.3,
             latent: float = 1.5) -> TraceSet:
    """One synthetic model of the given shape (see the module docstring); ``meta`` records
    the shape, effect, seed and the ground truth a study scores against."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if not effect >= 0:
        raise ValueError(f"effect must be >= 0, got {effect}")
    rng = np.random.default_rng(seed)
    c, y, beta = sample_case(shape, n, rng, effect=effect, confound=confound,
                             miscalibration=miscalibration, latent=latent)
    truth = ("Y independent of R given C (confounded null)" if effect == 0 else
             f"routing-conditional miscalibration, effect {effect:g}")
    meta = {"name": f"synthetic-{shape}", "seed": seed, "shape": shape, "effect": float(effect),
            "ground_truth": f"{shape} confounding; {truth}"}
    return traces_from_core(c, y, beta, rng, n_layers=n_layers, n_classes=n_classes, meta=meta)


_DESCRIPTIONS = {
    "logit_linear": "log β linear in logit(c) (the bundled fixtures' model)",
    "quadratic": "log β quadratic in logit(c): sharpest routing at both ends",
    "step": "log β jumps at c = 0.7",
    "capacity": "P(correct | c) a steep sigmoid; routing log-linear in logit(c)",
}
#: The shape names, in the order they are documented and simulated.
SHAPES: tuple[str, ...] = tuple(_DESCRIPTIONS)
#: ``GENERATORS[shape](n, effect=, seed=, ...)`` is ``generate(shape, n, ...)``.
GENERATORS: dict[str, Callable[..., TraceSet]] = {shape: partial(generate, shape) for shape in SHAPES}


def describe_cases() -> list[tuple[str, str]]:
    """(shape, one line) for printing."""
    return list(_DESCRIPTIONS.items())
