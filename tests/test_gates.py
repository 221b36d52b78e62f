"""routeaudit.model.gates on a hand-written MoE (nn.Linear gates, softmax + top-k in the block).

Every expected value comes from an independent by-hand computation: the routing from the
gate weights applied to hand-propagated hidden states, re-routing from a sort that skips the
removed expert (not from −∞ logits), the dense mixture from an explicit mean over experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from routeaudit.errors import AdapterError
from routeaudit.model.extract import ModelSession, extract_traces
from routeaudit.model.gates import (
    GatedAdapter,
    LogitsGate,
    RouterCapture,
    find_routers,
    plan_sites,
    uniform_routing,
)
from routeaudit.model.intervention import RoutingIntervention, apply_to_weights

torch.set_num_threads(1)
D, E, C, N = 8, 4, 3, 96


class Block(nn.Module):
    """Residual MoE block: softmax over the gate's logits, top-k, renormalised weights."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(D, E)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, index = probs.topk(self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        every = torch.stack([expert(x) for expert in self.experts], dim=1)  # [N, E, D]
        picked = every.gather(1, index[..., None].expand(-1, -1, D))
        return x + (weights[..., None] * picked).sum(dim=1)


class MoEClassifier(nn.Module):
    def __init__(self, k: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([Block(k), Block(k)])
        for block in self.blocks:
            nn.init.normal_(block.gate.weight, std=2.0)  # well-separated choices: no near-ties
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


# ---- the example from the issue: an adapter for a hand-written MoE in <= 20 lines
class ToyAdapter(GatedAdapter):
    name = "toy-moe"
    routers = ("blocks.0.gate", "blocks.1.gate")
    gate_rule = LogitsGate("softmax", top_k=2)
    k = 2

    def load(self, device: Any) -> MoEClassifier:
        return MoEClassifier(self.k).to(device).eval()

    def batches(self, split: str) -> Iterator[dict[str, torch.Tensor]]:
        x, y = data()
        for start in range(0, N, 32):
            yield {"x": x[start:start + 32], "y": y[start:start + 32]}

    def predict(self, model: MoEClassifier, batch: dict[str, torch.Tensor]) -> Any:
        return model(batch["x"]), batch["y"]


def by_hand(model: MoEClassifier, x: torch.Tensor, *, skip: tuple[int, int] | None = None,
            fixed: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, list, list]:
    """Logits, per-layer routing (softmax of the gate) and per-layer chosen experts, computed
    token by token. ``skip = (layer, expert)``: walk that layer's experts in order of
    preference and take the first k that are not ``expert``; ``fixed[layer]``: mix every
    expert with those weights."""
    routing, chosen = [], []
    h = x
    for layer, block in enumerate(model.blocks):
        probs = torch.softmax(h @ block.gate.weight.T + block.gate.bias, dim=-1)
        routing.append(probs)
        out = torch.zeros_like(h)
        picks = []
        for t in range(h.shape[0]):
            if fixed is not None and layer in fixed:
                w = fixed[layer]
                out[t] = sum(w[e] * block.experts[e](h[t]) for e in range(E))
                continue
            order = [int(e) for e in torch.argsort(probs[t], descending=True)]
            if skip is not None and skip[0] == layer:
                order = [e for e in order if e != skip[1]]
                p = probs[t].clone()
                p[skip[1]] = 0
            else:
                p = probs[t]
            keep = order[:block.k]
            picks.append(sorted(keep))
            total = sum(float(p[e]) for e in keep)
            out[t] = sum(float(p[e]) / total * block.experts[e](h[t]) for e in keep)
        chosen.append(picks)
        h = h + out
    return model.head(h), routing, chosen


def test_adapter_traces_match_the_hand_computed_routing():
    adapter = ToyAdapter()
    traces = extract_traces(adapter, cache=False, progress=False)
    model = adapter.load("cpu")
    x, y = data()
    with torch.no_grad():
        logits, routing, _ = by_hand(model, x)
    assert traces.routing.shape == (N, 2, E)
    np.testing.assert_allclose(traces.routing, torch.stack(routing, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(traces.logits, logits.numpy(), atol=1e-5)
    np.testing.assert_array_equal(traces.labels, y.numpy())
    meta = traces.meta
    assert meta.source_kind == "experts" and meta.family == "moe"
    assert meta.source_families == {f"expert{k}": [k] for k in range(E)}
    assert meta.layer_types == ["mlp", "mlp"] and meta.layer_depth == [0, 1]
    assert meta.layer_names == ["blocks.0.gate", "blocks.1.gate"]
    assert meta.routing_mode == "soft" and meta.top_k == 2 and meta.expert_layer is None


@pytest.mark.parametrize(("layer", "expert"), [(0, 1), (1, 3)])
def test_masking_reroutes_to_the_next_choice(layer, expert):
    adapter = ToyAdapter()
    iv = RoutingIntervention(kind="mask", layers=(layer,), family=f"expert{expert}")
    x, _ = data()
    with ModelSession(adapter, cache=False, progress=False) as session:
        clean = session.traces()
        ablated = session.forward(iv)
        model = session.model
        with torch.no_grad():
            want, _, chosen = by_hand(model, x, skip=(layer, expert))
            _, _, clean_chosen = by_hand(model, x)
            # the model's own choices under the intervention, from the capture
            with adapter.intervene(model, iv), \
                    RouterCapture(model, adapter.routers, adapter.gate_rule) as capture:
                model(x)
    got = [sorted(row) for row in capture.choices()[layer].tolist()]
    assert got == chosen[layer]
    assert all(expert not in row for row in got)
    moved = [t for t in range(N) if expert in clean_chosen[layer][t]]
    assert moved, "the planted expert should be someone's choice"
    for t in moved:  # the re-routed tokens took their (k+1)-th preference instead
        assert set(got[t]) - set(clean_chosen[layer][t])
    np.testing.assert_allclose(ablated["logits"], want.numpy(), atol=1e-5)
    assert not np.allclose(ablated["logits"], clean.logits)
    # the routing recorded under the mask is the clean routing renormalised without `expert`
    removed = np.eye(E, dtype=bool)[expert]
    sites = np.eye(2, dtype=bool)[layer]
    ref = apply_to_weights(clean.routing, iv, sites=sites, removed=removed,
                           valid=np.ones((2, E), dtype=bool))
    np.testing.assert_allclose(ablated["routing"][:, layer], ref[:, layer], atol=1e-5)


def test_interventions_leave_no_hooks_behind():
    adapter = ToyAdapter()
    model = adapter.load("cpu")
    x, _ = data()
    with torch.no_grad():
        before = model(x)
        with adapter.intervene(model, uniform_routing(2, E)):
            assert not torch.allclose(model(x), before)
        with pytest.raises(RuntimeError), adapter.intervene(
                model, RoutingIntervention(kind="mask", sources=(0,))):
            raise RuntimeError("an error inside the context")
        adapter.forward(model, {"x": x, "y": torch.zeros(N, dtype=torch.long)})
        after = model(x)
    assert all(not block.gate._forward_hooks for block in model.blocks)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_uniform_routing_of_a_dense_block_is_the_mean_of_the_experts():
    class Dense(ToyAdapter):
        k = E  # every expert, so a uniform row is really used as given
        gate_rule = LogitsGate("softmax", top_k=E)
        routers = lambda name, module: name.endswith(".gate")  # noqa: E731 (a predicate)

    adapter = Dense()
    x, _ = data()
    with ModelSession(adapter, cache=False, progress=False) as session:
        uniform = session.forward(uniform_routing(2, E))
        with torch.no_grad():
            want, _, _ = by_hand(session.model, x, fixed={0: [1 / E] * E, 1: [1 / E] * E})
    np.testing.assert_allclose(uniform["logits"], want.numpy(), atol=1e-5)
    np.testing.assert_allclose(uniform["routing"], 1 / E, atol=1e-6)


def test_expert_logits_at_the_last_layer_are_each_experts_prediction():
    class Hard(ToyAdapter):
        k = 1
        gate_rule = LogitsGate("softmax", top_k=1)
        expert_logits = True

    adapter = Hard()
    traces = extract_traces(adapter, cache=False, progress=False)
    assert traces.meta.routing_mode == "hard" and traces.meta.expert_layer == 1
    model = adapter.load("cpu")
    x, _ = data()
    with torch.no_grad():
        h = model.blocks[0](x)
        for k in range(E):
            want = model.head(h + model.blocks[1].experts[k](h))
            np.testing.assert_allclose(traces.expert_logits[:, k], want.numpy(), atol=1e-5)
    chosen = traces.routing[:, 1].argmax(axis=1)
    mine = traces.expert_logits[np.arange(N), chosen]
    np.testing.assert_allclose(mine, traces.logits, atol=1e-5)  # top-1: the chosen one is it


@settings(max_examples=25, deadline=None)
@given(removed=st.lists(st.booleans(), min_size=E, max_size=E).filter(lambda r: not all(r)),
       layers=st.sets(st.integers(0, 1), min_size=1))
def test_a_mask_renormalises_exactly_like_the_reference_semantics(removed, layers):
    """For a dense softmax gate, masking logits equals renormalising the clean weights
    (routeaudit.model.intervention.apply_to_weights), whatever the experts and sites."""
    model = MoEClassifier(k=E).eval()
    gates = [f"blocks.{i}.gate" for i in range(2)]
    rule = LogitsGate("softmax")
    x, _ = data()
    iv = RoutingIntervention(kind="mask", layers=tuple(sorted(layers)),
                             sources=tuple(np.flatnonzero(removed)))
    with torch.no_grad():
        with RouterCapture(model, gates, rule) as clean:
            model(x)
        first = min(layers)  # the first masked layer's input is untouched by the mask
        with RouterCapture.intervening(model, gates, rule, iv), \
                RouterCapture(model, gates, rule) as masked:
            model(x)
    sites = np.zeros(2, dtype=bool)
    sites[first] = True
    want = apply_to_weights(clean.routing().numpy(), iv, sites=sites,
                            removed=np.asarray(removed), valid=np.ones((2, E), dtype=bool))
    np.testing.assert_allclose(masked.routing()[:, first].numpy(), want[:, first], atol=1e-6)


def test_bad_interventions_and_router_specs_are_clear_errors():
    model = MoEClassifier()
    with pytest.raises(AdapterError, match="every one of the 4 experts"):
        plan_sites(RoutingIntervention(kind="mask", sources=(0, 1, 2, 3)), 2, E)
    with pytest.raises(AdapterError, match="shape"):
        plan_sites(RoutingIntervention(kind="mean", weights=np.ones((3, E)) / E), 2, E)
    with pytest.raises(AdapterError, match="sum to 1"):
        plan_sites(RoutingIntervention(kind="mean", weights=np.ones((2, E))), 2, E)
    with pytest.raises(AdapterError, match="unknown source family"):
        plan_sites(RoutingIntervention(kind="mask", family="nope"), 2, E)
    with pytest.raises(AdapterError, match=r"no module named 'blocks\.0\.gait'"):
        find_routers(model, ["blocks.0.gait"])
    with pytest.raises(AdapterError, match="matches the router predicate"):
        find_routers(model, lambda name, module: False)
    assert [n for n, _ in find_routers(model, lambda n, m: n.endswith(".gate"))] == [
        "blocks.0.gate", "blocks.1.gate"]
    no_renorm = RoutingIntervention(kind="mask", sources=(0,), renormalize=False)
    with pytest.raises(AdapterError, match="renormalize=False"), \
            RouterCapture.intervening(model, ["blocks.0.gate"], LogitsGate(), no_renorm):
        model(data()[0])
    assert not model.blocks[0].gate._forward_hooks
    schedule = uniform_routing(3, 5)
    assert schedule.kind == "schedule" and np.allclose(schedule.weights, 0.2)


def test_sigmoid_gates_and_fixed_weights_round_trip():
    gate = LogitsGate("sigmoid", top_k=1, n_experts=E)
    logits = torch.randn(5, E, generator=torch.Generator().manual_seed(3))
    scores = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    np.testing.assert_allclose(gate.probs(logits, nn.Identity()),
                               scores / scores.sum(1, keepdims=True), atol=1e-6)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for rule in (gate, LogitsGate("softmax")):
        fixed = rule.intervene(logits, nn.Identity(), removed=None, weights=w)
        np.testing.assert_allclose(rule.probs(fixed, nn.Identity()), w.expand(5, E), atol=1e-6)
    masked = gate.intervene(logits, nn.Identity(), removed=torch.tensor([True, False, False, True]),
                            weights=None)
    assert (gate.probs(masked, nn.Identity())[:, [0, 3]] == 0).all()
    assert gate.n_experts_of(nn.Identity()) == E and gate.is_hard(nn.Identity())


def test_predict_rows_must_line_up_with_the_routed_tokens():
    class Pooled(ToyAdapter):
        def predict(self, model: MoEClassifier, batch: dict[str, torch.Tensor]) -> Any:
            logits = model(batch["x"])
            return {"logits": logits[:-1], "labels": batch["y"][:-1]}

    class Grouped(ToyAdapter):
        def predict(self, model: MoEClassifier, batch: dict[str, torch.Tensor]) -> Any:
            keep = torch.arange(len(batch["y"])) % 2 == 0
            return {"logits": model(batch["x"]), "labels": batch["y"], "keep": keep,
                    "group": torch.arange(len(batch["y"])) // 4}

    with pytest.raises(AdapterError, match="returned 31 rows, but the routers routed 32"):
        extract_traces(Pooled(), cache=False, progress=False)
    traces = extract_traces(Grouped(), cache=False, progress=False)
    clean = extract_traces(ToyAdapter(), cache=False, progress=False)
    assert len(traces.labels) == N // 2
    np.testing.assert_array_equal(traces.group, np.tile(np.arange(16) // 2, 3))
    np.testing.assert_allclose(traces.routing, clean.routing[::2], atol=0)
