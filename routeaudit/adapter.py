"""The adapter contract: how user code hands routeaudit traces, or a model to extract them from.

Two kinds of adapter can be registered with ``@routeaudit.adapter`` in the user's file:

* a **trace adapter**: a function (or object with ``traces()``) returning a TraceSet, a list
  of TraceSets (trained replicates, which then become the seeds), or a path to a trace
  directory / ``.npz`` file;
* a **model adapter**: a subclass of :class:`Adapter` with ``load(device)``,
  ``batches(split)`` and ``forward(model, batch) -> ForwardOutput``, and optionally
  ``intervene(model, intervention)`` for causal audits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, NamedTuple

from routeaudit.errors import AdapterError
from routeaudit.traces import TraceMeta, TraceSet

ADAPTER_MARK = "__routeaudit_adapter__"


class ForwardOutput(NamedTuple):
    """What ``Adapter.forward`` returns for one batch (torch tensors or numpy arrays)."""

    logits: Any
    labels: Any
    routing: Any
    expert_logits: Any = None
    group: Any = None


class Adapter:
    """Base class for model adapters. Override ``load``, ``batches`` and ``forward``."""

    name: str = "model"
    #: Which split of ``batches`` the audits use.
    split: str = "eval"
    #: Valid sources per routing layer, [L, S] booleans; None means all valid.
    source_mask: Any = None
    meta: ClassVar[dict[str, Any]] = {}

    def load(self, device: Any) -> Any:
        raise NotImplementedError

    def batches(self, split: str) -> Iterable[Any]:
        raise NotImplementedError

    def forward(self, model: Any, batch: Any) -> ForwardOutput:
        raise NotImplementedError

    def intervene(self, model: Any, intervention: Any) -> Any:
        """A context manager under which ``forward`` applies a RoutingIntervention.

        Optional: causal audits are skipped for adapters that do not override it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement intervene()")

    @classmethod
    def supports_intervention(cls) -> bool:
        return cls.intervene is not Adapter.intervene


class TraceAdapter:
    """An adapter over traces that already exist on disk."""

    def __init__(self, *paths: str | os.PathLike[str]) -> None:
        self.paths = [Path(p) for p in paths]

    @classmethod
    def from_path(cls, *paths: str | os.PathLike[str]) -> TraceAdapter:
        return cls(*paths)

    def traces(self) -> list[TraceSet]:
        return [TraceSet.load(p) for p in self.paths]


def adapter(obj: Any = None, *, name: str | None = None) -> Any:
    """Mark a function, class or object in the user's file as the adapter to audit."""

    def mark(target: Any) -> Any:
        setattr(target, ADAPTER_MARK, {"name": name})
        return target

    return mark(obj) if obj is not None else mark


def find_adapters(module: ModuleType) -> list[Any]:
    """The objects in a user module marked with ``@routeaudit.adapter``, in file order."""
    found = []
    for value in vars(module).values():
        # the mark must be the object's own: a subclass of a marked adapter class inherits
        # the attribute but was not marked itself
        own = vars(value) if isinstance(value, type) else getattr(value, "__dict__", {})
        if own.get(ADAPTER_MARK) is not None and value not in found:
            found.append(value)
    return found


def traces_from_adapter(obj: Any, *, device: str | None = None, progress: bool | str = True,
                        autocast: str | None = None, cache: bool = True,
                        cache_dir: str | os.PathLike[str] | None = None) -> list[TraceSet]:
    """Turn any registered adapter into a list of validated TraceSets.

    Model adapters go through :func:`routeaudit.extract.extract_traces` (device, bf16
    autocast, progress, and the content-addressed cache unless ``cache=False``).
    """
    if isinstance(obj, type) and issubclass(obj, Adapter):
        obj = obj()
    if isinstance(obj, Adapter):
        from routeaudit.extract import extract_traces

        return [extract_traces(obj, device=device, progress=progress, autocast=autocast,
                               cache=cache, cache_dir=cache_dir)]
    if hasattr(obj, "traces") and callable(obj.traces):
        result = obj.traces()
    elif callable(obj):
        result = obj()
    else:
        raise AdapterError(f"{obj!r} is marked as an adapter but is neither callable "
                           "nor an Adapter subclass")
    return _as_tracesets(result)


def _as_tracesets(result: Any) -> list[TraceSet]:
    if isinstance(result, TraceSet):
        return [result]
    if isinstance(result, (str, os.PathLike)):
        return [TraceSet.load(result)]
    if isinstance(result, TraceAdapter):
        return result.traces()
    if isinstance(result, (list, tuple)) and result:
        sets = [ts for item in result for ts in _as_tracesets(item)]
        if len(sets) > 1:
            for i, ts in enumerate(sets):
                if ts.meta.replicate is None:
                    ts.meta = TraceMeta(**{**ts.meta.model_dump(), "replicate": i})
        return sets
    raise AdapterError("an adapter must return a TraceSet, a list of TraceSets (replicates), "
                       f"or a path to traces; got {type(result).__name__}")
