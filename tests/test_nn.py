"""Reference AttnRes modules against gold vectors, slow loops and the intervention contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from routeaudit import TraceSet
from routeaudit.model.intervention import RoutingIntervention, apply_to_weights
from routeaudit.nn import (
    BlockAttnRes,
    DepthRouter,
    FullAttnRes,
    PreNormResidual,
    WrappedAttnRes,
    block_boundaries,
    route,
    wrapped_boundaries,
    wrapped_schedule,
)

W_GOLD = [2.0, 0.0, 0.0, 0.0]


@pytest.fixture(autouse=True)
def _no_grad():
    """These tests compare values; no gradients needed."""
    with torch.no_grad():
        yield


def e(i: int, d: int = 4) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(d)]


class Constant(nn.Module):
    """A sublayer whose output is fixed; it remembers its input (the routed mixture)."""

    def __init__(self, value: list[float]) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(value, dtype=torch.float64))
        self.seen: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.seen = h.detach().clone()
        return self.value.expand_as(h)


def set_queries(model: nn.Module, query: list[float]) -> None:
    with torch.no_grad():
        for router in model.routers:
            router.query.copy_(torch.tensor(query, dtype=router.query.dtype))


def randomise_queries(model: nn.Module, seed: int, scale: float = 1.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.routers:
            router.query.copy_(scale * torch.randn(router.query.shape, generator=gen, dtype=torch.float64))


def inputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------- gold vectors (docs/methods.md §1.6)
def test_two_source_gold_vector():
    router = DepthRouter(4).double()
    set_queries(_wrap(router), W_GOLD)
    sources = torch.tensor([e(0), e(1)], dtype=torch.float64).view(2, 1, 1, 4)
    alpha, out = route(router(sources), sources, 0, (0, 1), None)
    assert alpha.flatten().tolist() == pytest.approx([0.982014, 0.017986], abs=1e-6)
    assert out.flatten().tolist() == pytest.approx([0.982014, 0.017986, 0.0, 0.0], abs=1e-6)


def _wrap(router: DepthRouter) -> nn.Module:
    holder = nn.Module()
    holder.routers = nn.ModuleList([router])
    return holder


def test_block_walk_gold_table():
    subs = [Constant(e(1)), Constant(e(2)), Constant(e(3)), Constant([0.0, 1.0, 1.0, 1.0])]
    model = BlockAttnRes(4, sublayers=subs, num_blocks=2).double()
    set_queries(model, W_GOLD)
    model.final_norm = nn.Identity()
    out = model(torch.tensor([[e(0)]], dtype=torch.float64) * 3.0)
    step_inputs = [s.seen.flatten().tolist() for s in subs]
    assert step_inputs[0] == pytest.approx([3.0, 0, 0, 0], abs=1e-12)  # step 1: only b_0
    assert step_inputs[1] == pytest.approx([2.946041, 0.017986, 0, 0], abs=1e-6)
    assert step_inputs[2] == pytest.approx([2.946041, 0.017986, 0.017986, 0], abs=1e-6)
    assert step_inputs[3] == pytest.approx([2.893989, 0.017668, 0.017668, 0.017668], abs=1e-6)
    assert out.routing[3].weights.flatten().tolist() == pytest.approx([0.964663, 0.017668, 0.017668],
                                                                      abs=1e-6)
    assert out.hidden.flatten().tolist() == pytest.approx([2.893989, 0.035337, 0.035337, 0.035337],
                                                          abs=1e-6)
    # the first sublayer of block 2 sees [b_0, b_1] only: no zero partial-sum source
    assert out.routing[2].columns == (0, 1)


def test_zero_query_gives_plain_mean_of_sources():
    sources = inputs((5, 2, 3, 8), seed=1)
    router = DepthRouter(8).double()
    alpha, out = route(router(sources), sources, 0, tuple(range(5)), None)
    assert torch.allclose(out, sources.mean(dim=0), atol=1e-6, rtol=0)
    assert torch.allclose(alpha, torch.full_like(alpha, 0.2), atol=1e-12)


@pytest.mark.parametrize("cls", [FullAttnRes, BlockAttnRes])
def test_fresh_model_routes_uniformly_over_valid_sources(cls):
    model = cls(8, 3, 2).double()
    packed = model.pack(model(inputs((2, 4, 8))).routing)
    mask = packed.source_mask
    expected = mask / mask.sum(axis=1, keepdims=True)
    assert np.allclose(packed.routing.numpy(), expected[None, None], atol=1e-6)


# --------------------------------------------------------------------- block geometry
@pytest.mark.parametrize(("n_sublayers", "num_blocks", "expected"), [
    (8, 4, [1, 3, 5, 7]),
    (8, 2, [3, 7]),
    (8, 3, [2, 5, 7]),  # blocks of 3, the last one short
    (7, 2, [3, 6]),
    (10, 4, [2, 5, 8, 9]),  # blocks of 3: the short last block is its own representation
    (8, 8, [0, 1, 2, 3, 4, 5, 6, 7]),  # N = L: Full AttnRes
    (8, 1, [7]),  # N = 1: one block, embedding isolated as b_0
])
def test_block_boundary_positions(n_sublayers, num_blocks, expected):
    assert block_boundaries(n_sublayers, num_blocks) == expected
    model = BlockAttnRes(8, n_sublayers // 2 if n_sublayers % 2 == 0 else 1, 2, num_blocks=num_blocks,
                         sublayers=_random_sublayers(n_sublayers, 8)).double()
    randomise_queries(model, seed=n_sublayers + num_blocks)
    x = inputs((2, 3, 8), seed=2)
    assert torch.allclose(model(x).hidden, slow_block_forward(model, x, expected), atol=1e-10)


def _random_sublayers(n: int, dim: int) -> list[nn.Module]:
    torch.manual_seed(n)
    return [nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Tanh()).double() for _ in range(n)]


def slow_mix(query: torch.Tensor, sources: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Obvious loops over (batch, token, source): logits, softmax, weighted sum of raw values."""
    b, t, _ = sources[0].shape
    out = torch.zeros_like(sources[0])
    for i in range(b):
        for j in range(t):
            logits = []
            for v in sources:
                vec = v[i, j]
                rms = math.sqrt(float((vec * vec).mean()) + eps)
                logits.append(float((query * vec).sum()) / rms)
            top = max(logits)
            weights = [math.exp(z - top) for z in logits]
            total = sum(weights)
            for w, v in zip(weights, sources, strict=True):
                out[i, j] += (w / total) * v[i, j]
    return out


def slow_block_forward(model: BlockAttnRes, x: torch.Tensor, ends: list[int]) -> torch.Tensor:
    blocks, partial = [x], None
    for site, f in enumerate(model.sublayers):
        sources = blocks if partial is None else [*blocks, partial]
        out = f(slow_mix(model.routers[site].query, sources))
        partial = out if partial is None else partial + out
        if site in ends:
            blocks.append(partial)
            partial = None
    return model.final_norm(slow_mix(model.routers[-1].query, blocks))


def slow_full_forward(model: FullAttnRes, x: torch.Tensor) -> torch.Tensor:
    values = [x]
    for site, f in enumerate(model.sublayers):
        values.append(f(slow_mix(model.routers[site].query, values)))
    return model.final_norm(slow_mix(model.routers[-1].query, values))


def test_full_forward_matches_slow_per_token_loop():
    model = FullAttnRes(8, 3, 2).double()
    randomise_queries(model, seed=3)
    x = inputs((2, 5, 8), seed=3)
    assert torch.allclose(model(x).hidden, slow_full_forward(model, x), atol=1e-10)


def test_block_with_one_sublayer_per_block_equals_full():
    full = FullAttnRes(8, 3, 2).double()
    randomise_queries(full, seed=4)
    block = BlockAttnRes(8, 3, 2, num_blocks=6).double()
    block.load_state_dict(full.state_dict())
    x = inputs((2, 4, 8), seed=4)
    f_out, b_out = full(x), block(x)
    assert torch.allclose(f_out.hidden, b_out.hidden, atol=1e-12)
    f_routing = full.pack(f_out.routing).routing
    b_routing = block.pack(b_out.routing).routing
    assert torch.equal(b_routing[..., :7], f_routing) and not b_routing[..., 7].any()


# --------------------------------------------------------------------- wrapped convention
def test_wrapped_boundaries_match_the_28_layer_code():
    assert wrapped_boundaries(28, 8) == [3, 7, 11, 15, 19, 23, 27]


def test_wrapped_schedule_matches_analytic_formula():
    model = WrappedAttnRes(8, 28, 2, num_blocks=7, recency_bias=3.0, mlp_ratio=1).double()
    packed = model.pack(model(inputs((2, 3, 8), seed=5)).routing)
    current = model.layout.source_families["current"][0]
    alpha_current = packed.routing[0, 0, :, current].numpy()
    for site in range(56):
        n_completed = 1 + (site // 2) // 4
        assert alpha_current[site] == pytest.approx(math.exp(3) / (math.exp(3) + n_completed), abs=1e-6)
        others = packed.routing[..., site, :].numpy()[..., packed.source_mask[site]][..., :-1]
        assert np.allclose(others, 1 / (math.exp(3) + n_completed), atol=1e-6)
    paper = [0.9526, 0.9094, 0.8700, 0.8339, 0.8007, 0.7700, 0.7416]
    assert alpha_current[::8].tolist() == pytest.approx(paper, abs=5e-5)
    assert np.allclose(packed.routing.numpy(), model.schedule()[None, None], atol=1e-6)
    assert np.allclose(np.asarray(packed.meta["schedule"]), model.schedule())


def test_wrapped_schedule_with_large_bias_and_content_dependence():
    layout = WrappedAttnRes(8, 28, 2, num_blocks=7).layout
    current = layout.source_families["current"][0]
    assert round(wrapped_schedule(layout, 10.0)[:, current].min(), 4) >= 0.9997
    model = WrappedAttnRes(8, 4, 2, num_blocks=2).double()
    randomise_queries(model, seed=6)
    routing = model.pack(model(inputs((3, 4, 8), seed=6)).routing).routing.numpy()
    assert not np.allclose(routing, model.schedule()[None, None], atol=1e-3)
    model.zero_queries()
    routing = model.pack(model(inputs((3, 4, 8), seed=6)).routing).routing.numpy()
    assert np.allclose(routing, model.schedule()[None, None], atol=1e-6)


def test_wrapped_with_huge_bias_is_the_vanilla_model():
    vanilla = PreNormResidual(8, 3, 2).double()
    wrapped = WrappedAttnRes(8, 3, 2, num_blocks=3, recency_bias=80.0).double()
    missing = wrapped.load_state_dict(vanilla.state_dict(), strict=False).missing_keys
    assert all(k.startswith(("routers.", "recency_bias")) for k in missing)
    x = inputs((2, 4, 8), seed=7)
    assert torch.allclose(wrapped(x).hidden, vanilla(x).hidden, atol=1e-10)


# --------------------------------------------------------------------- interventions
def routed_full(seed: int = 8) -> tuple[FullAttnRes, torch.Tensor]:
    model = FullAttnRes(8, 3, 2).double()
    randomise_queries(model, seed=seed)
    return model, inputs((3, 4, 8), seed=seed)


def test_mask_renormalise_is_minus_inf_and_matches_apply_to_weights():
    model, x = routed_full()
    iv = RoutingIntervention("mask", sublayer="mlp", layers=(3, 5), family="embedding")
    clean = model(x)
    ablated = model(x, intervention=iv)
    layout = model.layout
    sites = iv.site_mask(list(layout.site_types), layout.n_sites)
    removed = iv.source_mask(layout.source_families, layout.n_sources)
    assert np.flatnonzero(sites).tolist() == [3, 5]
    reference = apply_to_weights(model.pack(clean.routing).routing.numpy(), iv, sites=sites,
                                 removed=removed, valid=layout.source_mask)
    got = model.pack(ablated.routing).routing.numpy()
    assert np.allclose(got[..., :4, :], reference[..., :4, :], atol=1e-6)  # up to the first site
    for site in (3, 5):  # at every intervened site: the softmax with -inf on the embedding logit
        logits = ablated.routing[site].logits.clone()
        logits[..., 0] = float("-inf")
        assert torch.allclose(ablated.routing[site].weights, torch.softmax(logits, dim=-1), atol=1e-12)
        assert torch.all(ablated.routing[site].weights[..., 0] == 0)
    assert not torch.allclose(clean.hidden, ablated.hidden, atol=1e-4)


def test_mask_without_renormalisation_zeroes_and_keeps_the_rest():
    model, x = routed_full(9)
    iv = RoutingIntervention("mask", layers=(4,), family="embedding", renormalize=False)
    clean, ablated = model(x), model(x, intervention=iv)
    w_clean, w_cut = clean.routing[4].weights, ablated.routing[4].weights
    assert torch.all(w_cut[..., 0] == 0)
    assert torch.allclose(w_cut[..., 1:], w_clean[..., 1:], atol=1e-12)
    assert torch.allclose(w_cut.sum(-1), 1 - w_clean[..., 0], atol=1e-12)
    layout = model.layout
    reference = apply_to_weights(model.pack(clean.routing).routing.numpy(), iv,
                                 sites=iv.site_mask(list(layout.site_types), layout.n_sites),
                                 removed=iv.source_mask(layout.source_families, layout.n_sources),
                                 valid=layout.source_mask)
    assert np.allclose(model.pack(ablated.routing).routing.numpy()[..., 4, :], reference[..., 4, :])


def test_masking_every_source_of_a_site_raises():
    model, x = routed_full()
    with pytest.raises(ValueError, match="every valid source"):
        model(x, intervention=RoutingIntervention("mask", layers=(0,), family="embedding"))
    with pytest.raises(ValueError, match="every valid source"), \
            model.intervene(RoutingIntervention("mask", sources=tuple(range(7)))):
        pass
    wrapped = WrappedAttnRes(8, 2, 2, num_blocks=2).double()
    current = wrapped.layout.source_families["current"][0]
    with pytest.raises(ValueError, match="every valid source"):
        wrapped(x, intervention=RoutingIntervention("mask", layers=(0,), sources=(0, current)))


def test_mean_and_schedule_interventions_fix_the_weights():
    model, x = routed_full(10)
    clean = model(x)
    mean = model.pack(clean.routing, pool_tokens=True).routing.mean(0).double().numpy()
    iv = RoutingIntervention("mean", sublayer="attn", weights=mean)
    out = model(x, intervention=iv)
    for record in out.routing:
        expected = mean[record.site, list(record.columns)]
        if record.sublayer == "attn":
            assert np.allclose(record.weights.numpy(), expected, atol=1e-12)
        else:
            assert not np.allclose(record.weights.numpy(), expected, atol=1e-6) or record.site == 0
    assert not torch.allclose(out.hidden, clean.hidden, atol=1e-4)

    wrapped = WrappedAttnRes(8, 4, 2, num_blocks=2).double()
    same = wrapped(x, intervention=RoutingIntervention("schedule", weights=wrapped.schedule()))
    assert torch.allclose(same.hidden, wrapped(x).hidden, atol=1e-10)


def test_context_manager_equals_argument_and_restores():
    model, x = routed_full(11)
    iv = RoutingIntervention("mask", sublayer="attn", family="history")
    with model.intervene(iv):
        inside = model(x).hidden
    assert torch.equal(inside, model(x, intervention=iv).hidden)
    assert not torch.allclose(model(x).hidden, inside, atol=1e-4)


def test_constant_source_carries_mass_without_effect():
    model = BlockAttnRes(8, 3, 2, num_blocks=3, constant_logit=0.5, eps=1e-12).double()
    randomise_queries(model, seed=12, scale=0.5)
    x = inputs((3, 4, 8), seed=12)
    clean = model(x)
    constant = model.layout.source_families["constant"]
    mass = model.pack(clean.routing, pool_tokens=True).routing[..., constant].mean()
    assert mass > 0.2
    for renormalize in (True, False):
        iv = RoutingIntervention("mask", family="constant", renormalize=renormalize)
        # equal up to the norms' ε: every sublayer and the final norm are scale-invariant
        assert torch.allclose(model(x, intervention=iv).hidden, clean.hidden, atol=1e-8)
    embedding_cut = model(x, intervention=RoutingIntervention("mask", layers=(1, 3), family="embedding"))
    assert not torch.allclose(embedding_cut.hidden, clean.hidden, atol=1e-3)


# --------------------------------------------------------------------- packing
@pytest.mark.parametrize("make", [
    lambda: FullAttnRes(8, 2, 2),
    lambda: BlockAttnRes(8, 3, 2, num_blocks=2),
    lambda: BlockAttnRes(8, 2, 2, num_blocks=3, constant_logit=0.5),
    lambda: WrappedAttnRes(8, 3, 2, num_blocks=2),
])
def test_packed_rows_are_distributions_and_make_a_traceset(make):
    model = make()
    randomise_queries(model, seed=13)
    model.float()
    out = model(inputs((6, 5, 8), seed=13).float())
    packed = model.pack(out.routing)
    routing = packed.routing.detach()
    assert routing.dtype == torch.float32 and routing.shape[:2] == (6, 5)
    mask = packed.source_mask
    assert torch.all(routing[..., torch.from_numpy(~mask)] == 0)
    assert torch.allclose(routing.sum(-1), torch.ones(routing.shape[:-1]), atol=1e-5)
    pooled = model.pack(out.routing, pool_tokens=True)
    meta = pooled.meta
    assert len(meta["layer_types"]) == len(meta["layer_depth"]) == mask.shape[0]
    assert sorted(c for cols in meta["source_families"].values() for c in cols) == list(range(mask.shape[1]))
    ts = TraceSet(torch.randn(6, 3).numpy(), np.arange(6) % 3, pooled.routing.detach().numpy(),
                  source_mask=pooled.source_mask, meta=meta)
    assert ts.n_layers == mask.shape[0] and ts.meta.family.startswith("attnres-")
