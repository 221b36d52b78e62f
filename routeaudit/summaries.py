"""Routing summaries: named functions of a TraceSet giving one value (or one profile) per example.

The definitions follow docs/methods.md §2.1. Where the papers leave a choice open the default
is the one docs/methods.md gives, and the alternative is registered under its own name, so a
report always says which variant was audited:

- ``r_agg``: mean over layers with ≥ 2 valid sources of H_l = −Σ_k α_k log α_k (nats).
- ``r_agg_normalized``: the same with H_l / log n_l (n_l = valid sources at layer l).
- ``depth_variance``: variant A, the routing-weighted variance of the normalised source depth
  within each layer, averaged over layers (AR-CondCal's auxiliary feature, default).
- ``depth_variance_across``: variant B, the variance across layers of the expected depth.
- ``profile`` / ``profile_normalized``: the full vector (H_1..H_L') for MLP calibrators.
- ``H<l>`` / ``H<l>_norm``: the entropy of one layer (0-based l), resolved on demand.

Mixture-of-Experts traces (``meta.source_kind == "experts"``) have experts, not depths, on
the source axis: an expert's index is a name with no order, so the depth summaries
(``depth_variance``, ``depth_variance_across``) are not offered there (asking for one is a
usage error that says why). Entropies do not depend on the order and stay. MoE summaries
(docs/methods.md §4), each over the routing layers with ≥ 2 experts:

- ``top1_prob``: the largest routing probability, mean over layers (router sharpness).
- ``top1_margin``: top-1 minus top-2 probability, mean over layers (how close the router was
  to sending the token elsewhere).
- ``top1_expert``: the index of the top-1 expert at the expert layer (``meta.expert_layer``,
  default the last): a categorical label (a routing cell), for calibrators that condition
  on the routed region; never a default claim.
- ``expert_load``: the share of all tokens whose top-1 is the token's own top-1 expert,
  mean over layers (a token routed to a crowded or to a rarely used expert).
  :func:`expert_load_table` gives the load per layer and expert and its entropy.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

import routeaudit.metrics as metrics
from routeaudit.errors import UsageError
from routeaudit.traces import TraceSet

SummaryFn = Callable[[TraceSet], np.ndarray]


#: Which source axes a summary makes sense on (``TraceMeta.source_kind``).
AppliesTo = Literal["any", "depth", "experts"]


@dataclass(frozen=True)
class Summary:
    """A registered summary: its function and what it is (for listing and default cells).

    ``applies_to`` says which source axes the definition makes sense on: a summary that
    reads the source index as a depth is ``"depth"``; one that needs experts is
    ``"experts"``. ``categorical`` marks labels (an expert index), which are never a
    default claim: their order means nothing to a stratification.
    """

    name: str
    fn: SummaryFn
    description: str
    kind: Literal["routing", "output"] = "routing"
    shape: Literal["scalar", "profile"] = "scalar"
    applies_to: AppliesTo = "any"
    categorical: bool = False

    def applies(self, traces: TraceSet) -> bool:
        return self.applies_to == "any" or self.applies_to == traces.meta.source_kind


class SummaryRegistry:
    """Name → Summary. Plugins add entries through ``routeaudit_register_summaries``."""

    _layer_pattern = re.compile(r"^H(\d+)(_norm)?$")

    def __init__(self) -> None:
        self._items: dict[str, Summary] = {}

    def register(self, name: str, fn: SummaryFn, description: str, *,
                 kind: Literal["routing", "output"] = "routing",
                 shape: Literal["scalar", "profile"] = "scalar",
                 applies_to: AppliesTo = "any", categorical: bool = False) -> None:
        if name in self._items:
            raise UsageError(f"summary {name!r} is registered twice")
        if applies_to not in ("any", "depth", "experts"):
            raise UsageError(f"summary {name!r}: applies_to must be 'any', 'depth' or "
                             f"'experts', not {applies_to!r}")
        self._items[name] = Summary(name, fn, description, kind, shape, applies_to, categorical)

    def get(self, name: str) -> Summary:
        if name in self._items:
            return self._items[name]
        match = self._layer_pattern.match(name)
        if match:
            layer, normalized = int(match.group(1)), bool(match.group(2))
            return Summary(name, lambda ts: layer_entropy(ts, layer, normalized=normalized),
                           f"routing entropy of layer {layer}"
                           + (" / log n_l" if normalized else ""))
        known = ", ".join(sorted(self._items))
        raise UsageError(f"unknown summary {name!r}; known: {known}, or H<layer>[_norm]")

    def check(self, name: str, traces: TraceSet) -> None:
        """Raise a UsageError naming what exists unless ``name`` can be computed for ``traces``
        (an unknown name, or ``H<l>`` for a layer the traces do not have)."""
        summary = self.get(name)
        if not summary.applies(traces):
            raise UsageError(_not_applicable(summary, traces)
                             + f"; summaries that apply: {', '.join(self.applicable(traces))}")
        match = self._layer_pattern.match(name)
        if match and int(match.group(1)) >= traces.n_layers:
            last = traces.n_layers - 1
            layers = (f"H0..H{last}" if last > 0 else "H0") if last >= 0 else "none"
            raise UsageError(
                f"unknown summary {name!r}: the traces {traces.meta.name!r} have "
                f"{traces.n_layers} routing layers, numbered from 0 (per-layer summaries: "
                f"{layers}); other summaries: {', '.join(s.name for s in self)}")

    def __iter__(self) -> Iterator[Summary]:
        return iter(self._items.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items
                                          or bool(self._layer_pattern.match(name)))

    def applicable(self, traces: TraceSet) -> list[str]:
        """Names of the summaries whose definition makes sense on these traces."""
        return [s.name for s in self if s.applies(traces)]

    def default_cells(self, traces: TraceSet | None = None) -> list[str]:
        """Scalar, non-categorical routing summaries that apply to ``traces`` (all source
        kinds when None): the claims audited when the user names none."""
        return [s.name for s in self if s.kind == "routing" and s.shape == "scalar"
                and not s.categorical and (traces is None or s.applies(traces))]


def _not_applicable(summary: Summary, traces: TraceSet) -> str:
    """Why ``summary`` is not offered on ``traces`` (one sentence, no trailing period)."""
    if summary.applies_to == "depth":
        return (f"summary {summary.name!r} reads the source index as a depth, but the sources "
                f"of {traces.meta.name!r} are experts (meta.source_kind = 'experts'), whose "
                "index is a name with no order")
    return (f"summary {summary.name!r} needs Mixture-of-Experts traces (meta.source_kind = "
            f"'experts'); the sources of {traces.meta.name!r} are "
            f"{traces.meta.source_kind!r} sources")


class FeatureCache:
    """Memoised summaries of one TraceSet, so each is computed once per run."""

    def __init__(self, traces: TraceSet, registry: SummaryRegistry) -> None:
        self.traces = traces
        self.registry = registry
        self._values: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._values:
            value = np.asarray(self.registry.get(name).fn(self.traces), dtype=np.float64)
            if value.shape[0] != self.traces.n_examples:
                raise UsageError(f"summary {name!r} returned {value.shape[0]} values for "
                                 f"{self.traces.n_examples} examples")
            self._values[name] = value
        return self._values[name]


# ---------------------------------------------------------------------- definitions
# Every routing summary is computed block by block over examples (TraceSet.row_blocks), so
# peak memory is O(block × L × S) plus the O(N) result, whether routing is in memory or a
# memory-mapped trace directory. Each example's value depends on its own rows only, computed
# by the same operations as on the whole array, so blocks change no value.
def _routing64(traces: TraceSet, rows: slice = slice(None)) -> np.ndarray:
    """Routing of the examples in ``rows`` as float64, masked sources 0 (in place: one copy)."""
    out = traces.routing[rows].astype(np.float64)
    masked = ~traces.source_mask
    if masked.any():
        out[:, masked] = 0.0
    return out


_MEMO: dict[int, tuple[weakref.ref[TraceSet], dict[str, np.ndarray]]] = {}


def _memo(traces: TraceSet, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """A read-only profile of ``traces`` computed once while the TraceSet lives: several
    summaries share one pass over [N, L, S] routing (r_agg and r_agg_normalized the entropy
    profile, both depth variances the depth moments, the runner's content gate and the
    content_dependence audit the TV profile). Trace sets are not modified after loading."""
    entry = _MEMO.get(id(traces))
    if entry is None or entry[0]() is not traces:
        ident = id(traces)
        entry = (weakref.ref(traces, lambda _ref: _MEMO.pop(ident, None)), {})
        _MEMO[ident] = entry
    store = entry[1]
    if key not in store:
        value = compute()
        value.setflags(write=False)
        store[key] = value
    return store[key]


def _by_blocks(traces: TraceSet, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` of float64 routing [n, L, S] -> [n, ...], applied block by block and joined."""
    blocks = traces.row_blocks()
    first = fn(_routing64(traces, blocks[0]))
    out = np.empty((traces.n_examples, *first.shape[1:]), dtype=first.dtype)
    out[blocks[0]] = first
    for rows in blocks[1:]:
        out[rows] = fn(_routing64(traces, rows))
    return out


def _multi_source_layers(traces: TraceSet) -> np.ndarray:
    return traces.source_mask.sum(axis=1) >= 2


def _entropies(alpha: np.ndarray) -> np.ndarray:
    """H_l = -Σ_k α_k log α_k over the last axis."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(alpha > 0, alpha * np.log(alpha), 0.0).sum(axis=-1)


def entropy_profile(traces: TraceSet, *, normalized: bool = False) -> np.ndarray:
    """H_l per example for every layer with ≥ 2 valid sources: shape [N, L']."""
    keep = _multi_source_layers(traces)
    h = _memo(traces, "entropy", lambda: _by_blocks(traces, lambda alpha: _entropies(alpha)[:, keep]))
    if normalized:
        h = h / np.log(traces.source_mask.sum(axis=1)[keep])[None, :]
    return h


def layer_entropy(traces: TraceSet, layer: int, *, normalized: bool = False) -> np.ndarray:
    """H_l of one layer (0 where the layer has a single source)."""
    if not 0 <= layer < traces.n_layers:
        raise UsageError(f"layer {layer} out of range: traces have {traces.n_layers} layers")
    mask = traces.source_mask[layer][None]
    h = np.empty(traces.n_examples)
    for rows in traces.row_blocks(traces.n_sources):
        alpha = np.where(mask, traces.routing[rows, layer, :].astype(np.float64), 0.0)
        h[rows] = _entropies(alpha)
    n_valid = int(traces.source_mask[layer].sum())
    if normalized:
        return h / np.log(n_valid) if n_valid > 1 else np.zeros_like(h)
    return h


def source_depths(traces: TraceSet) -> np.ndarray:
    """δ_k: rank of source k among the layer's valid sources, divided by the largest rank."""
    mask = traces.source_mask
    rank = np.cumsum(mask, axis=1) - 1
    top = np.maximum(mask.sum(axis=1, keepdims=True) - 1, 1)
    return np.where(mask, rank / top, 0.0)


def _layer_depth_moments(traces: TraceSet) -> tuple[np.ndarray, np.ndarray]:
    depth = source_depths(traces)[None]
    keep = _multi_source_layers(traces)

    def moments(alpha: np.ndarray) -> np.ndarray:
        mean = (alpha * depth).sum(axis=2)
        var = (alpha * (depth - mean[..., None]) ** 2).sum(axis=2)
        return np.stack([mean[:, keep], var[:, keep]], axis=1)

    both = _memo(traces, "depth_moments", lambda: _by_blocks(traces, moments))
    return np.ascontiguousarray(both[:, 0]), np.ascontiguousarray(both[:, 1])


def _mean_over_layers(values: np.ndarray) -> np.ndarray:
    if values.shape[1] == 0:
        return np.zeros(values.shape[0])
    return values.mean(axis=1)


def r_agg(traces: TraceSet) -> np.ndarray:
    """Mean over multi-source layers of H_l (nats)."""
    return _mean_over_layers(entropy_profile(traces))


def r_agg_normalized(traces: TraceSet) -> np.ndarray:
    """Mean over multi-source layers of H_l / log n_l (in [0, 1])."""
    return _mean_over_layers(entropy_profile(traces, normalized=True))


def depth_variance(traces: TraceSet) -> np.ndarray:
    """Variant A: routing-weighted variance of source depth within a layer, mean over layers."""
    return _mean_over_layers(_layer_depth_moments(traces)[1])


def depth_variance_across(traces: TraceSet) -> np.ndarray:
    """Variant B: variance across layers of the expected source depth (0 with < 2 layers)."""
    mean, _ = _layer_depth_moments(traces)
    if mean.shape[1] < 2:
        return np.zeros(mean.shape[0])
    return mean.var(axis=1)


# ---------------------------------------------------------------------- MoE summaries
def expert_layer(traces: TraceSet) -> int:
    """The routing layer whose experts define routed regions: ``meta.expert_layer`` (a
    negative index counts from the end), else the last layer."""
    layer = traces.meta.expert_layer
    return (traces.n_layers - 1) if layer is None else layer % traces.n_layers


def _sorted_top2(traces: TraceSet) -> tuple[np.ndarray, np.ndarray]:
    keep = _multi_source_layers(traces)
    if not keep.any():
        zeros = np.zeros((traces.n_examples, 0))
        return zeros, zeros

    def top2(alpha: np.ndarray) -> np.ndarray:
        alpha = alpha[:, keep, :]
        if alpha.shape[2] >= 2:
            return -np.partition(-alpha, 1, axis=2)[:, :, :2]
        return np.concatenate([alpha, np.zeros_like(alpha)], axis=2)

    both = _by_blocks(traces, top2)
    return both[:, :, 0], both[:, :, 1]


def top1_prob(traces: TraceSet) -> np.ndarray:
    """Largest routing probability, mean over layers with >= 2 experts."""
    return _mean_over_layers(_sorted_top2(traces)[0])


def top1_margin(traces: TraceSet) -> np.ndarray:
    """Top-1 minus top-2 routing probability, mean over layers with >= 2 experts."""
    first, second = _sorted_top2(traces)
    return _mean_over_layers(first - second)


def top1_expert(traces: TraceSet) -> np.ndarray:
    """Index of the top-1 expert at :func:`expert_layer` (the first of equal weights)."""
    layer = expert_layer(traces)
    mask = traces.source_mask[layer][None]
    out = np.empty(traces.n_examples)
    for rows in traces.row_blocks(traces.n_sources):
        alpha = np.where(mask, traces.routing[rows, layer, :].astype(np.float64), 0.0)
        out[rows] = np.argmax(alpha, axis=1)
    return out


def _top1(traces: TraceSet) -> np.ndarray:
    """Index of the top-1 source of every example and layer: [N, L]."""
    return _by_blocks(traces, lambda alpha: np.argmax(alpha, axis=2))


def _load_table(traces: TraceSet, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    load = np.stack([np.bincount(top[:, layer], minlength=traces.n_sources)
                     for layer in range(traces.n_layers)]).astype(np.float64) / traces.n_examples
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(load > 0, load * np.log(load), 0.0).sum(axis=1)
    return load, entropy


def expert_load_table(traces: TraceSet) -> tuple[np.ndarray, np.ndarray]:
    """``(load [L, S], entropy [L])``: the share of tokens whose top-1 expert is each
    source, per layer, and the entropy of that share (nats; log S when balanced)."""
    return _load_table(traces, _top1(traces))


def expert_load(traces: TraceSet) -> np.ndarray:
    """Load (share of tokens) of each token's own top-1 expert, mean over multi-expert layers."""
    keep = _multi_source_layers(traces)
    if not keep.any():
        return np.zeros(traces.n_examples)
    top = _top1(traces)  # [N, L]
    load, _ = _load_table(traces, top)
    layers = np.flatnonzero(keep)
    return load[layers[None, :], top[:, layers]].mean(axis=1)


def confidence(traces: TraceSet) -> np.ndarray:
    """Top-label softmax probability."""
    return metrics.confidence_and_correct(traces.logits, traces.labels)[0]


def predictive_entropy(traces: TraceSet) -> np.ndarray:
    """Entropy of the softmax (nats)."""
    return metrics.predictive_entropy(traces.logits)


def default_registry() -> SummaryRegistry:
    """A registry holding the built-in summaries."""
    registry = SummaryRegistry()
    registry.register("r_agg", r_agg,
                      "routing entropy H_l = -sum_k a_k log a_k (nats) of each layer with >= 2 "
                      "valid sources, averaged over those layers: how spread the routing is")
    registry.register("r_agg_normalized", r_agg_normalized,
                      "r_agg with each layer's entropy divided by log n_l (n_l = its valid "
                      "sources), so layers with more sources weigh the same: 0 = one source, "
                      "1 = uniform")
    registry.register("depth_variance", depth_variance,
                      "variance of the normalised source depth (rank / largest rank) under each "
                      "layer's routing weights, averaged over layers (variant A, AR-CondCal's "
                      "feature): how many depths a layer mixes",
                      applies_to="depth")
    registry.register("depth_variance_across", depth_variance_across,
                      "variance across layers of each layer's expected source depth (variant "
                      "B): whether layers reach to different depths",
                      applies_to="depth")
    registry.register("profile", entropy_profile,
                      "the vector of per-layer routing entropies (H_l of every layer with >= 2 "
                      "valid sources), for calibrators that take the whole profile",
                      shape="profile")
    registry.register("profile_normalized", lambda ts: entropy_profile(ts, normalized=True),
                      "the per-layer routing entropies, each divided by log n_l",
                      shape="profile")
    registry.register("top1_prob", top1_prob,
                      "largest routing probability of each layer with >= 2 experts, averaged "
                      "over those layers: how sharp the router is",
                      applies_to="experts")
    registry.register("top1_margin", top1_margin,
                      "top-1 minus top-2 routing probability, averaged over layers with >= 2 "
                      "experts: how close the token came to being routed elsewhere",
                      applies_to="experts")
    registry.register("expert_load", expert_load,
                      "share of all tokens whose top-1 expert is this token's top-1 expert, "
                      "averaged over layers: routed to a crowded or a rarely used expert",
                      applies_to="experts")
    registry.register("top1_expert", top1_expert,
                      "index of the top-1 expert at the expert layer (meta.expert_layer, else "
                      "the last): a routing cell for calibrators that condition on it, never a "
                      "claim (its order means nothing)",
                      applies_to="experts", categorical=True)
    registry.register("confidence", confidence,
                      "top-label softmax probability of the model's output (not routing)",
                      kind="output")
    registry.register("predictive_entropy", predictive_entropy,
                      "entropy of the output softmax (nats; not routing)", kind="output")
    return registry


# ---------------------------------------------------------------------- content dependence
# A routing-aware claim needs routing that varies across examples (docs/methods.md §9). The
# measure is, per routing layer, the mean total-variation distance of an example's routing
# from the mean routing, TV_l = mean_i ½ Σ_k |α_ik − ᾱ_k| (0 for content-independent routing,
# at most 1). A model may also declare an analytic routing schedule (TraceMeta.schedule,
# e.g. the recency-bias schedule of a wrapped model, §3.3); then the observed routing is
# compared with it element by element.

#: Below this largest per-layer TV the routing is treated as content-independent.
TV_MIN = 1e-4


def _mean_routing(traces: TraceSet) -> np.ndarray:
    """ᾱ [1, L, S]: the mean float64 routing over examples, summed block by block in row
    order (as numpy sums a reduction over the first axis), so it equals the whole-array mean."""
    total = None
    for rows in traces.row_blocks():
        block = _routing64(traces, rows)
        total = (block.sum(axis=0) if total is None
                 else np.concatenate([total[None], block]).sum(axis=0))
    assert total is not None
    return (total / traces.n_examples)[None]


def per_example_tv(traces: TraceSet) -> np.ndarray:
    """½ Σ_k |α_ik − ᾱ_k| for every example and layer: shape [N, L] (float64)."""
    def compute() -> np.ndarray:
        mean = _mean_routing(traces)
        return _by_blocks(traces, lambda alpha: 0.5 * np.abs(alpha - mean).sum(axis=2))

    return _memo(traces, "tv", compute)


def layer_tv(traces: TraceSet) -> np.ndarray:
    """TV_l per layer: shape [L]."""
    return per_example_tv(traces).mean(axis=0)


def content_independent(traces: TraceSet, tv_min: float = TV_MIN) -> tuple[bool, float]:
    """(True when no layer's routing varies by ``tv_min`` or more, the largest TV_l)."""
    largest = float(layer_tv(traces).max(initial=0.0))
    return largest < tv_min, largest


def schedule_deviation(traces: TraceSet) -> tuple[float, tuple[int, int, int]] | None:
    """Largest |observed − declared schedule| over valid entries, and its (example, layer,
    source) index; None when the traces declare no schedule."""
    if traces.meta.schedule is None:
        return None
    schedule = np.asarray(traces.meta.schedule, dtype=np.float64)
    if schedule.shape != traces.routing.shape[1:]:
        raise ValueError(f"declared schedule has shape {schedule.shape}, routing is "
                         f"[N, L, S] = {traces.routing.shape}")
    best, where = -1.0, (0, 0, 0)
    for rows in traces.row_blocks():
        diff = np.where(traces.source_mask[None],
                        np.abs(traces.routing[rows].astype(np.float64) - schedule[None]), 0.0)
        flat = int(np.argmax(diff))
        value = float(diff.reshape(-1)[flat])
        if value > best:  # strictly: the first block holding the maximum wins, as argmax does
            at = np.unravel_index(flat, diff.shape)
            best, where = value, (int(at[0]) + rows.start, int(at[1]), int(at[2]))
    return best, where
