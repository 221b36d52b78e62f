"""Hugging Face MoE causal LMs (transformers >= 5) as routeaudit model adapters.

In transformers 5 every MoE family has a router module returning ``(router_logits,
top_k_weights, top_k_index)`` and an experts module called as ``experts(hidden, top_k_index,
top_k_weights)``. This plugin declares, per ``config.model_type``, how a family's router
turns its logits into that choice (:class:`RouterRule`, :data:`FAMILY_RULES`), hooks the
routers (:mod:`routeaudit.model.gates`), and checks the declaration against the model:

* **the traces' routing distribution** is the router's own fp32 logits through the family's
  activation, over ALL experts (before the top-k): the softmax for softmax families, the
  sigmoid scores normalised to sum to 1 for sigmoid ones (deepseek_v3). It is what the
  router prefers, not only what it kept;
* **the self-check** (once per adapter, on the first batch, and :func:`self_check`):
  the top-k indices and weights are recomputed from the captured fp32 logits with the
  declared rule and compared with what the router itself returned (indices as sets, exact
  ties allowed; weights within the dtype's tolerance). A family whose code no longer
  matches its declaration fails loudly (:class:`SelfCheckError`) instead of producing
  traces that describe another model;
* **interventions** replace the router's returned triple: masking an expert sets its logit
  to −∞ before the top-k (tokens re-route to their next choice, computed by the declared
  rule); fixed weights ``w`` (uniform routing, a mean routing) send every token to every
  expert with ``w > 0``, with weights ``scale * w`` (``scale`` = the family's
  ``routed_scaling_factor``, 1 elsewhere): the experts modules take any number of experts
  per token, shared experts are untouched.

Families whose router does something else (phimoe's sparsemixer, anything not declared)
are refused by name; so is transformers < 5, whose routers are plain ``nn.Linear`` layers
(:class:`routeaudit.model.gates.GatedAdapter` with a ``LogitsGate`` covers hand-written
models). transformers itself is imported only when a model is used.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

import routeaudit
from routeaudit.model.gates import GatedAdapter, activate

__all__ = ["FAMILY_RULES", "MoEAdapter", "RouterRule", "SelfCheckError", "check_router_output",
           "family_rule", "find_hf_routers", "self_check", "supported_families"]

INSTALL_HINT = 'pip install -e ".[hf]"'


class SelfCheckError(routeaudit.AdapterError):
    """A router's own top-k choice disagrees with the rule routeaudit declares for its family."""


def transformers_version() -> str:
    """The installed transformers version; a clear error naming the install command if none."""
    try:
        import transformers
    except ImportError as exc:
        raise routeaudit.AdapterError(
            f"routeaudit.hf needs the transformers package (>= 5): {INSTALL_HINT}") from exc
    return str(transformers.__version__)


def _require_v5() -> str:
    version = transformers_version()
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < 5:
        raise routeaudit.AdapterError(
            f"routeaudit.hf needs transformers >= 5, found {version}: before 5 a MoE router is a "
            "plain nn.Linear and the top-k happens inside each block's forward, so there is no "
            f"router output to check or replace. Upgrade ({INSTALL_HINT}), or write a "
            "routeaudit.model.gates.GatedAdapter with LogitsGate for the gate modules")
    return version


# ------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class RouterRule:
    """How one family's router turns fp32 logits ``[T, E]`` into ``(weights, indices)``.

    * ``activation``: ``softmax`` or ``sigmoid`` of the logits; this, over all experts, is
      the traces' routing distribution (sigmoid scores normalised to sum to 1);
    * ``select_on``: what the top-k is taken on: the probabilities, the raw logits (same
      order for softmax), or ``scores``: sigmoid plus the router's
      ``e_score_correction_bias`` (deepseek_v3);
    * ``group_limited``: first keep the router's ``topk_group`` best of ``num_group`` expert
      groups (a group scores the sum of its 2 best; with an expert masked, of the 2 best
      that remain), then take the top-k inside them;
    * ``renormalize``: the kept weights are divided by their sum (None: the router's
      ``norm_topk_prob``);
    * ``scaled``: the weights are multiplied by the router's ``routed_scaling_factor``;
    * ``router_class`` / ``gate_attr``: the router module's class name and its attribute name
      in the MoE block; ``moe_layers``: which decoder layers have a MoE block (``all``,
      ``sparse_step``: qwen's ``decoder_sparse_step`` / ``mlp_only_layers``,
      ``first_k_dense``: ``first_k_dense_replace``).
    """

    router_class: str
    gate_attr: str = "gate"
    activation: Literal["softmax", "sigmoid"] = "softmax"
    select_on: Literal["probs", "logits", "scores"] = "probs"
    renormalize: bool | None = True
    scaled: bool = False
    group_limited: bool = False
    moe_layers: Literal["all", "sparse_step", "first_k_dense"] = "all"

    def __post_init__(self) -> None:
        if self.activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', not {self.activation!r}")
        if self.select_on not in ("probs", "logits", "scores"):
            raise ValueError(f"select_on must be probs, logits or scores, not {self.select_on!r}")

    # --- what a router module says
    def top_k_of(self, module: nn.Module) -> int:
        return int(module.top_k)

    def n_experts_of(self, module: nn.Module) -> int:
        return int(module.num_experts)

    def renormalizes(self, module: nn.Module) -> bool:
        return bool(module.norm_topk_prob) if self.renormalize is None else self.renormalize

    def scale_of(self, module: nn.Module) -> float:
        return float(module.routed_scaling_factor) if self.scaled else 1.0

    def is_hard(self, module: nn.Module) -> bool:
        """One expert per token with a constant weight (1, times the scaling factor)."""
        return self.top_k_of(module) == 1 and self.renormalizes(module)

    def describe(self, module: nn.Module | None = None) -> str:
        text = f"{self.activation}, top-k on {self.select_on}"
        if self.group_limited:
            text += " (group-limited)"
        renorm = "norm_topk_prob" if self.renormalize is None else self.renormalize
        if module is not None:
            renorm = self.renormalizes(module)
            text = f"top-{self.top_k_of(module)} " + text
        text += f", renormalize={renorm}"
        return text + (", times routed_scaling_factor" if self.scaled else "")

    # --- the declared computation (fp32)
    def criterion(self, logits: Tensor, module: nn.Module) -> Tensor:
        """What the top-k is taken on, ``[T, E]``; −∞ where an expert cannot be chosen."""
        if self.select_on == "logits":
            crit = logits
        elif self.select_on == "probs":
            crit = activate(logits, "softmax") if self.activation == "softmax" \
                else torch.sigmoid(logits)
        else:
            bias = getattr(module, "e_score_correction_bias", None)
            crit = torch.sigmoid(logits) + (0.0 if bias is None else bias.float())
            crit = crit.masked_fill(torch.isneginf(logits), float("-inf"))
        if self.group_limited:
            groups, keep = int(module.num_group), int(module.topk_group)
            n_tok, n_exp = crit.shape
            best2 = crit.view(n_tok, groups, n_exp // groups).topk(
                min(2, n_exp // groups), dim=-1).values
            # a group scores its 2 best experts; with one removed, the best that remain
            present = torch.isfinite(best2)
            group_scores = torch.where(present, best2, 0.0).sum(dim=-1).masked_fill(
                ~present.any(dim=-1), float("-inf"))
            best = group_scores.topk(keep, dim=-1).indices
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            crit = crit.masked_fill(~allowed.repeat_interleave(n_exp // groups, dim=1),
                                    float("-inf"))
        return crit

    def weights_for(self, logits: Tensor, module: nn.Module, index: Tensor) -> Tensor:
        """The declared weights ``[T, k]`` of the experts ``index`` ``[T, k]``."""
        if self.activation == "softmax":
            picked = activate(logits, "softmax").gather(1, index)
            if self.renormalizes(module):
                picked = picked / picked.sum(dim=-1, keepdim=True)
        else:
            picked = torch.sigmoid(logits).gather(1, index)
            if self.renormalizes(module):
                picked = picked / (picked.sum(dim=-1, keepdim=True) + 1e-20)
        return picked * self.scale_of(module)

    def route(self, logits: Tensor, module: nn.Module, removed: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
        """(weights, indices) ``[T, k]`` the declared rule gives; ``removed`` experts get
        logit −∞ first, so their tokens take the next choice."""
        if removed is not None:
            logits = logits.masked_fill(removed, float("-inf"))
        index = self.criterion(logits, module).topk(self.top_k_of(module), dim=-1).indices
        return self.weights_for(logits, module, index), index

    # --- the GateRule protocol (routeaudit.model.gates)
    def probs(self, output: Any, module: nn.Module) -> Tensor:
        logits = _triple(output)[0]
        return activate(logits.float().reshape(-1, logits.shape[-1]), self.activation)

    def choices(self, output: Any, module: nn.Module) -> Tensor | None:
        return _triple(output)[2]

    def intervene(self, output: Any, module: nn.Module, *, removed: Tensor | None,
                  weights: Tensor | None, renormalize: bool = True) -> Any:
        logits, old_weights, old_index = _triple(output)
        flat = logits.float().reshape(-1, logits.shape[-1])
        if weights is not None:
            used = torch.nonzero(weights > 0).reshape(-1)
            n_tok = flat.shape[0]
            index = used.to(old_index.dtype).expand(n_tok, -1).contiguous()
            new_weights = (weights[used] * self.scale_of(module)).expand(n_tok, -1).contiguous()
            fixed = weights.log() if self.activation == "softmax" else torch.logit(weights)
            new_logits = fixed.expand_as(flat)
        elif removed is None:
            return output
        elif renormalize:
            new_weights, index = self.route(flat, module, removed)
            new_logits = flat.masked_fill(removed, float("-inf"))
        else:  # zero the removed experts' weights; nothing re-routes
            dropped = removed[old_index.long()]
            return (logits, old_weights.masked_fill(dropped, 0), old_index)
        return (new_logits.to(logits.dtype).reshape(logits.shape), new_weights.to(old_weights.dtype),
                index.to(old_index.dtype))


def _triple(output: Any) -> tuple[Tensor, Tensor, Tensor]:
    if not (isinstance(output, tuple) and len(output) == 3):
        raise routeaudit.AdapterError(
            "a transformers >= 5 MoE router returns (router_logits, top_k_weights, top_k_index); "
            f"this one returned {type(output).__name__}")
    return output


_SOFTMAX_PROBS = {"select_on": "probs"}
_SIGMOID_GROUPED = {"activation": "sigmoid", "select_on": "scores", "renormalize": None,
                    "scaled": True, "group_limited": True, "moe_layers": "first_k_dense"}
#: config.model_type → the declared rule of its routers (transformers 5.x code).
FAMILY_RULES: dict[str, RouterRule] = {
    # softmax over all experts, top-k on the probabilities, always renormalised
    "mixtral": RouterRule("MixtralTopKRouter", **_SOFTMAX_PROBS),
    "minimax": RouterRule("MiniMaxTopKRouter", **_SOFTMAX_PROBS),
    # the same, renormalised when config.norm_topk_prob
    "qwen2_moe": RouterRule("Qwen2MoeTopKRouter", renormalize=None, moe_layers="sparse_step",
                            **_SOFTMAX_PROBS),
    "qwen3_moe": RouterRule("Qwen3MoeTopKRouter", renormalize=None, moe_layers="sparse_step",
                            **_SOFTMAX_PROBS),
    "olmoe": RouterRule("OlmoeTopKRouter", renormalize=None, **_SOFTMAX_PROBS),
    "flex_olmo": RouterRule("FlexOlmoTopKRouter", renormalize=None, **_SOFTMAX_PROBS),
    # top-k on the logits, softmax over the kept logits (= renormalised probabilities)
    "granitemoe": RouterRule("GraniteMoeTopKRouter", gate_attr="router", select_on="logits"),
    "gpt_oss": RouterRule("GptOssTopKRouter", gate_attr="router", select_on="logits"),
    # sigmoid scores; top-k on score + e_score_correction_bias inside the best groups;
    # weights are the plain scores, renormalised when norm_topk_prob, times the scale
    "deepseek_v3": RouterRule("DeepseekV3TopkRouter", **_SIGMOID_GROUPED),
    "glm4_moe": RouterRule("Glm4MoeTopkRouter", **_SIGMOID_GROUPED),
}


def supported_families() -> list[str]:
    return sorted(FAMILY_RULES)


def family_rule(model: nn.Module, rule: RouterRule | None = None) -> tuple[str, RouterRule]:
    """(model_type, rule) of an HF model; ``rule`` overrides the declared one (it must still
    pass the self-check). Unknown families and transformers < 5 are refused."""
    version = _require_v5()
    config = getattr(model, "config", None)
    family = str(getattr(config, "model_type", "")) or type(model).__name__
    if rule is not None:
        return family, rule
    if family not in FAMILY_RULES:
        why = (" (its router is a sparsemixer: the choice and weights come from a sampling "
               "estimator that no top-k rule reproduces)" if family == "phimoe" else "")
        raise routeaudit.AdapterError(
            f"routeaudit.hf does not support the MoE family {family!r}{why}; supported with "
            f"transformers {version}: {', '.join(supported_families())}. A router of another "
            "family can be declared with MoEAdapter.router_rule = RouterRule(...); the "
            "self-check then verifies it")
    return family, FAMILY_RULES[family]


def expected_moe_layers(config: Any, rule: RouterRule) -> list[int]:
    """The decoder layers that have a MoE block, from the config."""
    n_layers = int(config.num_hidden_layers)
    if rule.moe_layers == "sparse_step":
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        n_experts = int(getattr(config, "num_experts", 1) or 0)
        return [i for i in range(n_layers)
                if i not in dense and n_experts > 0 and (i + 1) % step == 0]
    if rule.moe_layers == "first_k_dense":
        first = int(getattr(config, "first_k_dense_replace", 0) or 0)
        return list(range(first, n_layers))
    return list(range(n_layers))


def find_hf_routers(model: nn.Module, rule: RouterRule, family: str = ""
                    ) -> list[tuple[str, nn.Module]]:
    """The routers of an HF MoE model in layer order: modules of the rule's router class
    sitting at ``<block>.<gate_attr>`` next to an ``experts`` module; their number must match
    the MoE layers the config declares."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        parent, _, attr = name.rpartition(".")
        if type(module).__name__ == rule.router_class and attr == rule.gate_attr \
                and hasattr(modules.get(parent), "experts"):
            found.append((name, module))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        expected = expected_moe_layers(config, rule)
        if len(found) != len(expected):
            raise routeaudit.AdapterError(
                f"{family or type(model).__name__}: found {len(found)} {rule.router_class} "
                f"routers (at .{rule.gate_attr} of a MoE block), but the config declares "
                f"{len(expected)} MoE layers {expected}; transformers {transformers_version()} "
                "may have changed this family's modules")
    if not found:
        raise routeaudit.AdapterError(f"no {rule.router_class} router in {type(model).__name__}")
    return found


# ------------------------------------------------------------------------------ self-check
def _tolerance(*dtypes: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for router weights computed in the coarsest of ``dtypes``."""
    if torch.bfloat16 in dtypes:
        return 1e-2, 2e-2
    if torch.float16 in dtypes:
        return 2e-3, 4e-3
    return 1e-5, 1e-4


def check_router_output(rule: RouterRule, module: nn.Module, output: Any,
                        rows: Tensor | None = None, shape: tuple[int, int] | None = None
                        ) -> str | None:
    """None when the router's own (indices, weights) follow ``rule`` on its captured logits
    (for the ``rows`` kept); else the first disagreeing token, in words: ``token i``, the
    i-th row the router saw, and with the batch ``shape`` [B, T] its sequence and position."""
    logits, weights, index = _triple(output)
    flat = logits.detach().float().reshape(-1, logits.shape[-1])
    weights = weights.detach().float().reshape(flat.shape[0], -1)
    index = index.detach().long().reshape(flat.shape[0], -1)
    tokens = torch.arange(flat.shape[0], device=flat.device)
    if rows is not None:
        keep = rows.to(flat.device).reshape(-1).bool()
        flat, weights, index, tokens = flat[keep], weights[keep], index[keep], tokens[keep]
    if flat.shape[0] == 0:
        return None
    k = rule.top_k_of(module)
    if index.shape[1] != k:
        return f"the router returned {index.shape[1]} experts per token, the rule expects {k}"
    crit = rule.criterion(flat, module)
    chosen = crit.gather(1, index)
    others = crit.scatter(1, index, float("-inf")).max(dim=-1).values
    slack = 1e-5 * (1.0 + others.abs().where(torch.isfinite(others), torch.zeros_like(others)))
    bad_index = chosen.min(dim=-1).values < others - slack
    bad_index |= torch.sort(index, dim=-1).values.diff(dim=-1).eq(0).any(dim=-1)
    declared = rule.weights_for(flat, module, index)
    atol, rtol = _tolerance(logits.dtype, _triple(output)[1].dtype)
    bad_weights = ~torch.isclose(weights, declared, atol=atol, rtol=rtol).all(dim=-1)
    bad = torch.nonzero(bad_index | bad_weights).reshape(-1)
    if bad.numel() == 0:
        return None
    i = int(bad[0])
    mine_w, mine_i = rule.route(flat[i:i + 1], module)
    token = int(tokens[i])
    where = f"token {token}"
    if shape is not None:
        where += f" (sequence {token // shape[1]} of the batch, position {token % shape[1]})"
    return (f"{where}: the router chose experts {index[i].tolist()} with weights "
            f"{_rounded(weights[i])}; the declared rule ({rule.describe(module)}) chooses "
            f"{mine_i[0].tolist()} with weights {_rounded(mine_w[0])} (and gives the router's "
            f"experts the weights {_rounded(declared[i])}); {int(bad.numel())} of "
            f"{flat.shape[0]} tokens disagree")


def _rounded(values: Tensor) -> list[float]:
    return [round(float(v), 5) for v in values.reshape(-1).tolist()]


def _self_check_error(family: str, layer: int, name: str, problem: str) -> SelfCheckError:
    return SelfCheckError(
        f"self-check failed for the {family!r} family with transformers {transformers_version()}: "
        f"router {layer} ({name}), {problem}. routeaudit's routing would not describe what this "
        "model computes; the family's router code may have changed (check its forward against "
        "routeaudit.hf.FAMILY_RULES) or the declared rule is wrong")


def self_check(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
               rule: RouterRule | None = None) -> int:
    """Run ``model`` on one batch and check every router against the declared rule (see the
    module docstring); raises :class:`SelfCheckError` on the first disagreement. Returns the
    number of (router, token) pairs checked."""
    family, rule = family_rule(model, rule)
    found = find_hf_routers(model, rule, family)
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids).to(device)
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(device)
    rows = mask.reshape(-1).bool()
    checked = [0]

    def inspect(layer: int, name: str, module: nn.Module, output: Any) -> None:
        problem = check_router_output(rule, module, output, rows, tuple(ids.shape))
        if problem is not None:
            raise _self_check_error(family, layer, name, problem)
        checked[0] += int(rows.sum())

    handles = [module.register_forward_hook(
        lambda mod, args, out, layer=layer, name=name: inspect(layer, name, mod, out))
        for layer, (name, module) in enumerate(found)]
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return checked[0]


def _positions(mask: Tensor) -> Tensor:
    """Position ids that skip padding, so a left-padded row is computed like the bare one."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------ batches
class _Numbered:
    """Batches with a ``sequence`` id per row when the adapter gives none (counted per pass)."""

    def __init__(self, source: Iterable[Any]) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        start = 0
        for batch in self.source:
            if isinstance(batch, Mapping) and "sequence" not in batch and "input_ids" in batch:
                n = int(torch.as_tensor(batch["input_ids"]).shape[0])
                batch = {**batch, "sequence": torch.arange(start, start + n)}
                start += n
            yield batch


def _numbering(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def batches(self: Any, split: str) -> Any:
        source = method(self, split)
        return source if isinstance(source, _Numbered) else _Numbered(source)

    return batches


# ------------------------------------------------------------------------------ adapter
class MoEAdapter(GatedAdapter):
    """Token-level traces of a Hugging Face MoE causal LM (transformers >= 5).

    As a subclass: set ``name`` (and ``checkpoint``, the weight files to key the trace
    cache by), implement ``load(device)`` returning the model and ``batches(split)``
    yielding dicts with ``input_ids [B, T]``, optional ``attention_mask [B, T]`` and
    ``sequence [B]`` (global sequence ids; counted per pass when absent). Or directly:
    ``MoEAdapter(model=model, batches={"eval": [...]} or a callable split -> batches)``.

    Every predicted token whose input and label positions are both unmasked is one
    example: next-token ``logits``, ``labels = input_ids[:, 1:]``, ``routing [N, L, E]``
    from the router hooks at the same positions, ``group`` = the sequence id. Padding on
    either side is dropped (position ids skip it, so a padded row is traced as if alone).
    The router rule is the family's (:data:`FAMILY_RULES`, or ``router_rule``) and is
    self-checked on the first batch. ``expert_logits = True`` adds each expert's logits at
    ``expert_layer`` (see :class:`~routeaudit.model.gates.GatedAdapter`); ``extra_splits``
    names other splits ``batches`` serves (e.g. ``("shift",)``). A subclass that adds its
    own ``cache_key`` should include ``super().cache_key()`` (the transformers version).

    ``expert_logits`` costs E extra forward passes per batch and stores ``N x E x V``
    floats: meant for small vocabularies and expert counts (it is skipped under
    interventions).
    """

    name = "moe"
    per_token = True
    expert_logits: bool = False
    expert_layer: int = -1
    extra_splits: tuple[str, ...] = ()
    #: Overrides the family's declared rule (it must still pass the self-check).
    router_rule: ClassVar[RouterRule | None] = None

    _model: Any = None
    _source: Any = None
    _user_key: str | None = None
    _self_checked: bool = False
    _resolved: tuple[int, str, RouterRule, list[tuple[str, nn.Module]]] | None = None
    _rows: Tensor | None = None
    _shape: tuple[int, int] | None = None
    _counted: int = 0

    def __init__(self, model: nn.Module | None = None,
                 batches: Mapping[str, Iterable[Any]] | Callable[[str], Iterable[Any]] | None = None,
                 *, name: str | None = None, split: str | None = None,
                 extra_splits: Iterable[str] | None = None, expert_logits: bool | None = None,
                 expert_layer: int | None = None, cache_key: str | None = None) -> None:
        if (model is None) != (batches is None) and type(self) is MoEAdapter:
            raise routeaudit.AdapterError("MoEAdapter(model=..., batches=...) needs both; or "
                                          "subclass it and implement load() and batches()")
        if isinstance(batches, Mapping):
            for key, value in batches.items():
                if iter(value) is value:
                    raise routeaudit.AdapterError(
                        f"batches[{key!r}] is a one-shot iterator; pass a list (routeaudit reads "
                        "the batches again for causal audits and the cache key)")
        elif batches is not None and not callable(batches):
            raise routeaudit.AdapterError("batches must be a mapping split -> batches or a "
                                          f"callable split -> batches, not {type(batches).__name__}")
        self._model, self._source, self._user_key = model, batches, cache_key
        for attr, value in (("name", name), ("split", split), ("expert_logits", expert_logits),
                            ("expert_layer", expert_layer)):
            if value is not None:
                setattr(self, attr, value)
        if extra_splits is not None:
            self.extra_splits = tuple(str(s) for s in extra_splits)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "batches" in cls.__dict__:  # count sequences the subclass does not number
            cls.batches = _numbering(cls.__dict__["batches"])  # type: ignore[method-assign]

    # --- the Adapter contract
    def load(self, device: Any) -> nn.Module:
        if self._model is None:
            raise NotImplementedError(f"{type(self).__name__} must implement load(device) "
                                      "(or be built as MoEAdapter(model=..., batches=...))")
        return self._model.to(device).eval()

    def batches(self, split: str) -> Iterable[Any]:
        if self._source is None:
            raise NotImplementedError(f"{type(self).__name__} must implement batches(split)")
        if callable(self._source):
            return _Numbered(self._source(split))
        if split not in self._source:
            raise routeaudit.AdapterError(f"{type(self).__name__} has no split {split!r}; it has "
                                          f"{sorted(self._source)}")
        return _Numbered(self._source[split])

    def cache_key(self) -> str:
        """The transformers version (the modeling code is part of what the traces depend on);
        built directly from a model, also a digest of its weights and batches."""
        parts = [f"transformers={transformers_version()}"]
        if self._user_key is not None:
            parts.append(f"user={self._user_key}")
        elif self._model is not None:
            parts.append(f"weights={_digest_model(self._model)}")
            splits = dict.fromkeys([self.split, *self.extra_splits])
            parts.append(f"batches={_digest_batches(self.batches(s) for s in splits)}")
        return ";".join(parts)

    # --- GatedAdapter hooks
    def rule_for(self, model: nn.Module) -> RouterRule:
        return self._resolve(model)[2]

    def router_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return self._resolve(model)[3]

    def _resolve(self, model: nn.Module) -> tuple[int, str, RouterRule, list[tuple[str, nn.Module]]]:
        if self._resolved is None or self._resolved[0] != id(model):
            family, rule = family_rule(model, self.router_rule)
            self._resolved = (id(model), family, rule, find_hf_routers(model, rule, family))
        return self._resolved

    def predict(self, model: Any, batch: Any) -> dict[str, Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise routeaudit.AdapterError(f"{type(self).__name__}: a batch must be a dict with "
                                          "input_ids [B, T] (and optionally attention_mask, sequence)")
        device = next(model.parameters()).device
        ids = torch.as_tensor(batch["input_ids"]).to(device).long()
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise routeaudit.AdapterError(f"input_ids must be [B, T] with T >= 2, got "
                                          f"{tuple(ids.shape)}")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).to(device).long()
        if mask.shape != ids.shape:
            raise routeaudit.AdapterError(f"attention_mask has shape {tuple(mask.shape)}, "
                                          f"input_ids {tuple(ids.shape)}")
        n_seq, n_pos = ids.shape
        sequence = torch.as_tensor(batch["sequence"]).to(device).long().reshape(n_seq)
        self._rows, self._shape = mask.reshape(-1).bool(), (n_seq, n_pos)
        out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                    use_cache=False)
        # one row per position, so rows line up with the router's tokens; the last position
        # predicts nothing and is dropped with the padding by `keep`
        labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        keep = torch.zeros_like(mask, dtype=torch.bool)
        keep[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool()
        return {"logits": out.logits, "labels": labels, "keep": keep,
                "group": sequence[:, None].expand(n_seq, n_pos)}

    def inspect_router(self, layer: int, name: str, module: nn.Module, output: Any) -> None:
        if self._self_checked or self._resolved is None:
            return
        problem = check_router_output(self._resolved[2], module, output, self._rows, self._shape)
        if problem is not None:
            raise _self_check_error(self._resolved[1], layer, name, problem)

    def forward(self, model: Any, batch: Any) -> routeaudit.ForwardOutput:
        self._resolve(model)
        if isinstance(batch, Mapping) and "input_ids" in batch and "sequence" not in batch:
            n_seq = int(torch.as_tensor(batch["input_ids"]).shape[0])  # not from batches():
            batch = {**batch, "sequence": torch.arange(self._counted, self._counted + n_seq)}
            self._counted += n_seq
        out = super().forward(model, batch)
        self._self_checked = True
        return out


def _digest_model(model: nn.Module) -> str:
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string().encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest_batches(passes: Iterable[Iterable[Any]]) -> str:
    digest = hashlib.sha256()
    for batches in passes:
        digest.update(b"|split|")
        for batch in batches:
            for key in sorted(batch):
                value = torch.as_tensor(batch[key]).detach().cpu().contiguous()
                digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
                digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
