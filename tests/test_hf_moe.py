"""routeaudit.hf on tiny random transformers MoE models of every supported family.

Models are built from config objects (no download). References are independent of the
code under test: re-routing from a sorted loop over experts (``next_choices``), the dense
mixture from the experts module called expert by expert, padding from unpadded runs.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from routeaudit.errors import AdapterError  # noqa: E402
from routeaudit.hf import (  # noqa: E402
    FAMILY_RULES,
    MoEAdapter,
    SelfCheckError,
    check_router_output,
    family_rule,
    find_hf_routers,
    self_check,
)
from routeaudit.model.extract import ModelSession, extract_traces  # noqa: E402
from routeaudit.model.gates import RouterCapture, uniform_routing  # noqa: E402
from routeaudit.model.intervention import RoutingIntervention  # noqa: E402
from routeaudit.plugins import hf_moe  # noqa: E402

torch.set_num_threads(1)
VOCAB = 50
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)
#: family → (config class, model class, the family's own config fields)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                       head_dim=16, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=4, num_experts_per_tok=2)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                      n_group=4, topk_group=2, first_k_dense_replace=1, head_dim=16,
                      norm_topk_prob=False, num_hidden_layers=3)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                         n_group=2, topk_group=1, first_k_dense_replace=0, q_lora_rank=None,
                         kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         norm_topk_prob=True, routed_scaling_factor=2.5)),
}


def tiny(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    config_cls, model_cls, fields = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **fields, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # routers with spread-out logits: no near-ties in the top-k
        for module in model.modules():
            if type(module).__name__ == FAMILY_RULES[family].router_class:
                module.weight.normal_(0.0, 1.0)
                if getattr(module, "e_score_correction_bias", None) is not None:
                    module.e_score_correction_bias.normal_(0.0, 0.2)
    return model


def ids(batch: int = 3, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def next_choices(logits: torch.Tensor, family: str, router: Any, removed: int) -> list[list[int]]:
    """Per token, the experts the family's rule picks once ``removed`` is out, by a plain
    loop: rank the eligible experts by preference and take the best k."""
    k = int(router.top_k)
    out = []
    for row in logits.float():
        if FAMILY_RULES[family].group_limited:
            score = (torch.sigmoid(row) + router.e_score_correction_bias).tolist()
            size = len(score) // router.num_group
            groups = []
            for g in range(router.num_group):
                members = [e for e in range(g * size, (g + 1) * size) if e != removed]
                best2 = sorted((score[e] for e in members), reverse=True)[:2]
                groups.append((sum(best2), g))
            kept = [g for _, g in sorted(groups, reverse=True)[:router.topk_group]]
            eligible = [e for e in range(len(score)) if e // size in kept and e != removed]
            ranked = sorted(eligible, key=lambda e: -score[e])
        else:
            ranked = [e for e in sorted(range(len(row)), key=lambda e: -float(row[e]))
                      if e != removed]
        out.append(sorted(ranked[:k]))
    return out


# ------------------------------------------------------------------------------ self-check
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_self_check_passes_and_a_corrupted_rule_is_caught(family):
    model = tiny(family)
    assert set(FAMILIES) == set(FAMILY_RULES)  # every declared family is tested here
    name, rule = family_rule(model)
    assert name == family and rule is FAMILY_RULES[family]
    assert self_check(model, ids()) == 2 * 3 * 9  # every (router, token) pair checked
    router = find_hf_routers(model, rule, family)[0][1]
    wrong = [dataclasses.replace(rule, renormalize=not rule.renormalizes(router))]
    wrong.append(dataclasses.replace(
        rule, activation="sigmoid" if rule.activation == "softmax" else "softmax",
        select_on="probs"))
    for bad in wrong:
        with pytest.raises(SelfCheckError) as err:
            self_check(model, ids(), rule=bad)
        text = str(err.value)
        assert family in text and transformers.__version__ in text
        assert re.search(r"router 0 \(model\.layers\.\d\.\w+\.(gate|router)\), token \d+", text)


def test_the_adapter_self_checks_its_first_batch():
    class Wrong(MoEAdapter):
        router_rule = dataclasses.replace(FAMILY_RULES["mixtral"], renormalize=False)

    adapter = Wrong(model=tiny("mixtral"), batches={"eval": [{"input_ids": ids()}]})
    with pytest.raises(SelfCheckError, match="'mixtral' family"):
        extract_traces(adapter, cache=False, progress=False)


def test_unsupported_families_and_old_transformers_are_refused(monkeypatch):
    phimoe = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(
        **{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2}))
    with pytest.raises(AdapterError, match=r"'phimoe'.*sparsemixer") as err:
        family_rule(phimoe)
    assert ", ".join(sorted(FAMILY_RULES)) in str(err.value)
    assert transformers.__version__ in str(err.value)
    fake = tiny("mixtral")
    fake.config.model_type = "my_moe"
    with pytest.raises(AdapterError, match="'my_moe'"):
        MoEAdapter(model=fake, batches={"eval": [{"input_ids": ids()}]}).forward(
            fake, {"input_ids": ids()})
    olmoe = tiny("olmoe")
    # the module routeaudit imports (model building may swap the lazy module in sys.modules)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.3")
    with pytest.raises(AdapterError, match=r"transformers >= 5, found 4\.46\.3.*nn\.Linear"):
        family_rule(olmoe)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(AdapterError, match=r'pip install -e "\.\[hf\]"'):
        hf_moe.transformers_version()


def test_router_count_follows_the_config_sparse_layers():
    model = tiny("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    rule = FAMILY_RULES["qwen3_moe"]
    assert [n for n, _ in find_hf_routers(model, rule)] == ["model.layers.1.mlp.gate"]
    model.config.mlp_only_layers = []  # the config now claims layer 3 is MoE: a mismatch
    with pytest.raises(AdapterError, match=r"found 1 Qwen3MoeTopKRouter.*2 MoE layers \[1, 3\]"):
        find_hf_routers(model, rule)
    dense_first = tiny("deepseek_v3", num_hidden_layers=3, first_k_dense_replace=1)
    assert len(find_hf_routers(dense_first, FAMILY_RULES["deepseek_v3"])) == 2


def test_the_check_allows_exact_ties_and_flags_wrong_or_repeated_choices():
    router = find_hf_routers(tiny("mixtral"), FAMILY_RULES["mixtral"])[0][1]  # top-2 of 4
    rule = FAMILY_RULES["mixtral"]
    logits = torch.tensor([[2.0, 1.0, 1.0, -1.0], [0.0, 3.0, -2.0, 1.0]])

    def triple(index: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = torch.tensor(index)
        picked = torch.softmax(logits, -1).gather(1, chosen)
        return logits, picked / picked.sum(-1, keepdim=True), chosen

    assert check_router_output(rule, router, triple([[0, 1], [1, 3]])) is None
    assert check_router_output(rule, router, triple([[2, 0], [3, 1]])) is None  # tie 1 = 2
    assert "token 1" in check_router_output(rule, router, triple([[0, 1], [1, 0]]))
    assert "token 0" in check_router_output(rule, router, triple([[0, 0], [1, 3]]))
    _, weights, index = triple([[0, 1], [1, 3]])
    off = weights.clone()
    off[1] = torch.tensor([0.5, 0.5])
    assert "token 1" in check_router_output(rule, router, (logits, off, index))
    assert check_router_output(rule, router, (logits, off, index),
                               rows=torch.tensor([True, False])) is None


# ------------------------------------------------------------------------------ traces
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_padding_is_dropped_and_does_not_change_real_tokens(family):
    model = tiny(family)
    rows = ids(3, 8)
    lengths = [8, 5, 6]
    bare = [{"input_ids": rows[i:i + 1, :n], "sequence": torch.tensor([i])}
            for i, n in enumerate(lengths)]
    padded_ids = torch.full((3, 8), 7)
    mask = torch.zeros(3, 8, dtype=torch.long)
    padded_ids[0], mask[0] = rows[0], 1
    padded_ids[1, 3:], mask[1, 3:] = rows[1, :5], 1  # left padding
    padded_ids[2, :6], mask[2, :6] = rows[2, :6], 1  # right padding
    padded = [{"input_ids": padded_ids, "attention_mask": mask}]
    one = extract_traces(MoEAdapter(model=model, batches={"eval": bare}), cache=False,
                         progress=False)
    both = extract_traces(MoEAdapter(model=model, batches={"eval": padded}), cache=False,
                          progress=False)
    assert len(both.labels) == sum(n - 1 for n in lengths) == len(one.labels)
    np.testing.assert_array_equal(both.labels, one.labels)
    np.testing.assert_array_equal(both.group, np.repeat([0, 1, 2], [n - 1 for n in lengths]))
    np.testing.assert_array_equal(both.group, one.group)
    np.testing.assert_allclose(both.routing, one.routing, atol=2e-5)
    np.testing.assert_allclose(both.logits, one.logits, atol=2e-4)
    expected = np.concatenate([rows[i, 1:n].numpy() for i, n in enumerate(lengths)])
    np.testing.assert_array_equal(both.labels, expected)


def test_routing_is_the_softmax_of_the_routers_fp32_logits_and_meta_is_filled():
    model = tiny("qwen3_moe")
    batch = ids(2, 6)
    captured = []
    handles = [module.register_forward_hook(lambda m, a, out: captured.append(out[0].float()))
               for _, module in find_hf_routers(model, FAMILY_RULES["qwen3_moe"])]
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    for handle in handles:
        handle.remove()
    traces = extract_traces(MoEAdapter(model=model, batches={"eval": [{"input_ids": batch}]},
                                       name="q3"), cache=False, progress=False)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[:, -1] = False
    want = torch.stack([torch.softmax(c, -1) for c in captured], 1)[keep.reshape(-1)]
    np.testing.assert_allclose(traces.routing, want.numpy(), atol=1e-6)
    np.testing.assert_allclose(traces.logits, logits[:, :-1].reshape(-1, VOCAB).numpy(), atol=1e-5)
    np.testing.assert_array_equal(traces.labels, batch[:, 1:].reshape(-1).numpy())
    meta = traces.meta
    assert (meta.name, meta.per_token, meta.source_kind, meta.top_k) == ("q3", True, "experts", 2)
    assert meta.routing_mode == "soft" and meta.layer_types == ["mlp", "mlp"]
    assert meta.layer_names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert meta.source_families == {f"expert{k}": [k] for k in range(6)}


def test_sigmoid_routing_is_the_normalised_scores():
    model = tiny("deepseek_v3")
    traces = extract_traces(MoEAdapter(model=model, batches={"eval": [{"input_ids": ids(1, 5)}]}),
                            cache=False, progress=False)
    router = find_hf_routers(model, FAMILY_RULES["deepseek_v3"])[0][1]
    with torch.no_grad():
        hidden = model.model.layers[0].post_attention_layernorm(
            _attn_out(model, ids(1, 5)))[0, :-1]
        scores = torch.sigmoid(hidden @ router.weight.T)
    np.testing.assert_allclose(traces.routing[:, 0], (scores / scores.sum(-1, keepdim=True)).numpy(),
                               atol=1e-5)


def _attn_out(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """The residual stream entering layer 0's MoE block (captured with a pre-hook)."""
    seen = []
    layer = model.model.layers[0]
    handle = layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=batch)
    handle.remove()
    return seen[0]


# ------------------------------------------------------------------------------ interventions
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_masking_an_expert_reroutes_its_tokens_to_the_next_choice(family):
    model = tiny(family)
    adapter = MoEAdapter(model=model, batches={"eval": [{"input_ids": ids()}]})
    found = find_hf_routers(model, FAMILY_RULES[family])
    rule = FAMILY_RULES[family]
    with torch.no_grad(), RouterCapture(model, found, rule) as clean:
        model(input_ids=ids())
    first = clean.choices()[0]
    expert = int(torch.mode(first.reshape(-1)).values)  # the busiest expert of layer 0
    raw_logits = []
    handle = found[0][1].register_forward_hook(lambda m, a, out: raw_logits.append(out[0]))
    iv = RoutingIntervention(kind="mask", layers=(0,), family=f"expert{expert}")
    with torch.no_grad(), adapter.intervene(model, iv), \
            RouterCapture(model, found, rule) as masked:
        model(input_ids=ids())
    handle.remove()
    got = [sorted(row) for row in masked.choices()[0].tolist()]
    assert all(expert not in row for row in got)
    assert got == next_choices(raw_logits[0], family, found[0][1], expert)
    had = [t for t, row in enumerate(first.tolist()) if expert in row]
    assert had and all(sorted(first[t].tolist()) != got[t] for t in had)
    if not FAMILY_RULES[family].group_limited:  # there, a group's score may change too
        untouched = [t for t in range(len(got)) if t not in had]
        assert all(sorted(first[t].tolist()) == got[t] for t in untouched)
    assert all(not m._forward_hooks for _, m in found)


def test_mask_without_renormalising_zeroes_weights_and_keeps_choices():
    model = tiny("mixtral")
    found = find_hf_routers(model, FAMILY_RULES["mixtral"])
    adapter = MoEAdapter(model=model, batches={"eval": [{"input_ids": ids()}]})
    seen = []
    handle = found[0][1].register_forward_hook(lambda m, a, out: seen.append(out), prepend=False)
    iv = RoutingIntervention(kind="mask", layers=(0,), sources=(1,), renormalize=False)
    with torch.no_grad():
        model(input_ids=ids())
        with adapter.intervene(model, iv):
            model(input_ids=ids())
    handle.remove()
    (_, w0, i0), (_, w1, i1) = seen
    torch.testing.assert_close(i1, i0)
    torch.testing.assert_close(w1, torch.where(i0 == 1, torch.zeros_like(w0), w0))
    assert bool((i0 == 1).any())


@pytest.mark.parametrize(("family", "kernel"), [
    ("qwen2_moe", "grouped_mm"), ("qwen2_moe", "batched_mm"), ("qwen2_moe", "eager"),
    ("deepseek_v3", "grouped_mm"), ("gpt_oss", "grouped_mm"), ("gpt_oss", "eager")])
def test_uniform_routing_at_one_layer_is_the_dense_mixture(family, kernel):
    """With a shared expert (qwen2_moe, deepseek_v3) and expert biases (gpt_oss), under each
    experts implementation: the block's output under uniform routing (k = E experts per
    token) equals the mean of the experts, called one by one, plus whatever the block adds
    outside the routed experts."""
    model = tiny(family)
    model.set_experts_implementation(kernel)
    rule = FAMILY_RULES[family]
    found = find_hf_routers(model, rule)
    router = found[1][1]
    block = dict(model.named_modules())[found[1][0].rpartition(".")[0]]
    n_exp, scale = rule.n_experts_of(router), rule.scale_of(router)
    record: dict[str, list[Any]] = {"in": [], "out": [], "router": []}

    def on_block(module: Any, args: Any, out: Any) -> None:
        record["in"].append(args[0])
        record["out"].append(out)

    hooks = [block.register_forward_hook(on_block),
             router.register_forward_hook(lambda m, a, out: record["router"].append(out))]
    weights = np.zeros((2, n_exp))
    weights[1] = 1.0 / n_exp
    iv = RoutingIntervention(kind="schedule", layers=(1,), weights=weights)
    adapter = MoEAdapter(model=model, batches={"eval": [{"input_ids": ids()}]})
    with torch.no_grad():
        clean_logits = model(input_ids=ids()).logits
        with adapter.intervene(model, iv):
            uniform_logits = model(input_ids=ids()).logits
        for hook in hooks:
            hook.remove()
        out = [o[0] if isinstance(o, tuple) else o for o in record["out"]]
        hidden = record["in"][0].reshape(-1, record["in"][0].shape[-1])
        torch.testing.assert_close(record["in"][1], record["in"][0])  # layer 0 untouched
        _, w_clean, i_clean = record["router"][0]
        outside = out[0].reshape(hidden.shape) - block.experts(hidden, i_clean, w_clean)
        n_tok = hidden.shape[0]
        each = [block.experts(hidden, torch.full((n_tok, 1), e), torch.full((n_tok, 1), scale))
                for e in range(n_exp)]
        want = torch.stack(each).mean(0) + outside
        i_uni = record["router"][1][2]
    assert i_uni.shape == (n_tok, n_exp)
    torch.testing.assert_close(out[1].reshape(hidden.shape), want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(uniform_logits, clean_logits, atol=1e-3)


def test_uniform_routing_everywhere_through_a_session():
    model = tiny("olmoe")
    adapter = MoEAdapter(model=model, batches={"eval": [{"input_ids": ids()}]})
    with ModelSession(adapter, cache=False, progress=False) as session:
        clean = session.traces()
        uniform = session.forward(uniform_routing(2, 4))
    np.testing.assert_allclose(uniform["routing"], 0.25, atol=1e-6)
    np.testing.assert_array_equal(uniform["labels"], clean.labels)
    assert np.abs(uniform["logits"] - clean.logits).max() > 1e-3


# ------------------------------------------------------------------------------ expert logits
@pytest.mark.parametrize(("family", "fields"), [
    ("mixtral", {"num_experts_per_tok": 1}),
    ("deepseek_v3", {"num_experts_per_tok": 1, "n_group": 1, "topk_group": 1}),
])
def test_expert_logits_of_the_chosen_expert_are_the_logits_of_a_hard_model(family, fields):
    model = tiny(family, **fields)

    class Hard(MoEAdapter):
        name = "hard"
        expert_logits = True

        def load(self, device: Any) -> Any:
            return model

        def batches(self, split: str) -> Any:
            yield {"input_ids": ids(2, 7)}
            yield {"input_ids": ids(2, 7, seed=2)}

    traces = extract_traces(Hard(), cache=False, progress=False)
    assert traces.meta.routing_mode == "hard" and traces.meta.top_k == 1
    assert traces.meta.expert_layer == 1
    n_exp = traces.routing.shape[2]
    assert traces.expert_logits.shape == (len(traces.labels), n_exp, VOCAB)
    np.testing.assert_array_equal(traces.group, np.repeat([0, 1, 2, 3], 6))  # counted
    found = find_hf_routers(model, FAMILY_RULES[family])
    with torch.no_grad(), RouterCapture(model, found, FAMILY_RULES[family]) as capture:
        model(input_ids=torch.cat([ids(2, 7), ids(2, 7, seed=2)]))
    chosen = capture.choices()[1][:, 0].reshape(4, 7)[:, :-1].reshape(-1).numpy()
    mine = traces.expert_logits[np.arange(len(chosen)), chosen]
    np.testing.assert_allclose(mine, traces.logits, atol=1e-5)
    others = traces.expert_logits[np.arange(len(chosen)), (chosen + 1) % n_exp]
    assert np.abs(others - traces.logits).max() > 1e-3


# ------------------------------------------------------------------------------ adapter API
def test_direct_use_checks_its_inputs_and_keys_the_cache_by_weights_and_data():
    model = tiny("mixtral")
    with pytest.raises(AdapterError, match="one-shot iterator"):
        MoEAdapter(model=model, batches={"eval": iter([{"input_ids": ids()}])})
    with pytest.raises(AdapterError, match="needs both"):
        MoEAdapter(model=model)
    a = MoEAdapter(model=model, batches={"eval": [{"input_ids": ids()}]})
    b = MoEAdapter(model=model, batches={"eval": [{"input_ids": ids(seed=5)}]})
    c = MoEAdapter(model=tiny("mixtral", seed=3), batches={"eval": [{"input_ids": ids()}]})
    keys = {a.cache_key(), b.cache_key(), c.cache_key()}
    assert len(keys) == 3 and a.cache_key() == a.cache_key()
    assert f"transformers={transformers.__version__}" in a.cache_key()
    with pytest.raises(AdapterError, match="no split 'shift'"):
        list(a.batches("shift"))
    with pytest.raises(AdapterError, match="input_ids"):
        a.forward(model, {"ids": ids()})
    counting = MoEAdapter(model=model, batches={"eval": []}, expert_logits=True)
    with torch.no_grad():  # a batch without sequence ids, not from batches(): counted
        groups = [counting.forward(model, {"input_ids": ids(2, 4)}).group for _ in range(2)]
    assert torch.cat(groups).tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
