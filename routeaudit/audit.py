"""The plugin API of an audit: what an audit is, and everything it is given.

An audit is a plain object, contributed by a plugin through ``routeaudit_collect_audits``.
The runner reads only the members declared on :class:`Audit`; it hands :meth:`Audit.run` an
:class:`AuditContext` holding validated traces, the calibration/evaluation split of every
seed (:class:`SeedData`), the statistical settings, a reproducible random stream per
(audit, cell, seed), and helpers that turn per-seed evidence into a :class:`Verdict` with
the stability rule, the common fields and the reason text. Audits never load models or
parse options themselves. A new audit is about twenty lines::

    class AccuracyFloor(routeaudit.BaseAudit):
        name = "accuracy_floor"
        claim = "The model is right at least half the time."

        def cells(self, ctx):
            return [{"metric": "accuracy"}]

        def run(self, ctx, cells):
            outcomes = []
            for seed in ctx.seeds:
                accuracy = float(seed.conf_correct("eval")[1].mean())
                outcomes.append(routeaudit.SeedOutcome(seed.seed, holds=accuracy >= 0.5,
                                                       effect=accuracy))
            return [ctx.verdict_from_seeds(self, cells[0], outcomes, statistic="accuracy")]

Like pytest's ``Item`` and ``CallInfo``, the objects here are documented where they are
declared: read the attribute docstrings below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from routeaudit.metrics import confidence_and_correct
from routeaudit.model.adapter import supports_intervention
from routeaudit.simulation.plan import PlantedCases
from routeaudit.stats import MatchedPartition, matched_partition, rng_for, stable, stratified_split
from routeaudit.stats.excess import MatchedExcess, matched_excess
from routeaudit.stats.seeds import need_text
from routeaudit.summaries import FeatureCache, SummaryRegistry, default_registry
from routeaudit.traces import TraceSet
from routeaudit.verdict import Status, Verdict

if TYPE_CHECKING:
    from routeaudit.model.intervention import RoutingIntervention

__all__ = [
    "OPTIONAL_MEMBERS",
    "Audit",
    "AuditContext",
    "AuditSettings",
    "BaseAudit",
    "Executor",
    "PlantedCases",
    "SeedData",
    "SeedOutcome",
    "SeedTally",
    "SerialExecutor",
    "WorkItem",
    "audit_member",
    "experts_missing",
    "seeds_for",
]

Cell = dict[str, Any]

#: Needs an audit may declare; the runner gives a ``skip`` row when one is unmet.
NEEDS = ("traces", "calibrator", "model", "experts")


def experts_missing(traces: TraceSet) -> str | None:
    """Why ``traces`` are not a mixture of experts (the ``experts`` need), or None: it
    takes ``expert_logits``, hard routing, or ``meta.source_kind == "experts"``; depth
    routing (Attention Residuals) has no experts to be calibrated."""
    meta = traces.meta
    if traces.expert_logits is not None or meta.routing_mode == "hard" or \
            meta.source_kind == "experts":
        return None
    return ("not a mixture of experts: the traces have no expert_logits [N, E, K], soft "
            "routing over depth sources (meta.source_kind 'depth'), so no routed region has "
            "an expert whose calibration could be claimed")


class Audit(Protocol):
    """Everything the runner reads from an audit. Subclass :class:`BaseAudit` to get the
    optional members' defaults; any object with these members works."""

    name: str
    """Unique name, used in node ids (``target::name[cell]``), ``--audit NAME`` and ``-k``."""

    claim: str
    """The claim in one sentence; every verdict of the audit repeats it."""

    needs: frozenset[str]
    """What the audit needs, drawn from ``{"traces", "calibrator", "model", "experts"}``.
    When a target lacks one (no registered calibrator; no model adapter with ``intervene``;
    traces that are not a mixture of experts, :func:`experts_missing`), the audit gets one
    ``skip`` row saying so instead of running."""

    min_examples: int
    """Optional (default 1): fewer examples than this in a target is invalid traces (exit 4)."""

    routing_aware: bool
    """Optional (default False): the claim is about routing, so it fails with the single
    reason "routing is content-independent" when the routing does not vary at all."""

    control_kinds: tuple[str, ...]
    """Optional (default ()): calibrator control variants the audit compares against
    (``zeros``, ``derived``, ``shuffled_global``, ...). The run fits the union once."""

    reruns: tuple[str, ...]
    """Optional (default ()): names of other audits whose verdicts this audit recomputes
    (``bandwidth_sensitivity`` re-runs the gain audits). They are looked up with
    :meth:`AuditContext.audit`, so blocking one with ``-p no:NAME`` removes it here too."""

    def planted_cases(self) -> PlantedCases | str | None:
        """Optional (default None): synthetic cases with a planted effect of each size, for
        ``routeaudit validate``, or why the audit cannot be simulated. A plugin can answer
        for audits it does not own with the ``routeaudit_planted_cases`` hook instead."""
        ...

    def cells(self, ctx: AuditContext) -> list[Cell]:
        """The claims this audit can test on the context's target, each a dict (e.g.
        ``{"summary": "r_agg"}``); ``-k`` selects among them by node id."""
        ...

    def run(self, ctx: AuditContext, cells: list[Cell]) -> list[Verdict]:
        """One verdict per selected cell. An exception becomes an ``error`` row."""
        ...


#: What the runner assumes when an audit leaves an optional member out.
OPTIONAL_MEMBERS: dict[str, Any] = {
    "min_examples": 1,
    "routing_aware": False,
    "control_kinds": (),
    "reruns": (),
    "planted_cases": None,
}


def audit_member(audit: Any, name: str) -> Any:
    """An audit's optional member, or its documented default (the one place it is read)."""
    return getattr(audit, name, OPTIONAL_MEMBERS[name])


class BaseAudit:
    """Defaults for the optional members of :class:`Audit`; subclasses set ``name``,
    ``claim`` and implement ``cells`` and ``run``."""

    name: str = ""
    claim: str = ""
    needs: frozenset[str] = frozenset({"traces"})
    min_examples: int = 1
    routing_aware: bool = False
    control_kinds: tuple[str, ...] = ()
    reruns: tuple[str, ...] = ()

    def cells(self, ctx: AuditContext) -> list[Cell]:
        raise NotImplementedError(f"{type(self).__name__}.cells")

    def run(self, ctx: AuditContext, cells: list[Cell]) -> list[Verdict]:
        raise NotImplementedError(f"{type(self).__name__}.run")


@dataclass(frozen=True)
class WorkItem:
    """One (target × audit) of a run as plain, picklable data: what an executor hands to
    another process or machine, where :func:`routeaudit.session.executors.run_work_item`
    rebuilds the plugins, the target and its :class:`AuditContext` and returns the verdicts.
    Every random stream is keyed by (audit, cell, seed), so a rebuilt context gives the
    same verdicts as the run's own (memoised results are recomputed, identically)."""

    index: int
    """Position in the target's plan (results are reported in this order)."""
    target: str
    """The target as given on the command line (also the first part of node ids)."""
    audit: str
    """The audit's name."""
    claim: str
    """The audit's claim (for ``error`` rows when the item cannot run at all)."""
    cells: tuple[Cell, ...]
    """The selected cells, each a plain dict."""
    options: dict[str, Any]
    """The run's options (the argparse Namespace as a dict of picklable values)."""
    plugins: tuple[str, ...]
    """``-p`` values and the project file's plugins, as the command line loads them."""
    targets: tuple[str, ...]
    """Every target of the run (adapter files are plugins too)."""
    cwd: str
    """The working directory relative paths mean something in."""
    control_kinds: tuple[str, ...] | None
    """The calibrator controls the whole run fits (see :attr:`AuditContext.control_kinds`)."""
    frozen: str | None
    """Why routing-aware audits fail on this target (content-independent routing), or None."""
    run_id: str
    """Same for every item of one target in one run: a worker reuses its context across them."""
    traces: tuple[TraceSet, ...] | None = None
    """The target's traces when they need no loader (trace files, in-memory traces); None for
    model adapters, which the worker loads itself (trace cache) to re-run the model."""


class Executor(Protocol):
    """How audits are executed (``routeaudit_make_executor``).

    ``map(fn, items)`` returns one result per :class:`WorkItem`, in order: a list of
    :class:`Verdict`, or the exception that stopped the item (it becomes ``error`` rows).
    ``fn`` runs an item in this process, with the run's live context (the fast path); an
    executor that runs items elsewhere calls ``routeaudit.session.executors.run_work_item``
    there instead. An executor may also offer ``map_unordered(fn, items)`` yielding
    ``(index, result)`` as items finish: the progress bar then advances as results come
    back, and verdicts are still reported in plan order.
    """

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]: ...


class SerialExecutor:
    """Runs audits one after another in this process (the default): ``fn`` closes over the
    run's context, so memoised results (fitted controls, permutation tests) are shared."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return map(fn, items)


@dataclass(frozen=True)
class AuditSettings:
    """Statistical settings shared by every audit; each is a command-line option of
    ``routeaudit run`` and is recorded in every verdict that uses it (docs/methods.md §5)."""

    alpha: float = 0.05
    """Significance level (``--alpha``)."""
    n_permutations: int = 999
    """Permutations per test (``--permutations``)."""
    n_bootstrap: int = 1000
    """Bootstrap replicates (``--bootstrap``)."""
    n_bins: int = 15
    """Confidence bins of the matched audits (``--bins``)."""
    bin_strategy: str = "equal_mass"
    """``equal_mass`` or ``equal_width`` confidence bins (``--bin-strategy``)."""
    n_strata: int = 3
    """Routing strata per confidence bin (tertiles)."""
    strata: str = "within_bin"
    """Quantile strata of the summary inside each confidence bin, or ``global`` (``--strata``)."""
    min_count: int = 5
    """Least examples in a (bin, stratum) cell for it to count (``--min-count``)."""
    stability: str = "all"
    """A claim must hold in ``all`` seeds or a ``majority`` (``--stability``)."""
    sequential_h: int | None = 20
    """Besag–Clifford early stop of the permutation test after H exceedances
    (``--sequential-h``; 0 or None: draw every permutation). A clear non-rejection stops
    after about H / p draws; the p-value stays valid and the null mean unbiased, with its
    Monte Carlo error in the excess variance (docs/methods.md §2.5)."""
    tv_min: float = 1e-4
    """Routing whose largest per-layer TV from the mean routing is below this is
    content-independent (``--tv-min``; docs/methods.md §9)."""
    tertile_summary: str | None = None
    """Summary whose tertiles define worst-tertile ECE in the calibrator audits
    (``--tertile-summary``; None: the calibrator's first scalar routing feature, else r_agg)."""
    device: str | None = None
    """torch device of the batched kernels (``--device``; None: numpy on the CPU)."""
    gain_margin: float = 0.005
    """Practical margin of a calibrator gain, in worst-tertile ECE (``--gain-margin``): a
    gain shown below it refutes the claim (docs/methods.md §5.2)."""
    gap_margin: float = 0.01
    """Practical margin of the excess matched-confidence gap (``--gap-margin``): an excess
    shown below it refutes "routing carries signal beyond confidence" (§5.2)."""


@dataclass
class SeedData:
    """One seed's view of a target: its traces and its calibration/evaluation split.

    With trained replicates, each replicate is a seed; otherwise every seed shares the
    target's traces and redraws the 50/50 split (:func:`routeaudit.stats.stratified_split`).
    """

    seed: int
    """The seed number (the replicate index for replicates)."""
    traces: TraceSet
    """The validated traces: ``traces.logits [N, K]``, ``traces.labels [N]``,
    ``traces.routing [N, L, S]``, ``traces.source_mask [L, S]``, ``traces.meta``."""
    cal_index: np.ndarray
    """Example indices of the calibration half (calibrators are fitted on it)."""
    eval_index: np.ndarray
    """Example indices of the evaluation half (every statistic uses it)."""
    features: FeatureCache
    """Memoised routing summaries of ``traces``: ``features["r_agg"]`` is one value per
    example (all N, not only one half; see :meth:`summary`)."""

    @cached_property
    def _conf_correct(self) -> tuple[np.ndarray, np.ndarray]:
        return confidence_and_correct(self.traces.logits, self.traces.labels)

    @property
    def confidence(self) -> np.ndarray:
        """Top-label confidence of every example (float64, [N])."""
        return self._conf_correct[0]

    @property
    def correct(self) -> np.ndarray:
        """1.0 where the top label is right, else 0.0 ([N])."""
        return self._conf_correct[1]

    def summary(self, name: str, part: str = "eval") -> np.ndarray:
        """A summary's values on ``part``: ``"eval"``, ``"cal"`` or ``"all"``."""
        return self.features[name][self.index(part)]

    def conf_correct(self, part: str = "eval") -> tuple[np.ndarray, np.ndarray]:
        """``(confidence, correct)`` on ``part``: ``"eval"``, ``"cal"`` or ``"all"``."""
        index = self.index(part)
        return self.confidence[index], self.correct[index]

    def matched(self, summary: str, settings: AuditSettings) -> MatchedPartition:
        """Confidence bins, routing strata of ``summary`` and residuals y − c on the
        evaluation split: the shared input of the matched-confidence audits (§2.4)."""
        conf, correct = self.conf_correct("eval")
        return matched_partition(conf, correct, self.summary(summary, "eval"), name=summary,
                                 n_bins=settings.n_bins, bin_strategy=settings.bin_strategy,  # type: ignore[arg-type]
                                 strata=settings.strata, n_strata=settings.n_strata)  # type: ignore[arg-type]

    def groups(self, part: str = "eval") -> np.ndarray | None:
        """The resampling unit of each example of ``part`` for token-level traces
        (``meta.per_token`` with a ``group``, e.g. the sequence): bootstraps resample whole
        groups. None for example-level traces (every example is its own unit)."""
        group = self.traces.group
        if group is None or not self.traces.meta.per_token:
            return None
        return group[self.index(part)]

    def index(self, part: str) -> np.ndarray:
        """The example indices of ``part``: ``"eval"``, ``"cal"`` or ``"all"``."""
        if part == "eval":
            return self.eval_index
        if part == "cal":
            return self.cal_index
        if part == "all":
            return np.arange(self.traces.n_examples)
        raise ValueError(f"part must be 'eval', 'cal' or 'all', not {part!r}")


def seeds_for(traces: Sequence[TraceSet], seeds: Sequence[int],
              summaries: SummaryRegistry) -> list[SeedData]:
    """The seeds of a target: its replicates when there are several; else one per seed, each
    redrawing the split of the shared traces (summaries are computed once per TraceSet)."""
    replicates = len(traces) > 1
    pairs = list(enumerate(traces)) if replicates else [(int(s), traces[0]) for s in seeds]
    caches: dict[int, FeatureCache] = {}
    out = []
    for seed, ts in pairs:
        cache = caches.setdefault(id(ts), FeatureCache(ts, summaries))
        conf, correct = confidence_and_correct(ts.logits, ts.labels)
        groups = ts.group if ts.meta.per_token else None  # sequences stay in one half
        cal_index, eval_index = stratified_split(conf, correct, seed, groups=groups)
        out.append(SeedData(seed, ts, cal_index, eval_index, cache))
    return out


@dataclass
class SeedOutcome:
    """One seed's evidence about one claim, for :meth:`AuditContext.verdict_from_seeds`."""

    seed: int
    """The seed (``SeedData.seed``)."""
    holds: bool | None
    """Whether the claim holds in this seed; None when this seed cannot decide it (too
    little data), which makes the verdict ``inconclusive``."""
    effect: float | None = None
    """The seed's effect estimate; the verdict reports their mean."""
    ci: tuple[float, float] | None = None
    """The seed's interval; the verdict reports the envelope over seeds."""
    p_value: float | None = None
    """Raw p-value; the verdict reports the largest (``all``) or the median (``majority``)."""
    p_value_corrected: float | None = None
    """Corrected p-value, reduced the same way."""
    reason: str | None = None
    """Why the seed cannot decide (``holds is None``) or why the premise fails."""
    premise_violated: bool = False
    """True when the claim cannot hold at all (e.g. the summary is constant): the verdict
    fails with ``reason``, whatever the other seeds say."""
    details: dict[str, Any] = field(default_factory=dict)
    """Numbers recorded in the verdict's ``per_seed`` entry for this seed."""

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"seed": self.seed}
        if self.reason is not None and (self.holds is None or self.premise_violated):
            entry["reason"] = self.reason
        entry.update(self.details)
        return entry


@dataclass(frozen=True)
class SeedTally:
    """How many seeds a claim holds in, and the rule it had to meet (for reason texts)."""

    holds: int
    n: int
    rule: str
    outcomes: tuple[SeedOutcome, ...]

    @property
    def passed(self) -> bool:
        return stable([bool(o.holds) for o in self.outcomes], self.rule)

    @property
    def refuted(self) -> bool:
        """The claim fails as consistently as a pass needs it to hold."""
        return stable([not o.holds for o in self.outcomes], self.rule)

    @property
    def need(self) -> str:
        """``"every seed"`` or ``"a majority of seeds"``."""
        return need_text(self.rule)

    def mean_effect(self) -> float:
        values = [o.effect for o in self.outcomes if o.effect is not None]
        return float(np.mean(values)) if values else float("nan")


ReasonText = str | Callable[[SeedTally], str] | None


@dataclass
class AuditContext:
    """Everything an audit may use. The runner builds one per target; build your own with
    :meth:`for_traces` (tests, simulations)."""

    target: str
    """The target's name as given on the command line (the first part of node ids)."""
    seeds: list[SeedData]
    """One entry per seed or replicate; see :class:`SeedData`."""
    settings: AuditSettings
    """The statistical settings of the run."""
    summaries: SummaryRegistry
    """The routing summaries known to this run (built-ins and plugins)."""
    requested_summaries: list[str] = field(default_factory=list)
    """``--summary NAME`` values, in order (empty: none named)."""
    calibrator: Any = None
    """The registered calibrator factory under audit (``@routeaudit.calibrator``), or None."""
    options: Any = None
    """The parsed command line (argparse Namespace; None outside the CLI). Read an audit's
    own options with :meth:`option`, which honours 0 and falls back to a default."""
    cache: dict[Any, Any] = field(default_factory=dict)
    """Results several audits share (e.g. fitted calibrator studies), keyed by their owner."""
    control_kinds: tuple[str, ...] | None = None
    """Calibrator control variants the selected audits need (None: all), so a run that
    selects one audit fits only that audit's twins."""
    session: Any = None
    """The model adapter's session (None for trace targets); use :meth:`forward`."""
    audits: dict[str, Any] = field(default_factory=dict)
    """Every audit collected in this run, by name (see :meth:`audit`)."""
    progress: Callable[[str], None] | None = None
    """Where :meth:`step` reports the phase an audit is in (the runner's progress bar)."""

    @classmethod
    def for_traces(cls, traces: TraceSet | Sequence[TraceSet], *, seeds: Sequence[int] = (0, 1, 2),
                   settings: AuditSettings | None = None,
                   summaries: SummaryRegistry | None = None, target: str = "traces",
                   **fields: Any) -> AuditContext:
        """The context ``routeaudit run`` builds for these traces (one TraceSet, or a list of
        trained replicates), outside the CLI: seeds, splits and summaries exactly as a run."""
        sets = [traces] if isinstance(traces, TraceSet) else list(traces)
        registry = summaries if summaries is not None else default_registry()
        return cls(target=target, seeds=seeds_for(sets, seeds, registry),
                   settings=settings or AuditSettings(), summaries=registry, **fields)

    # ----------------------------------------------------------------- what the target offers
    @property
    def can_intervene(self) -> bool:
        """True when the target is a model whose adapter implements ``intervene``."""
        return supports_intervention(getattr(self.session, "adapter", None))

    def forward(self, intervention: RoutingIntervention | None = None) -> dict[str, np.ndarray]:
        """Run the model over the evaluation batches, optionally under an intervention.

        Returns host arrays (``logits``, ``labels``, ``routing``, ...) in trace order; the
        clean pass (``None``) is served from the traces without running the model.
        """
        if self.session is None:
            raise RuntimeError("this target has no model: causal audits need a model adapter")
        return self.session.forward(intervention)

    def split_traces(self, name: str) -> TraceSet | None:
        """Validated traces of another split the target's adapter offers
        (``Adapter.extra_splits``, e.g. ``"shift"``: a held-back domain), extracted on first
        use and cached like the main split; None when the target has no such split."""
        session = self.session
        if session is None or name not in getattr(session, "extra_splits", ()):
            return None
        key = ("split_traces", name)
        if key not in self.cache:
            self.cache[key] = session.for_split(name).traces()
        return self.cache[key]

    def rng(self, audit: str, cell: str, seed: int) -> np.random.Generator:
        """The reproducible random stream of one (audit, cell, seed)."""
        return rng_for(audit, cell, seed)

    def option(self, name: str, default: Any) -> Any:
        """An audit's own command-line option (registered in its ``routeaudit_addoption``);
        ``default`` when it is absent or None. A value of 0 is honoured."""
        value = getattr(self.options, name, None) if self.options is not None else None
        return default if value is None else value

    def audit(self, name: str) -> Any:
        """The collected audit called ``name``, or None (absent, or blocked with ``-p no:``)."""
        return self.audits.get(name)

    def step(self, what: str) -> None:
        """Say what the audit is doing now (e.g. ``"permutations r_agg, seed 1"``); shown
        next to the progress bar, never anything else. Long audits call it per seed."""
        if self.progress is not None:
            self.progress(what)

    def matched_excess(self, summary: str, seed: SeedData) -> MatchedExcess | str:
        """The permutation test and excess gap of ``summary`` in ``seed`` (memoised, so
        ``permutation_null`` and ``stratification`` share one computation), or why the
        summary cannot carry signal (it does not vary)."""
        key = ("matched_excess", summary, seed.seed)
        if key not in self.cache:
            s = self.settings
            self.step(f"permutations and bootstrap: {summary}, seed {seed.seed}")
            part = seed.matched(summary, s)
            self.cache[key] = part.no_variation or matched_excess(
                part, n_permutations=s.n_permutations, n_boot=s.n_bootstrap,
                min_count=s.min_count, sequential_h=s.sequential_h, device=s.device,
                groups=seed.groups("eval"),
                rng_null=self.rng("permutation_null", summary, seed.seed),
                rng_boot=self.rng("matched-excess:bootstrap", summary, seed.seed))
        return self.cache[key]

    # ----------------------------------------------------------------- cells
    def summary_cells(self) -> list[Cell]:
        """Cells for summary-based audits: the user's --summary names, else the routing
        features the registered calibrator declares (what is claimed decides what can fail),
        else every built-in scalar routing summary."""
        names = (self.requested_summaries or self.calibrator_summaries()
                 or self.summaries.default_cells(self.seeds[0].traces if self.seeds else None))
        return [{"summary": name} for name in names]

    def calibrator_summaries(self) -> list[str]:
        """Scalar routing summaries behind the calibrator's features (a profile: each H_l)."""
        from routeaudit.calibrators.base import spec_of

        spec = spec_of(self.calibrator) if self.calibrator is not None else None
        if spec is None or not self.seeds:
            return []
        traces = self.seeds[0].traces
        names: list[str] = []
        for feature in spec.features:
            if feature not in self.summaries:
                continue
            summary = self.summaries.get(feature)
            if summary.kind != "routing" or summary.categorical:
                continue  # a label (an expert index) has no strata to compare
            if summary.shape == "scalar":
                names.append(feature)
            else:
                suffix = "_norm" if feature.endswith("_normalized") else ""
                multi = np.flatnonzero(traces.source_mask.sum(axis=1) >= 2)
                names.extend(f"H{layer}{suffix}" for layer in multi)
        return list(dict.fromkeys(names))

    # ----------------------------------------------------------------- verdicts
    def verdict(self, audit: Any, cell: Cell, status: Status, reason: str = "",
                **fields: Any) -> Verdict:
        """A verdict of ``audit`` on ``cell`` with the common fields (audit, claim, target)
        filled in; ``fields`` are any other :class:`Verdict` fields (``claim`` included, for
        a cell that states a narrower claim)."""
        fields.setdefault("claim", audit.claim)
        return Verdict(audit=audit.name, cell=cell, status=status, reason=reason,
                       target=self.target, **fields)

    def verdict_from_seeds(self, audit: Any, cell: Cell, outcomes: Sequence[SeedOutcome], *,
                           statistic: str | None = None,
                           threshold: dict[str, Any] | None = None,
                           passed: ReasonText = None, failed: ReasonText = None,
                           mixed: ReasonText = None, **fields: Any) -> Verdict:
        """Per-seed evidence → one verdict, with the stability rule (``settings.stability``).

        In order: a seed whose premise fails makes the verdict ``fail`` with its reason; a
        seed that cannot decide makes it ``inconclusive`` with its reason; otherwise it
        passes when the claim holds in every seed (or a majority), fails when it is refuted
        as consistently (it holds in no seed; under ``majority``, fails in most), and is
        ``inconclusive`` when the seeds disagree: a claim that holds in some seeds is not
        refuted (docs/methods.md §5.2). ``effect`` is the mean of
        the seeds' effects, ``ci`` the envelope of their intervals, the p-values the largest
        (or median). ``passed`` / ``failed`` / ``mixed`` are the reason (a string, or a
        function of the :class:`SeedTally`; ``mixed`` defaults to ``failed``); by default
        "holds in k/n seeds". ``fields`` override any computed :class:`Verdict` field.
        """
        rule = self.settings.stability
        outcomes = tuple(outcomes)
        threshold = dict(threshold or {})
        threshold.setdefault("stability", rule)
        common: dict[str, Any] = {"statistic": statistic, "threshold": threshold,
                                  "per_seed": [o.as_dict() for o in outcomes]}
        violated = next((o for o in outcomes if o.premise_violated), None)
        if violated is not None:
            return self.verdict(audit, cell, Status.FAIL, violated.reason or "premise violated",
                                **{**common, **fields})
        undecided = next((o for o in outcomes if o.holds is None), None)
        if undecided is not None or not outcomes:
            why = undecided.reason if undecided is not None else "no seeds to decide on"
            return self.verdict(audit, cell, Status.INCONCLUSIVE, why or "too little data",
                                **{**common, **fields})
        tally = SeedTally(sum(bool(o.holds) for o in outcomes), len(outcomes), rule, outcomes)
        if tally.passed:
            status, text = Status.PASS, passed
        elif tally.refuted:
            status, text = Status.FAIL, failed
        else:
            status, text = Status.INCONCLUSIVE, mixed if mixed is not None else failed
        if text is None:
            text = {Status.PASS: f"holds in {tally.holds}/{tally.n} seeds",
                    Status.FAIL: f"holds in {tally.holds}/{tally.n} seeds: refuted (a pass needs "
                                 f"{tally.need})",
                    Status.INCONCLUSIVE: f"holds in {tally.holds}/{tally.n} seeds: the seeds "
                    f"disagree (a pass needs {tally.need}; more seeds or data would decide)"
                    }[status]
        reason = text(tally) if callable(text) else text
        reduce = np.max if rule == "all" else np.median
        effects = [o.effect for o in outcomes]
        cis = [o.ci for o in outcomes]
        ps = [o.p_value for o in outcomes]
        pcs = [o.p_value_corrected for o in outcomes]
        computed: dict[str, Any] = {
            "effect": float(np.mean(effects)) if all(e is not None for e in effects) else None,
            "ci": ((min(c[0] for c in cis), max(c[1] for c in cis))  # type: ignore[index]
                   if all(c is not None for c in cis) else None),
            "p_value": float(reduce(ps)) if all(p is not None for p in ps) else None,
            "p_value_corrected": (float(reduce(pcs)) if all(p is not None for p in pcs)
                                  else None),
        }
        return self.verdict(audit, cell, status, reason, **{**common, **computed, **fields})
