"""The planted-case generators: the ground truth of every error-rate study must be true."""

from __future__ import annotations

import numpy as np
import pytest

from routeaudit.fixtures.synthetic import BUNDLED, make_traces
from routeaudit.simulation.cases import GENERATORS, describe_cases, generate
from routeaudit.traces import TraceSet

SHAPES = tuple(GENERATORS)


def sharpness(traces: TraceSet) -> np.ndarray:
    """A monotone function of the latent β: the largest weight of the last layer."""
    return traces.routing[:, -1].max(axis=1).astype(np.float64)


def within_decile_corr(x: np.ndarray, y: np.ndarray, c: np.ndarray, bins: int = 100) -> float:
    """Mean over fine confidence quantile bins of corr(x, y) inside the bin (fine, so that
    the confounding left inside a bin is far below the tolerance)."""
    edges = np.quantile(c, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, bins - 1)
    return float(np.mean([np.corrcoef(x[which == d], y[which == d])[0, 1]
                          for d in range(bins)]))


FIELDS = ("logits", "labels", "routing", "source_mask")


def shipped(kind: str) -> dict[str, np.ndarray]:
    """The arrays of a bundled fixture as stored (no TraceSet in between)."""
    with np.load(BUNDLED[kind], allow_pickle=False) as npz:
        return {field: npz[field] for field in FIELDS}


def assert_same_arrays(traces: TraceSet, stored: dict[str, np.ndarray], what: str) -> None:
    for field in FIELDS:
        mine = getattr(traces, field)
        assert mine.dtype == stored[field].dtype, (what, field)
        assert np.array_equal(mine, stored[field]), (what, field)


@pytest.mark.parametrize("kind", ["null", "planted", "frozen"])
def test_bundled_fixtures_are_rebuilt_bit_for_bit(kind):
    assert_same_arrays(make_traces(kind, 10_000, seed=0), shipped(kind), kind)


def test_logit_linear_is_the_model_of_the_bundled_fixtures():
    """The simulation studies and the shipped fixtures draw from the same model."""
    planted = generate("logit_linear", 10_000, effect=0.3, seed=0)
    assert_same_arrays(planted, shipped("planted"), "planted")
    # the bundled null leaves the latent out of β
    null = generate("logit_linear", 10_000, effect=0.0, seed=0, latent=0.0)
    assert_same_arrays(null, shipped("null"), "null")
    assert np.array_equal(GENERATORS["logit_linear"](10_000, effect=0.3, seed=0).routing,
                          planted.routing)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_sizes_and_determinism(shape):
    t = generate(shape, 500, effect=0.2, seed=3, n_layers=5, n_classes=3)
    assert (t.n_examples, t.n_layers, t.logits.shape[1]) == (500, 5, 3)
    probs = np.exp(t.logits.astype(np.float64))
    probs /= probs.sum(axis=1, keepdims=True)
    assert np.all((probs.max(axis=1) >= 0.1 - 1e-6) & (probs.max(axis=1) < 1))
    again = generate(shape, 500, effect=0.2, seed=3, n_layers=5, n_classes=3)
    other = generate(shape, 500, effect=0.2, seed=4, n_layers=5, n_classes=3)
    assert np.array_equal(t.routing, again.routing) and np.array_equal(t.labels, again.labels)
    assert not np.array_equal(t.routing, other.routing)
    meta = t.meta.model_dump()
    assert meta["name"] == f"synthetic-{shape}" and meta["ground_truth"].startswith(shape)
    assert "effect 0.2" in meta["ground_truth"]
    assert (meta["shape"], meta["effect"], meta["seed"]) == (shape, 0.2, 3)
    assert meta["source_families"] == {"embedding": [0], "history": [1, 2, 3, 4]}


@pytest.mark.parametrize("shape", SHAPES)
def test_effect_zero_is_a_confounded_null_and_effect_plants_signal(shape):
    n = 200_000
    null = generate(shape, n, effect=0.0, seed=1)
    conf = np.exp(null.logits.astype(np.float64)).max(axis=1) / np.exp(
        null.logits.astype(np.float64)).sum(axis=1)
    correct = (null.logits.argmax(axis=1) == null.labels).astype(np.float64)
    r = sharpness(null)
    # Y ⟂ R | C: no correlation of routing with correctness inside confidence deciles ...
    assert abs(within_decile_corr(r, correct, conf)) < 0.01
    # ... while routing depends strongly on confidence
    if shape == "quadratic":
        mid = (conf > np.quantile(conf, 0.4)) & (conf < np.quantile(conf, 0.6))
        ends = (conf < np.quantile(conf, 0.05)) | (conf > np.quantile(conf, 0.95))
        assert abs(r[ends].mean() - r[mid].mean()) > 0.05
    else:
        assert abs(np.corrcoef(r, conf)[0, 1]) > 0.3
    planted = generate(shape, n, effect=0.3, seed=1)
    correct = (planted.logits.argmax(axis=1) == planted.labels).astype(np.float64)
    assert abs(within_decile_corr(sharpness(planted), correct, conf)) > 0.03


def test_capacity_shape_is_a_steep_nonlinear_accuracy_curve():
    t = generate("capacity", 100_000, effect=0.0, seed=2)
    probs = np.exp(t.logits.astype(np.float64))
    conf = probs.max(axis=1) / probs.sum(axis=1)
    correct = t.logits.argmax(axis=1) == t.labels
    low, high = correct[conf < 0.5].mean(), correct[conf > 0.8].mean()
    assert low < 0.25 and high > 0.8  # far from the identity map: a linear map cannot fit it


def test_bad_arguments_and_descriptions():
    with pytest.raises(ValueError, match="unknown shape"):
        generate("spiral", 10, effect=0.0, seed=0)
    with pytest.raises(ValueError, match="effect"):
        generate("step", 10, effect=-0.1, seed=0)
    with pytest.raises(ValueError, match="n_layers"):
        generate("step", 10, effect=0.0, seed=0, n_layers=1)
    assert [name for name, _ in describe_cases()] == list(SHAPES)
