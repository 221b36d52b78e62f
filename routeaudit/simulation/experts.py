"""Synthetic mixture-of-experts traces with known calibration truth (docs/methods.md §4).

Why: the claims of paper 4 (expert calibration is sufficient for the routed aggregate under
hard routing, also under routing shift, and insufficient under soft routing) need models
whose truth is known exactly, to measure how often ``expert_calibration`` gets them wrong.

The model, per example (token) i, with E experts, K classes and L routing layers:

* **router**: scores u ~ N(0, σ_r²) per layer and expert (``router_scale`` σ_r), plus a
  shared per-sequence part when ``sequence_length`` is given; routing ``π = softmax(u)``
  per layer (``routing [N, L, E]``); the routed expert κ is the top-1 at ``expert_layer``
  (the last layer). The experts are exchangeable, so loads are equal in expectation.
* **experts**: a shared class signal z = a·e_t + N(0, I_K) (a ~ U(0.5, 5), t a random
  class) and expert logits f_k = z + N(0, σ_e² I_K) (``expert_noise`` σ_e;
  ``expert_logits [N, E, K]``): the experts agree on the signal and disagree in their
  own noise.
* **labels**: y ~ q(x), the routed expert's distribution p_κ = softmax(f_κ) with its top
  probability c moved to ``c' = c − a_κ ψ(c)``, ψ(c) = 4c(1 − c), the rest rescaled:
  ``a_k = expert_miscalibration + (−1)^k shift_gap``. With both 0 every expert is calibrated
  on its routed region, and y ~ f_κ(x) exactly. ``expert_miscalibration > 0`` makes every
  expert over-confident (accuracy below confidence); ``shift_gap > 0`` makes even experts
  over-confident and odd ones under-confident by the same amount, so with an even number of
  equally loaded experts the aggregate is calibrated on P while a shift of the routing mix
  (more tokens for the even experts) exposes the gap. |a_k| ≤ 0.25 keeps c' in [0, 1].
* **aggregate** ``logits``: hard routing, the routed expert's logits f_κ; soft routing,
  ``log Σ_k π_k softmax(f_k)`` (π at the expert layer): a convex mix of calibrated experts,
  which is typically under-confident (Wu & Gales 2021).

Cases (``kind``; explicit keyword arguments override a case's defaults):

``hard``   (a) hard routing, calibrated experts: the aggregate is calibrated, also under
           every routing-only shift (the sufficiency result).
``soft``   (b) the same experts mixed softly: experts calibrated, aggregate under-confident.
``shift``  (c) hard routing, experts miscalibrated in opposite directions (shift_gap 0.08):
           calibrated on P, not under a routing-only reweighting.
``overconfident`` (d) hard routing, every expert over-confident by ``expert_miscalibration``
           (default 0.05): graded effects for power curves (grade ``shift_gap`` on ``shift``
           for the shift claim).

``meta["truth"]`` holds the population values (15 equal-width bins, (lo, hi]): the
aggregate's ECE, each expert's ECE on its routed region and load, the aggregate's ECE
within each routing cell, and the worst-case ECE over routing-only shifts (likelihood ratio
≤ 5, the audit's default; see :func:`moe_truth`), computed once per parameter set on
400,000 fresh examples with the true correctness probability in place of the 0/1 outcome
(so only the confidence draw is random there).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from routeaudit.metrics import ece, softmax
from routeaudit.traces import TraceSet

__all__ = ["KINDS", "describe_moe_cases", "generate_moe", "moe_truth", "population"]

#: case -> (routing, expert_miscalibration, shift_gap, one line)
KINDS: dict[str, tuple[str, float, float, str]] = {
    "hard": ("hard", 0.0, 0.0, "hard routing, every expert calibrated on its routed region"),
    "soft": ("soft", 0.0, 0.0, "soft routing of the same calibrated experts"),
    "shift": ("hard", 0.0, 0.08, "hard routing; experts miscalibrated in opposite directions "
              "(calibrated on P, not under routing shift)"),
    "overconfident": ("hard", 0.05, 0.0, "hard routing; every expert over-confident"),
}
#: Examples of the population draw behind ``meta["truth"]``.
TRUTH_EXAMPLES = 400_000
#: Likelihood-ratio cap of the worst-case truth (the audit's default ``--shift-ratio``).
TRUTH_RATIO = 5.0
_TRUTH_CHUNK = 50_000


def _psi(c: np.ndarray) -> np.ndarray:
    return 4.0 * c * (1.0 - c)


def _amplitudes(n_experts: int, miscalibration: float, gap: float) -> np.ndarray:
    sign = np.where(np.arange(n_experts) % 2 == 0, 1.0, -1.0)
    return miscalibration + sign * gap


def _draw(rng: np.random.Generator, n: int, *, n_experts: int, n_classes: int, n_layers: int,
          routing: str, amplitude: np.ndarray, router_scale: float, expert_noise: float,
          sequence_length: int | None) -> dict[str, np.ndarray]:
    """One draw of n examples; the draws come in a fixed order, so a seed is reproducible."""
    e, k = n_experts, n_classes
    scores = rng.standard_normal((n, n_layers, e))
    if sequence_length is not None:
        shared = rng.standard_normal((-(-n // sequence_length), n_layers, e))
        scores = np.sqrt(0.5) * scores + np.sqrt(0.5) * shared[np.arange(n) // sequence_length]
    pi = softmax((router_scale * scores).reshape(-1, e)).reshape(n, n_layers, e)
    routed = pi[:, -1].argmax(axis=1)
    strength = rng.uniform(0.5, 5.0, size=n)
    target = rng.integers(0, k, size=n)
    z = rng.standard_normal((n, k))
    z[np.arange(n), target] += strength
    f = z[:, None, :] + expert_noise * rng.standard_normal((n, e, k))
    p = softmax(f.reshape(-1, k)).reshape(n, e, k)
    p_routed = p[np.arange(n), routed]
    top = p_routed.argmax(axis=1)
    c = p_routed[np.arange(n), top]
    c_true = c - amplitude[routed] * _psi(c)
    rest = np.where(c < 1.0, (1.0 - c_true) / np.where(c < 1.0, 1.0 - c, 1.0), 0.0)
    q = p_routed * rest[:, None]
    q[np.arange(n), top] = c_true
    if np.any(c >= 1.0):  # a saturated expert: share the moved mass equally
        sat = np.flatnonzero(c >= 1.0)
        q[sat] = (1.0 - c_true[sat])[:, None] / (k - 1)
        q[sat, top[sat]] = c_true[sat]
    u = rng.random(n)
    labels = np.minimum((np.cumsum(q, axis=1) < u[:, None]).sum(axis=1), k - 1)
    if routing == "hard":
        logits = f[np.arange(n), routed]
    else:
        mix = np.einsum("ne,nek->nk", pi[:, -1], p)
        logits = np.log(np.maximum(mix, 1e-300))
    predicted = logits.argmax(axis=1)
    return {"pi": pi, "routed": routed, "f": f, "labels": labels, "logits": logits,
            "c_routed": c, "p_routed": c_true,
            "c_agg": softmax(logits).max(axis=1), "p_agg": q[np.arange(n), predicted]}


@lru_cache(maxsize=4)
def population(n_experts: int, n_classes: int, routing: str, expert_miscalibration: float,
               shift_gap: float, router_scale: float, expert_noise: float, *,
               n: int = TRUTH_EXAMPLES, seed: int = 7919) -> dict[str, np.ndarray]:
    """A large draw with the *probability* of being correct in place of the outcome:
    ``routed`` (expert), ``c_routed`` / ``p_routed`` (the routed expert's confidence and
    true accuracy), ``c_agg`` / ``p_agg`` (the aggregate's). Plug-in ECEs of these are the
    population values up to the confidence draw's Monte Carlo error. Cached (a few per
    process); treat the arrays as read-only."""
    amplitude = _amplitudes(n_experts, expert_miscalibration, shift_gap)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in
                                          ("routed", "c_routed", "p_routed", "c_agg", "p_agg")}
    for chunk in range(-(-n // _TRUTH_CHUNK)):
        rng = np.random.default_rng([seed, chunk])
        d = _draw(rng, min(_TRUTH_CHUNK, n - chunk * _TRUTH_CHUNK), n_experts=n_experts,
                  n_classes=n_classes, n_layers=1, routing=routing, amplitude=amplitude,
                  router_scale=router_scale, expert_noise=expert_noise, sequence_length=None)
        for key, values in parts.items():
            values.append(d[key])
    return {key: np.concatenate(v) for key, v in parts.items()}


@lru_cache(maxsize=64)
def moe_truth(n_experts: int, n_classes: int, routing: str, expert_miscalibration: float,
              shift_gap: float, router_scale: float, expert_noise: float) -> dict[str, Any]:
    """Population calibration of one parameter set (see the module docstring).

    The worst case over routing-only shifts needs no solver here: with per-cell bin sums
    G[j, b], ECE_w = Σ_b |Σ_j w_j G[j, b]| / N ≤ Σ_j (w_j n_j / N) ECE_j ≤ max_j ECE_j (the
    aggregate's ECE within cell j), and the bound is attained by w = 1 / P(cell j) on that
    cell alone, which the class allows when P(cell j) ≥ 1 / ratio. So the worst case is the
    largest within-cell ECE when that cell holds at least 1/ratio of the data (recorded as
    None otherwise; the tests check it with the exact solver).
    """
    a = population(n_experts, n_classes, routing, expert_miscalibration, shift_gap,
                   router_scale, expert_noise)
    load = np.bincount(a["routed"], minlength=n_experts) / a["routed"].size

    def within(conf: str, prob: str) -> list[float]:
        return [float(ece(a[conf][a["routed"] == j], a[prob][a["routed"] == j]))
                if load[j] > 0 else float("nan") for j in range(n_experts)]

    by_cell = within("c_agg", "p_agg")
    worst_cell = int(np.nanargmax(by_cell))
    worst = by_cell[worst_cell] if load[worst_cell] >= 1.0 / TRUTH_RATIO else None
    return {"aggregate_ece": float(ece(a["c_agg"], a["p_agg"])),
            "aggregate_accuracy_minus_confidence": float(np.mean(a["p_agg"] - a["c_agg"])),
            "expert_ece": within("c_routed", "p_routed"), "expert_load": [float(v) for v in load],
            "aggregate_ece_by_cell": by_cell,
            f"worst_case_ece_ratio{TRUTH_RATIO:g}": worst, "worst_case_cell": worst_cell,
            "n_examples": TRUTH_EXAMPLES, "bins": "15 equal-width (lo, hi]"}


def generate_moe(kind: str, n: int, *, seed: int, n_experts: int = 4, n_classes: int = 10,
                 n_layers: int = 1, routing: str | None = None,
                 expert_miscalibration: float | None = None, shift_gap: float | None = None,
                 router_scale: float = 1.0, expert_noise: float = 1.5,
                 sequence_length: int | None = None,
                 truth: bool = True) -> TraceSet:
    """Synthetic MoE traces of one case (see the module docstring).

    Args:
        kind: ``"hard"``, ``"soft"``, ``"shift"`` or ``"overconfident"``.
        n: examples (tokens).
        seed: the seed of every draw (bit-identical traces for a seed).
        routing, expert_miscalibration, shift_gap: override the case's defaults.
        router_scale: sharpness of the router (soft routing is sharper for larger values).
        expert_noise: sd of each expert's own logit noise (how much the experts disagree).
        sequence_length: group tokens into sequences of this length (``meta.per_token``,
            ``group``) with a shared routing component, for the cluster bootstrap.
        truth: compute ``meta["truth"]`` (cached per parameter set; about a second).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown case {kind!r}; known: {', '.join(KINDS)}")
    default_routing, default_mis, default_gap, line = KINDS[kind]
    routing = default_routing if routing is None else routing
    mis = default_mis if expert_miscalibration is None else float(expert_miscalibration)
    gap = default_gap if shift_gap is None else float(shift_gap)
    if routing not in ("hard", "soft"):
        raise ValueError(f"routing must be 'hard' or 'soft', got {routing!r}")
    if n < 1 or n_experts < 2 or n_classes < 2 or n_layers < 1:
        raise ValueError(f"need n >= 1, n_experts >= 2, n_classes >= 2, n_layers >= 1; got "
                         f"{n}, {n_experts}, {n_classes}, {n_layers}")
    if abs(mis) + abs(gap) > 0.25:
        raise ValueError(f"|expert_miscalibration| + |shift_gap| must be <= 0.25 (so the true "
                         f"probabilities stay in [0, 1]), got {abs(mis) + abs(gap):g}")
    if sequence_length is not None and sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    amplitude = _amplitudes(n_experts, mis, gap)
    d = _draw(np.random.default_rng(seed), n, n_experts=n_experts, n_classes=n_classes,
              n_layers=n_layers, routing=routing, amplitude=amplitude,
              router_scale=router_scale, expert_noise=expert_noise,
              sequence_length=sequence_length)
    meta: dict[str, Any] = {
        "name": f"moe-{kind}", "family": "moe", "routing_mode": routing,
        "source_kind": "experts", "top_k": 1 if routing == "hard" else n_experts,
        "expert_layer": n_layers - 1,
        "source_families": {f"expert{j}": [j] for j in range(n_experts)},
        "layer_types": ["mlp"] * n_layers, "layer_depth": list(range(n_layers)),
        "per_token": sequence_length is not None, "kind": kind, "seed": seed,
        "expert_miscalibration": mis, "shift_gap": gap, "router_scale": router_scale,
        "expert_noise": expert_noise,
        "ground_truth": _truth_text(routing, mis, gap, n_experts, line)}
    if truth:
        meta["truth"] = moe_truth(n_experts, n_classes, routing, mis, gap, router_scale,
                                  expert_noise)
    group = None if sequence_length is None else np.arange(n) // sequence_length
    return TraceSet(d["logits"].astype(np.float32), d["labels"], d["pi"].astype(np.float32),
                    expert_logits=d["f"].astype(np.float32), group=group, meta=meta)


def _truth_text(routing: str, mis: float, gap: float, n_experts: int, line: str) -> str:
    experts = ("every expert calibrated on its routed region" if mis == 0 and gap == 0 else
               f"expert k's accuracy on its region is c − a_k·4c(1 − c), a_k = {mis:g} "
               f"{'+' if gap >= 0 else '-'} (−1)^k·{abs(gap):g}")
    if routing == "hard":
        agg = ("aggregate calibrated, also under every routing-only shift" if mis == 0 and gap == 0
               else "aggregate calibrated on P, miscalibrated under routing shift"
               if mis == 0 and n_experts % 2 == 0 else "aggregate miscalibrated")
    else:
        agg = "soft mixture of the experts: aggregate miscalibrated (typically under-confident)"
    return f"{line}; {experts}; {agg}"


def describe_moe_cases() -> list[tuple[str, str]]:
    """(case, one line) for printing."""
    return [(kind, spec[3]) for kind, spec in KINDS.items()]
