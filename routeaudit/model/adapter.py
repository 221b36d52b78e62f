"""The adapter contract: how user code hands routeaudit traces, or a model to extract them from.

Two kinds of adapter can be registered with ``@routeaudit.adapter`` in the user's file:

* a **trace adapter**: a function (or object with ``traces()``) returning a TraceSet, a list
  of TraceSets (trained replicates, which then become the seeds), or a path to a trace
  directory / ``.npz`` file;
* a **model adapter**: a subclass of :class:`Adapter` with ``load(device)``,
  ``batches(split)`` and ``forward(model, batch) -> ForwardOutput``, and optionally
  ``intervene(model, intervention)`` for causal audits.

Relative paths in a model adapter (``checkpoint``, data files) mean "next to the file that
defines the adapter class", never "in the working directory": the adapter's own imports
resolve next to that file (``import_user_file`` puts its folder first on ``sys.path``), so
its files must too, or the same adapter breaks when run from another folder.
:func:`adapter_path` (``Adapter.resolve``) is that one rule, used by the trace cache for
``checkpoint`` and available to ``load()``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, NamedTuple

from routeaudit.traces import TraceSet

ADAPTER_MARK = "__routeaudit_adapter__"


class ForwardOutput(NamedTuple):
    """What ``Adapter.forward`` returns for one batch (torch tensors or numpy arrays)."""

    logits: Any
    labels: Any
    routing: Any
    expert_logits: Any = None
    group: Any = None


class Adapter:
    """Base class for model adapters. Override ``load``, ``batches`` and ``forward``.

    ``checkpoint`` (optional) names the weight file(s) the traces depend on: a path or a list
    of paths (a directory counts as every file in it). They are hashed into the trace cache
    key, together with the adapter's file and the local modules it imports
    (:mod:`routeaudit.model.cache`). A relative path is relative to the folder of the file
    that defines the adapter class, not to the working directory; open it the same way in
    ``load`` with :meth:`resolve`::

        checkpoint = "weights.safetensors"

        def load(self, device):
            state = safetensors.torch.load_file(self.resolve(self.checkpoint))
            ...

    ``cache_key()`` (optional) returns a string for anything else the traces depend on
    that is neither a file the adapter imports nor a checkpoint (a dataset version, an
    environment variable).
    """

    name: str = "model"
    #: Which split of ``batches`` the audits use.
    split: str = "eval"
    #: Other splits ``batches`` serves that audits may ask for by name (e.g. ``("shift",)``:
    #: a held-back domain that ``expert_calibration`` checks its claims on too). Each is
    #: extracted only when an audit asks, and cached like the main split.
    extra_splits: tuple[str, ...] = ()
    #: Valid sources per routing layer, [L, S] booleans; None means all valid.
    source_mask: Any = None
    meta: ClassVar[dict[str, Any]] = {}

    def load(self, device: Any) -> Any:
        raise NotImplementedError

    def batches(self, split: str) -> Iterable[Any]:
        raise NotImplementedError

    def forward(self, model: Any, batch: Any) -> ForwardOutput:
        raise NotImplementedError

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """``path`` resolved against this adapter's folder (see :func:`adapter_path`)."""
        return adapter_path(self, path)

    def intervene(self, model: Any, intervention: Any) -> Any:
        """A context manager under which ``forward`` applies a RoutingIntervention.

        Optional: causal audits are skipped for adapters that do not override it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement intervene()")

    @classmethod
    def supports_intervention(cls) -> bool:
        """True when the class overrides :meth:`intervene` (see :func:`supports_intervention`)."""
        return cls.intervene is not Adapter.intervene


def adapter_source_file(adapter: Any) -> Path | None:
    """The file that defines the adapter's class (resolved), or None (REPL, built-in, C extension).

    ``adapter`` may be an instance or the class itself.
    """
    cls = adapter if isinstance(adapter, type) else type(adapter)
    try:
        source = inspect.getsourcefile(cls)
    except (TypeError, OSError):
        return None
    return Path(source).resolve() if source and Path(source).is_file() else None


def adapter_path(adapter: Any, path: str | os.PathLike[str]) -> Path:
    """``path`` as the adapter means it: absolute as is, ``~`` expanded, and a relative path
    joined to the folder of the file that defines the adapter's class.

    Why that folder: the adapter file's imports resolve there, so its data must too, or the
    run would depend on the working directory. Without a source file (a class typed into a
    REPL) the working directory is the only folder there is.
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    source = adapter_source_file(adapter)
    base = source.parent if source is not None else Path.cwd()
    return base / candidate


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


def supports_intervention(adapter: Any) -> bool:
    """Whether causal audits can re-run this adapter's model with its routing changed.

    The one check used everywhere: an :class:`Adapter` must override ``intervene`` (and may
    veto it with ``supports_intervention()``); any other object needs a callable
    ``intervene``.
    """
    if adapter is None:
        return False
    cls = adapter if isinstance(adapter, type) else type(adapter)
    if issubclass(cls, Adapter):
        return bool(cls.supports_intervention())
    return callable(getattr(adapter, "intervene", None))
