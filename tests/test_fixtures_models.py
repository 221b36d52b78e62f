"""Trained fixtures: checkpoints load with safetensors, adapters yield valid traces, routing behaves."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from routeaudit import ForwardOutput, TraceSet
from routeaudit.model.adapter import find_adapters
from routeaudit.model.intervention import RoutingIntervention
from routeaudit.session.plugins import import_user_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DIGITS = {
    "full": FIXTURES / "digits" / "full_adapter.py",
    "block": FIXTURES / "digits" / "block_adapter.py",
    "constant": FIXTURES / "digits" / "constant_source_adapter.py",
    "wrapped": FIXTURES / "wrapped" / "adapter.py",
}
CHARLM = FIXTURES / "charlm" / "adapter.py"
CHECKPOINTS = [FIXTURES / "digits" / f"{v}.safetensors" for v in ("full", "block", "vanilla")] + [
    FIXTURES / "wrapped" / "wrapped.safetensors", FIXTURES / "charlm" / "charlm.safetensors"]


def adapter_from(path: Path):
    found = find_adapters(import_user_file(path))
    assert len(found) == 1, f"{path.name} registers {found}"
    return found[0]()


def collect(adapter, model, max_batches: int | None = None) -> TraceSet:
    """Concatenate ForwardOutputs into a TraceSet, as extraction does."""
    outs = []
    with torch.inference_mode():
        for batch in itertools.islice(adapter.batches(adapter.split), max_batches):
            out = adapter.forward(model, batch)
            assert isinstance(out, ForwardOutput)
            outs.append([t.numpy() for t in out[:3]])
    logits, labels, routing = (np.concatenate(parts) for parts in zip(*outs, strict=True))
    return TraceSet(logits, labels, routing, source_mask=adapter.source_mask, meta=adapter.meta)


def first_logits(adapter, model, intervention: RoutingIntervention | None = None) -> torch.Tensor:
    batch = next(iter(adapter.batches(adapter.split)))
    with torch.inference_mode():
        if intervention is None:
            return adapter.forward(model, batch).logits
        with adapter.intervene(model, intervention):
            return adapter.forward(model, batch).logits


@pytest.fixture(scope="module")
def digits():
    """Adapter, model and full-pass traces of every digits-based fixture."""
    out = {}
    for key, path in DIGITS.items():
        adapter = adapter_from(path)
        model = adapter.load("cpu")
        out[key] = (adapter, model, collect(adapter, model))
    return out


@pytest.fixture(scope="module")
def charlm():
    adapter = adapter_from(CHARLM)
    return adapter, adapter.load("cpu")


# --------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.name)
def test_checkpoints_are_small_safetensors(path):
    assert path.exists(), f"{path} missing: run its train.py"
    assert path.stat().st_size < 2_000_000
    assert path.read_bytes()[:1] != b"\x80"  # not a pickle
    tensors = load_file(str(path))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("path", [*DIGITS.values(), CHARLM], ids=lambda p: p.parent.name + "/" + p.name)
def test_declared_checkpoint_is_relative_to_the_adapter_file(path):
    checkpoint = path.parent / type(adapter_from(path)).checkpoint
    assert checkpoint.is_file()
    assert (checkpoint.parent / "train.py").is_file()  # the script that re-creates it


# --------------------------------------------------------------------- digits
@pytest.mark.parametrize("key", list(DIGITS))
def test_digits_traces_are_valid_and_large(digits, key):
    adapter, _, traces = digits[key]
    assert traces.n_examples == 10_000 and traces.n_classes == 10
    meta = traces.meta
    assert meta.name == adapter.name and meta.family.startswith("attnres-")
    assert len(meta.layer_types) == len(meta.layer_depth) == traces.n_layers
    assert meta.source_families["embedding"] == [0]
    assert np.array_equal(traces.source_mask, adapter.source_mask)


@pytest.mark.parametrize("key", list(DIGITS))
def test_digits_eval_accuracy_is_in_the_band(digits, key):
    _, _, traces = digits[key]
    accuracy = float((traces.logits.argmax(1) == traces.labels).mean())
    assert 0.6 <= accuracy <= 0.8


def test_digits_clean_accuracy_is_high(digits):
    from routeaudit.fixtures.digits import data

    _, _, held, labels = data.split()
    _, model, _ = digits["full"]
    with torch.inference_mode():
        logits, _ = model(torch.from_numpy(data.to_tokens(held)))
    assert (logits.argmax(1).numpy() == labels).mean() >= 0.95


@pytest.mark.parametrize("key", ["full", "block"])
def test_trained_routing_is_content_dependent(digits, key):
    _, _, traces = digits[key]
    multi = traces.source_mask.sum(axis=1) > 1
    spread = traces.routing[:, multi].std(axis=0).max(axis=-1)  # per site, largest per-source std
    assert np.all(spread > 0.01)


def test_wrapped_routing_equals_its_schedule(digits):
    _, _, traces = digits["wrapped"]
    schedule = np.asarray(traces.meta.schedule)
    assert schedule.shape == (traces.n_layers, traces.n_sources)
    assert np.abs(traces.routing - schedule[None]).max() < 1e-6
    current = traces.meta.source_families["current"][0]
    assert schedule[:, current].tolist() == pytest.approx(
        [np.exp(3) / (np.exp(3) + 1 + layer) for layer in (0, 0, 1, 1, 2, 2, 3, 3)], abs=1e-6)


@pytest.mark.parametrize(("key", "iv"), [
    ("full", RoutingIntervention("mask", sublayer="mlp", family="embedding")),
    ("block", RoutingIntervention("mask", family="history")),
    ("wrapped", RoutingIntervention("mask", family="current")),
    ("block", RoutingIntervention("mean", sublayer="attn", weights=np.tile(np.eye(1, 6), (9, 1)))),
])
def test_intervene_changes_the_output(digits, key, iv):
    adapter, model, _ = digits[key]
    clean, ablated = first_logits(adapter, model), first_logits(adapter, model, iv)
    assert (clean - ablated).abs().max() > 1e-2
    assert torch.equal(first_logits(adapter, model), clean)  # the context manager restored routing


def test_constant_source_has_mass_but_no_effect(digits):
    adapter, model, traces = digits["constant"]
    block_traces = digits["block"][2]
    constant = traces.meta.source_families["constant"]
    assert traces.routing[..., constant].mean() > 0.3
    # same predictions as the Block model it extends, up to the RMSNorm epsilon
    assert (traces.logits.argmax(1) == block_traces.logits.argmax(1)).mean() > 0.999
    assert np.abs(softmax(traces.logits) - softmax(block_traces.logits)).max() < 1e-2
    batch = next(iter(adapter.batches(adapter.split)))
    clean = mean_nll(adapter, model, batch)
    for renormalize in (True, False):
        iv = RoutingIntervention("mask", family="constant", renormalize=renormalize)
        assert abs(mean_nll(adapter, model, batch, iv) - clean) < 1e-3
    for family in ("embedding", "history", "current"):
        assert mean_nll(adapter, model, batch, RoutingIntervention("mask", family=family)) - clean > 0.05


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def mean_nll(adapter, model, batch, intervention: RoutingIntervention | None = None) -> float:
    with torch.inference_mode():
        if intervention is None:
            out = adapter.forward(model, batch)
        else:
            with adapter.intervene(model, intervention):
                out = adapter.forward(model, batch)
    return float(torch.nn.functional.cross_entropy(out.logits, out.labels))


# --------------------------------------------------------------------- charlm
def test_charlm_declares_token_level_traces(charlm):
    adapter, _ = charlm
    assert adapter.per_token and adapter.meta["per_token"]
    assert adapter.n_tokens() >= 100_000 and adapter.meta["n_tokens"] == adapter.n_tokens()
    windows = torch.cat([b["window"] for b in adapter.batches("eval")])
    assert torch.equal(windows, torch.arange(len(windows))) and len(windows) * 128 == adapter.n_tokens()


def test_charlm_batches_make_valid_traces(charlm):
    adapter, model = charlm
    traces = collect(adapter, model, max_batches=2)
    assert traces.n_examples == 2 * adapter.windows_per_batch * 128
    assert traces.meta.family == "attnres-block" and traces.meta.per_token
    assert traces.routing.shape[1:] == (9, 6)
    batch = next(iter(adapter.batches("eval")))
    with torch.inference_mode():
        out = adapter.forward(model, batch)
    assert torch.equal(out.group, torch.arange(adapter.windows_per_batch).repeat_interleave(128))
    assert torch.equal(out.labels[:127], batch["ids"][0, 1:128])  # labels are the next characters
    accuracy = float((traces.logits.argmax(1) == traces.labels).mean())
    assert 0.45 <= accuracy <= 0.8
    assert traces.routing[:, 1:].std(axis=0).max() > 0.01  # routing depends on the token
    iv = RoutingIntervention("mask", sublayer="mlp", family="embedding")
    clean, ablated = first_logits(adapter, model), first_logits(adapter, model, iv)
    assert (clean - ablated).abs().max() > 1e-2
