"""What an audit is, and the context it runs in.

An audit is a plain object (usually contributed by a plugin module through
``routeaudit_collect_audits``). Audits never load models or parse options themselves: the
context hands them validated traces, the calibration/evaluation split of every seed, the
stats settings and a reproducible random stream per (audit, cell, seed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np

from routeaudit.metrics import confidence_and_correct
from routeaudit.stats import rng_for
from routeaudit.summaries import FeatureCache, SummaryRegistry
from routeaudit.traces import TraceSet
from routeaudit.verdict import Verdict


@runtime_checkable
class Audit(Protocol):
    name: str
    claim: str
    needs: frozenset[str]
    min_examples: int

    def cells(self, ctx: AuditContext) -> list[dict[str, Any]]: ...

    def run(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]: ...


class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]: ...


class SerialExecutor:
    """Runs audits one after another in this process (the default)."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return map(fn, items)


@dataclass(frozen=True)
class AuditSettings:
    """Statistical settings shared by every audit; all are command-line options."""

    alpha: float = 0.05
    n_permutations: int = 999
    n_bootstrap: int = 1000
    n_bins: int = 15
    bin_strategy: str = "equal_mass"
    n_strata: int = 3
    strata: str = "within_bin"  # within_bin | global (quantiles of the summary per bin or overall)
    min_count: int = 5
    stability: str = "all"  # all | majority
    sequential_h: int | None = None
    device: str | None = None


@dataclass
class SeedData:
    """One seed's view of the data: its traces (a replicate, or the shared traces) and split."""

    seed: int
    traces: TraceSet
    cal_index: np.ndarray
    eval_index: np.ndarray
    features: FeatureCache

    @cached_property
    def _conf_correct(self) -> tuple[np.ndarray, np.ndarray]:
        return confidence_and_correct(self.traces.logits, self.traces.labels)

    @property
    def confidence(self) -> np.ndarray:
        return self._conf_correct[0]

    @property
    def correct(self) -> np.ndarray:
        return self._conf_correct[1]

    def summary(self, name: str, part: str = "eval") -> np.ndarray:
        """A summary's values on the calibration or evaluation part of this seed's split."""
        return self.features[name][self._index(part)]

    def conf_correct(self, part: str = "eval") -> tuple[np.ndarray, np.ndarray]:
        index = self._index(part)
        return self.confidence[index], self.correct[index]

    def _index(self, part: str) -> np.ndarray:
        if part == "eval":
            return self.eval_index
        if part == "cal":
            return self.cal_index
        if part == "all":
            return np.arange(self.traces.n_examples)
        raise ValueError(f"part must be 'eval', 'cal' or 'all', not {part!r}")


@dataclass
class AuditContext:
    """Everything an audit may use. Built once per target by the runner."""

    target: str
    seeds: list[SeedData]
    settings: AuditSettings
    summaries: SummaryRegistry
    requested_summaries: list[str] = field(default_factory=list)
    calibrator: Any = None
    options: Any = None
    #: Results that several audits share (e.g. fitted calibrator studies), keyed by the owner.
    cache: dict[Any, Any] = field(default_factory=dict)
    #: Control variants the selected calibrator audits need (None: all), so a run that
    #: selects one audit fits only that audit's twins.
    control_kinds: tuple[str, ...] | None = None
    #: The model adapter's session (None for trace targets): causal audits use ``forward``.
    session: Any = None

    @property
    def can_intervene(self) -> bool:
        """True when the target is a model whose adapter implements ``intervene``."""
        adapter = getattr(self.session, "adapter", None)
        return adapter is not None and callable(getattr(adapter, "intervene", None)) and \
            getattr(type(adapter), "supports_intervention", lambda: True)()

    def forward(self, intervention: Any = None) -> dict[str, np.ndarray]:
        """Run the model over the evaluation batches, optionally under an intervention.

        Returns host arrays (``logits``, ``labels``, ``routing``, ...) in trace order; the
        clean pass (``None``) is served from the traces without running the model.
        """
        if self.session is None:
            raise RuntimeError("this target has no model: causal audits need a model adapter")
        return self.session.forward(intervention)

    def rng(self, audit: str, cell: str, seed: int) -> np.random.Generator:
        """The reproducible random stream of one (audit, cell, seed)."""
        return rng_for(audit, cell, seed)

    def summary_cells(self) -> list[dict[str, Any]]:
        """Cells for summary-based audits: the user's --summary names, else the routing
        features the registered calibrator declares (what is claimed decides what can fail),
        else every built-in scalar routing summary."""
        names = (self.requested_summaries or self.calibrator_summaries()
                 or self.summaries.default_cells())
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
            if summary.kind != "routing":
                continue
            if summary.shape == "scalar":
                names.append(feature)
            else:
                suffix = "_norm" if feature.endswith("_normalized") else ""
                multi = np.flatnonzero(traces.source_mask.sum(axis=1) >= 2)
                names.extend(f"H{layer}{suffix}" for layer in multi)
        return list(dict.fromkeys(names))


def stratified_split(confidence: np.ndarray, correct: np.ndarray, seed: int,
                     *, n_conf_groups: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A 50/50 calibration/evaluation split, stratified by correctness × confidence decile.

    Stratifying on what the audits condition on keeps the two halves comparable, so a
    calibrator fitted on one half is evaluated on data with the same confidence profile.
    """
    n = confidence.shape[0]
    order = np.argsort(confidence, kind="stable")
    decile = np.empty(n, dtype=np.int64)
    decile[order] = (np.arange(n) * n_conf_groups) // max(n, 1)
    stratum = decile * 2 + correct.astype(np.int64)
    rng = rng_for("split", seed)
    key = rng.random(n)
    order = np.lexsort((key, stratum))
    # Within each stratum alternate cal/eval, starting at a random side per stratum.
    position = np.empty(n, dtype=np.int64)
    sorted_stratum = stratum[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_stratum)) + 1]
    counts = np.diff(np.r_[starts, n])
    position[order] = np.arange(n) - np.repeat(starts, counts)
    flip = rng.integers(0, 2, size=int(stratum.max()) + 1)
    to_cal = ((position + flip[stratum]) % 2) == 0
    return np.flatnonzero(to_cal), np.flatnonzero(~to_cal)
