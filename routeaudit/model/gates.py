"""Routing capture and interventions on the router ("gate") modules of any torch MoE model.

Why hooks on the routers, not a patched model: the model's own forward stays untouched, so
what the traces describe is what the model computes, and every intervention is undone when
its context ends (the hooks are removed; no weight is ever written).

Three pieces, each usable alone:

* a **rule** (:class:`GateRule`) says how a router's output becomes the declared routing
  distribution ``[T, E]`` and how to rewrite that output for an intervention.
  :class:`LogitsGate` is the rule for a router that returns plain logits (an ``nn.Linear``
  gate whose block does softmax / top-k afterwards); ``routeaudit.hf`` declares the rules
  of the Hugging Face MoE families (routers returning ``(logits, weights, indices)``);
* :class:`RouterCapture` hooks the routers: it records each call's routing in layer order
  (``routing() -> [T, L, E]``, ``choices()``) and/or applies a
  :class:`~routeaudit.model.intervention.RoutingIntervention` (:meth:`RouterCapture.intervening`);
* :class:`GatedAdapter` is an :class:`~routeaudit.model.adapter.Adapter` built on both: a
  subclass names its routers and rule and writes ``load``, ``batches`` and ``predict``;
  ``forward``, ``intervene``, the MoE trace metadata and (optionally) ``expert_logits`` come
  for free.

Interventions (the trace's ``S`` axis is the expert index, ``L`` the router's position):

* ``mask`` removes experts at the selected layers: their logit is −∞ *before* the top-k, so
  their tokens re-route to the next choice (``renormalize=False``: their weight is zeroed
  and nothing re-routes; only rules that see the top-k weights can do that);
* ``mean`` / ``schedule`` fix the routing distribution of every token to the ``[L, E]`` row
  of ``weights`` (:func:`uniform_routing`: 1/E everywhere).

torch is imported at module level: nothing that ``import routeaudit`` loads imports this
module (it is not re-exported by ``routeaudit.model``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from routeaudit.errors import AdapterError
from routeaudit.model.adapter import Adapter, ForwardOutput
from routeaudit.model.intervention import RoutingIntervention

#: Which modules are routers: qualified names (``model.named_modules()``), or a predicate.
Routers = Sequence[str] | Callable[[str, nn.Module], bool]
#: Called with (layer, name, module, output) on each router call, before any intervention.
Inspector = Callable[[int, str, nn.Module, Any], None]
#: A fixed routing row may miss 1 by this much (a mean of float32 rows); it is then rescaled.
WEIGHTS_ROW_TOLERANCE = 1e-3


class GateRule(Protocol):
    """How a router's output becomes routing probabilities, and how to rewrite it."""

    def probs(self, output: Any, module: nn.Module) -> Tensor:
        """The declared routing distribution: float32 ``[T, E]``, rows summing to 1."""

    def intervene(self, output: Any, module: nn.Module, *, removed: Tensor | None,
                  weights: Tensor | None, renormalize: bool = True) -> Any:
        """The router output with experts ``removed`` (bool ``[E]``: −∞ before the top-k, so
        tokens re-route; ``renormalize=False``: their weights zeroed, nothing re-routes), or
        with every token's routing fixed to ``weights`` (``[E]``, summing to 1)."""

    def choices(self, output: Any, module: nn.Module) -> Tensor | None:
        """The experts the model sends each token to (``[T, k]`` indices), when known."""

    def n_experts_of(self, module: nn.Module) -> int:
        """E, from the router module (before it runs)."""

    def top_k_of(self, module: nn.Module) -> int | None:
        """Experts per token, or None when the rule does not know it."""

    def is_hard(self, module: nn.Module) -> bool:
        """True when every token goes to one expert with a constant weight."""


@dataclass(frozen=True)
class LogitsGate:
    """The rule for a router whose output is a plain logits tensor ``[..., E]``.

    The routing distribution is ``activation`` over the logits (``sigmoid`` rows are
    normalised to sum to 1). ``top_k`` (optional) describes the block after the gate: it
    gives ``choices()`` and the trace's ``top_k`` / ``routing_mode`` (``top_k=1`` means
    hard routing: the block gives its one expert weight 1). ``n_experts`` is needed only
    when the gate module has no ``out_features`` or 2-D ``weight``.

    Interventions rewrite the logits: masking fills −∞ (a downstream softmax + top-k then
    re-routes to the next choice); fixed weights ``w`` become logits ``log w`` (``logit w``
    for sigmoid), which a downstream softmax turns back into ``w`` exactly. A downstream
    top-k of a uniform row can only break the tie: it keeps k experts, so only rules that
    replace the top-k itself (``routeaudit.hf``) give true dense uniform routing for top-k
    blocks. Zeroing weights without renormalising (``renormalize=False``) cannot be written
    as logits and is refused.
    """

    activation: Literal["softmax", "sigmoid"] = "softmax"
    top_k: int | None = None
    n_experts: int | None = None

    def __post_init__(self) -> None:
        if self.activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', not {self.activation!r}")

    def probs(self, output: Any, module: nn.Module) -> Tensor:
        logits = _as_logits(output).float()
        return activate(logits.reshape(-1, logits.shape[-1]), self.activation)

    def intervene(self, output: Any, module: nn.Module, *, removed: Tensor | None,
                  weights: Tensor | None, renormalize: bool = True) -> Any:
        logits = _as_logits(output)
        if weights is not None:
            fixed = weights.log() if self.activation == "softmax" else torch.logit(weights)
            return fixed.to(device=logits.device, dtype=logits.dtype).expand_as(logits).clone()
        if removed is None:
            return output
        if not renormalize:
            raise AdapterError(
                "LogitsGate cannot zero an expert's weight without re-routing "
                "(renormalize=False): the block's softmax renormalises whatever logits the gate "
                "returns; use renormalize=True, or a rule that returns the top-k weights")
        return logits.masked_fill(removed.to(logits.device), float("-inf"))

    def choices(self, output: Any, module: nn.Module) -> Tensor | None:
        if self.top_k is None:
            return None
        logits = _as_logits(output)
        return logits.reshape(-1, logits.shape[-1]).topk(self.top_k, dim=-1).indices

    def n_experts_of(self, module: nn.Module) -> int:
        if self.n_experts is not None:
            return int(self.n_experts)
        if isinstance(getattr(module, "out_features", None), int):
            return int(module.out_features)  # type: ignore[arg-type]
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.ndim == 2:
            return int(weight.shape[0])
        raise AdapterError(f"cannot tell how many experts {type(module).__name__} routes to; "
                           "pass LogitsGate(n_experts=E)")

    def top_k_of(self, module: nn.Module) -> int | None:
        return self.top_k

    def is_hard(self, module: nn.Module) -> bool:
        return self.top_k == 1


def _as_logits(output: Any) -> Tensor:
    if not isinstance(output, Tensor):
        raise AdapterError(f"LogitsGate expects the router to return a logits tensor, not "
                           f"{type(output).__name__}; use a rule for its output type")
    return output


def activate(logits: Tensor, activation: str) -> Tensor:
    """Routing probabilities from float32 logits ``[T, E]``: softmax, or sigmoid normalised."""
    if activation == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / scores.sum(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------ routers
def find_routers(model: nn.Module, routers: Routers) -> list[tuple[str, nn.Module]]:
    """(name, module) of every router, in the order given (names) or of ``named_modules``."""
    modules = dict(model.named_modules())
    if callable(routers):
        found = [(name, module) for name, module in modules.items() if routers(name, module)]
        if not found:
            raise AdapterError(f"no module of {type(model).__name__} matches the router predicate")
        return found
    names = [routers] if isinstance(routers, str) else list(routers)
    if not names:
        raise AdapterError("no routers named: set `routers` to their module names or a predicate")
    missing = [name for name in names if name not in modules]
    if missing:
        near = [n for n in modules if n and n.split(".")[-1] == missing[0].split(".")[-1]][:5]
        hint = f"; modules with that last name: {near}" if near else ""
        raise AdapterError(f"{type(model).__name__} has no module named {missing[0]!r}{hint}")
    return [(name, modules[name]) for name in names]


def expert_families(n_experts: int) -> dict[str, list[int]]:
    """One source family per expert: ``{"expert0": [0], ...}``."""
    return {f"expert{k}": [k] for k in range(n_experts)}


def uniform_routing(n_layers: int, n_experts: int) -> RoutingIntervention:
    """Every token routed to every expert with weight 1/E, at every routing layer."""
    weights = np.full((int(n_layers), int(n_experts)), 1.0 / int(n_experts))
    return RoutingIntervention(kind="schedule", weights=weights, label="uniform routing")


@dataclass(frozen=True)
class SiteChange:
    """What an intervention does at one routing layer (numpy; moved to the device per call)."""

    removed: np.ndarray | None = None  # bool [E]
    weights: np.ndarray | None = None  # float [E], summing to 1
    renormalize: bool = True


def plan_sites(intervention: RoutingIntervention, n_layers: int, n_experts: int, *,
               layer_types: Sequence[str] | None = None,
               source_families: Mapping[str, list[int]] | None = None) -> list[SiteChange | None]:
    """The change at each of ``n_layers`` routers (None: untouched), validated up front so a
    bad intervention fails before the model runs. Default metadata: every router an ``mlp``
    site, one family per expert (:func:`expert_families`)."""
    types = list(layer_types) if layer_types is not None else ["mlp"] * n_layers
    families = dict(source_families) if source_families is not None else expert_families(n_experts)
    what = intervention.label or intervention.kind
    try:
        sites = intervention.site_mask(types, n_layers)
        if intervention.kind == "mask":
            removed = intervention.source_mask(families, n_experts)
    except ValueError as exc:
        raise AdapterError(f"cannot apply the intervention {what!r}: {exc}") from exc
    if intervention.kind == "mask":
        if removed.all():
            raise AdapterError(f"the intervention {what!r} masks every one of the {n_experts} "
                               "experts; at least one must stay")
        change = SiteChange(removed=removed, renormalize=bool(intervention.renormalize))
        return [change if site else None for site in sites]
    weights = np.asarray(intervention.weights, dtype=np.float64)
    if weights.shape != (n_layers, n_experts):
        raise AdapterError(f"the intervention {what!r} has weights of shape {weights.shape}; "
                           f"this model routes [L, E] = [{n_layers}, {n_experts}]")
    out: list[SiteChange | None] = []
    for layer, site in enumerate(sites):
        if not site:
            out.append(None)
            continue
        row = weights[layer]
        total = float(row.sum()) if np.all(np.isfinite(row)) else float("nan")
        if np.any(row < 0) or not abs(total - 1.0) <= WEIGHTS_ROW_TOLERANCE:
            raise AdapterError(f"the intervention {what!r} gives layer {layer} the weights "
                               f"{np.round(row, 4).tolist()}: a routing row must be non-negative "
                               "and sum to 1")
        out.append(SiteChange(weights=row / total))
    return out


# ------------------------------------------------------------------------------ capture
class RouterCapture:
    """Forward hooks on the routers: record routing, apply an intervention, or both.

    ``routers`` is a :data:`Routers` spec or the (name, module) list of :func:`find_routers`.
    Inside ``with RouterCapture(model, routers, rule) as cap:`` every router call appends
    its float32 routing ``[T, E]`` (and the rule's ``choices``); ``cap.routing()`` stacks
    them ``[T, L, E]`` in router order (several calls per router are concatenated along T).
    With ``plan`` (one :class:`SiteChange` or None per router), each router's output is
    replaced by ``rule.intervene``; those hooks go first, so a capture opened at the same
    time records the routing the model actually used. ``inspect`` sees every raw output.
    Leaving the context removes every hook, also on error.
    """

    def __init__(self, model: nn.Module, routers: Routers | list[tuple[str, nn.Module]],
                 rule: GateRule, *, plan: Sequence[SiteChange | None] | None = None,
                 record: bool = True, inspect: Inspector | None = None) -> None:
        self.model = model
        self.found = _resolve(model, routers)
        self.rule = rule
        if plan is not None and len(plan) != len(self.found):
            raise AdapterError(f"an intervention plan for {len(plan)} routers, the model has "
                               f"{len(self.found)}")
        self.plan = list(plan) if plan is not None else None
        self.record = record
        self.inspect = inspect
        self._probs: list[list[Tensor]] = [[] for _ in self.found]
        self._choices: list[list[Tensor | None]] = [[] for _ in self.found]
        self._handles: list[Any] = []
        self._on_device: dict[tuple[int, str, Any], Tensor] = {}

    @classmethod
    def intervening(cls, model: nn.Module, routers: Routers | list[tuple[str, nn.Module]],
                    rule: GateRule, intervention: RoutingIntervention, *,
                    layer_types: Sequence[str] | None = None,
                    source_families: Mapping[str, list[int]] | None = None,
                    inspect: Inspector | None = None) -> RouterCapture:
        """A context under which every selected router's output is ``rule.intervene``-d
        (validated now; nothing recorded)."""
        found = _resolve(model, routers)
        n_experts = _n_experts(found, rule)
        plan = plan_sites(intervention, len(found), n_experts, layer_types=layer_types,
                          source_families=source_families)
        return cls(model, found, rule, plan=plan, record=False, inspect=inspect)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.found]

    def __enter__(self) -> RouterCapture:
        try:
            for layer, (_, module) in enumerate(self.found):
                self._handles.append(module.register_forward_hook(
                    self._hook(layer), prepend=self.plan is not None))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this capture registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int) -> Callable[[nn.Module, Any, Any], Any]:
        name = self.found[layer][0]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.inspect is not None:
                self.inspect(layer, name, module, output)
            change = self.plan[layer] if self.plan is not None else None
            if change is not None:
                output = self.rule.intervene(
                    output, module, removed=self._tensor(layer, "removed", change, output),
                    weights=self._tensor(layer, "weights", change, output),
                    renormalize=change.renormalize)
            if self.record:
                with torch.no_grad():
                    self._probs[layer].append(self.rule.probs(output, module).detach().float())
                    choice = self.rule.choices(output, module)
                    self._choices[layer].append(None if choice is None else choice.detach())
            return output if change is not None else None

        return hook

    def _tensor(self, layer: int, field: str, change: SiteChange, output: Any) -> Tensor | None:
        value = getattr(change, field)
        if value is None:
            return None
        device = _device_of(output)
        key = (layer, field, device)
        if key not in self._on_device:
            dtype = torch.bool if field == "removed" else torch.float32
            self._on_device[key] = torch.as_tensor(value, dtype=dtype, device=device)
        return self._on_device[key]

    def routing(self) -> Tensor:
        """float32 ``[T, L, E]``: each router's routing, its calls concatenated along T."""
        if not self.record:
            raise AdapterError("this RouterCapture does not record (record=False)")
        per_layer = []
        for layer, calls in enumerate(self._probs):
            if not calls:
                raise AdapterError(f"router {self.found[layer][0]!r} was not called: is it part "
                                   "of the forward pass?")
            per_layer.append(torch.cat(calls))
        rows = {t.shape[0] for t in per_layer}
        if len(rows) != 1:
            counts = {self.found[i][0]: t.shape[0] for i, t in enumerate(per_layer)}
            raise AdapterError(f"the routers saw different numbers of tokens {counts}; a "
                               "routing trace needs every router to route every token")
        return torch.stack(per_layer, dim=1)

    def choices(self) -> list[Tensor] | None:
        """Per router, the model's own expert indices ``[T, k]``; None when the rule has none."""
        out = []
        for calls in self._choices:
            if not calls or any(c is None for c in calls):
                return None
            out.append(torch.cat([c for c in calls if c is not None]))
        return out

    def clear(self) -> None:
        """Forget what was recorded (the hooks stay)."""
        for calls in (*self._probs, *self._choices):
            calls.clear()


def _resolve(model: nn.Module, routers: Routers | list[tuple[str, nn.Module]]
             ) -> list[tuple[str, nn.Module]]:
    if isinstance(routers, list) and routers and all(
            isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], nn.Module) for r in routers):
        return list(routers)
    return find_routers(model, routers)  # type: ignore[arg-type]


def _n_experts(found: list[tuple[str, nn.Module]], rule: GateRule) -> int:
    counts = {name: rule.n_experts_of(module) for name, module in found}
    if len(set(counts.values())) != 1:
        raise AdapterError(f"the routers route to different numbers of experts {counts}; a "
                           "routing trace needs one expert axis")
    return next(iter(counts.values()))


def _device_of(output: Any) -> torch.device:
    if isinstance(output, Tensor):
        return output.device
    for item in output if isinstance(output, (tuple, list)) else ():
        if isinstance(item, Tensor):
            return item.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------ adapter
class GatedAdapter(Adapter):
    """A model adapter for any torch MoE model, from its routers and their rule.

    Set ``routers`` (module names or a predicate ``(name, module) -> bool``) and
    ``gate_rule``; implement ``load(device)``, ``batches(split)`` and ``predict(model,
    batch)``, returning ``(logits, labels)``, ``(logits, labels, keep)`` or a mapping with
    ``logits``, ``labels`` and optional ``keep`` (bool: rows to trace) and ``group``. One
    row of ``logits`` (leading dims flattened) must be one row the routers route: a token
    classifier returns ``[B, T, C]`` for routers that see ``B * T`` tokens.

    ``forward`` runs ``predict`` under a :class:`RouterCapture` and returns the routing
    ``[N, L, E]`` of the kept rows, and fills the MoE trace metadata (``source_kind
    "experts"``, one family per expert, ``layer_names`` = router names, ``routing_mode``,
    ``top_k``). ``intervene`` applies a RoutingIntervention through the same hooks.

    ``expert_logits = True`` adds ``expert_logits [N, E, C]``: for each expert k one more
    ``predict`` in which the router at ``expert_layer`` sends every token to k alone
    (fixed one-hot routing). At the last routing layer that is expert k's own prediction;
    at an earlier one it is expert k's effect on the final prediction. Passes under an
    intervention skip them (causal audits read logits only).
    """

    routers: ClassVar[Routers] = ()
    gate_rule: ClassVar[GateRule | None] = None
    per_token: bool = False
    expert_logits: bool = False
    expert_layer: int = -1

    _intervening: int = 0
    _user_meta: dict[str, Any] | None = None

    def predict(self, model: Any, batch: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement predict(model, batch)")

    # --- what subclasses may override
    def rule_for(self, model: nn.Module) -> GateRule:
        """The rule of this model's routers (default: the class's ``gate_rule``)."""
        if self.gate_rule is None:
            raise AdapterError(f"{type(self).__name__} sets no gate_rule (e.g. LogitsGate())")
        return self.gate_rule

    def router_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of the routers, in layer order (default: from ``routers``)."""
        # from the class, not the instance: a predicate set as a class attribute must not
        # become a bound method
        spec = self.__dict__.get("routers", getattr(type(self), "routers", ()))
        return find_routers(model, spec)

    def inspect_router(self, layer: int, name: str, module: nn.Module, output: Any) -> None:
        """Sees every raw router output of a traced or intervened pass (default: nothing)."""

    # --- the Adapter contract
    def forward(self, model: Any, batch: Any) -> ForwardOutput:
        found = self.router_modules(model)
        rule = self.rule_for(model)
        inspect = None if self._intervening else self.inspect_router
        with RouterCapture(model, found, rule, inspect=inspect) as capture:
            logits, labels, keep, group = self._predicted(model, batch)
        routing = capture.routing()
        if routing.shape[0] != logits.shape[0]:
            raise AdapterError(
                f"{type(self).__name__}.predict returned {logits.shape[0]} rows, but the routers "
                f"routed {routing.shape[0]} tokens; each row of logits must be one routed token "
                "(e.g. logits [B, T, C] for routers that see B * T tokens)")
        self._set_meta(found, rule)
        expert = None
        if self.expert_logits and not self._intervening:
            expert = self._expert_logits(model, batch, found, rule, keep)
        if keep is not None:
            logits, labels, routing = logits[keep], labels[keep], routing[keep]
            group = group[keep] if group is not None else None
        return ForwardOutput(logits, labels, routing, expert_logits=expert, group=group)

    def intervene(self, model: Any, intervention: RoutingIntervention
                  ) -> contextlib.AbstractContextManager[Any]:
        found = self.router_modules(model)
        rule = self.rule_for(model)
        n_experts = _n_experts(found, rule)
        families = dict(self.meta.get("source_families") or expert_families(n_experts))
        types = self.meta.get("layer_types") or ["mlp"] * len(found)
        capture = RouterCapture.intervening(model, found, rule, intervention, layer_types=types,
                                            source_families=families, inspect=self.inspect_router)
        return self._active(capture)

    @contextlib.contextmanager
    def _active(self, capture: RouterCapture) -> Iterator[RouterCapture]:
        with capture:
            self._intervening += 1
            try:
                yield capture
            finally:
                self._intervening -= 1

    # --- internals
    def _predicted(self, model: Any, batch: Any) -> tuple[Tensor, Tensor, Tensor | None, Any]:
        out = self.predict(model, batch)
        where = f"{type(self).__name__}.predict"
        if isinstance(out, Mapping):
            unknown = set(out) - {"logits", "labels", "keep", "group"}
            if unknown or not {"logits", "labels"} <= set(out):
                raise AdapterError(f"{where} returned the keys {sorted(out)}; expected logits, "
                                   "labels and optionally keep, group")
            logits, labels, keep, group = (out["logits"], out["labels"], out.get("keep"),
                                           out.get("group"))
        elif isinstance(out, tuple) and len(out) in (2, 3):
            logits, labels, keep, group = (*out, None, None)[:4]
        else:
            raise AdapterError(f"{where} must return (logits, labels[, keep]) or a mapping, not "
                               f"{type(out).__name__}")
        logits = torch.as_tensor(logits)
        rows = logits.shape[:-1].numel() if logits.ndim > 1 else 0
        if logits.ndim < 2:
            raise AdapterError(f"{where} returned logits of shape {tuple(logits.shape)}; "
                               "expected [..., C]")
        logits = logits.reshape(rows, logits.shape[-1])
        labels = torch.as_tensor(labels).reshape(rows)
        if keep is not None:
            keep = torch.as_tensor(keep, device=logits.device).reshape(rows).bool()
        if group is not None:
            group = torch.as_tensor(group).reshape(rows)
        return logits, labels, keep, group

    def _expert_logits(self, model: Any, batch: Any, found: list[tuple[str, nn.Module]],
                       rule: GateRule, keep: Tensor | None) -> Tensor:
        n_layers, n_experts = len(found), _n_experts(found, rule)
        layer = self._expert_layer_index(n_layers)
        per_expert = []
        for expert in range(n_experts):
            plan: list[SiteChange | None] = [None] * n_layers
            plan[layer] = SiteChange(weights=np.eye(n_experts)[expert])
            with RouterCapture(model, found, rule, plan=plan, record=False):
                logits = self._predicted(model, batch)[0]
            per_expert.append(logits[keep] if keep is not None else logits)
        return torch.stack(per_expert, dim=1)

    def _expert_layer_index(self, n_layers: int) -> int:
        layer = int(self.expert_layer)
        if not -n_layers <= layer < n_layers:
            raise AdapterError(f"{type(self).__name__}.expert_layer = {layer}, but the model has "
                               f"{n_layers} routing layers")
        return layer % n_layers

    def _set_meta(self, found: list[tuple[str, nn.Module]], rule: GateRule) -> None:
        if self._user_meta is None:
            self._user_meta = dict(getattr(self, "meta", {}) or {})
        n_layers, n_experts = len(found), _n_experts(found, rule)
        first = found[0][1]
        derived: dict[str, Any] = {
            "family": "moe", "source_kind": "experts",
            "source_families": expert_families(n_experts),
            "layer_types": ["mlp"] * n_layers, "layer_depth": list(range(n_layers)),
            "layer_names": [name for name, _ in found],
            "routing_mode": "hard" if rule.is_hard(first) else "soft",
            "top_k": rule.top_k_of(first), "per_token": bool(self.per_token),
            "expert_layer": self._expert_layer_index(n_layers) if self.expert_logits else None,
        }
        self.meta = {**derived, **self._user_meta}  # type: ignore[misc]
