"""Stage A: run a model adapter over its batches and collect a TraceSet.

Why it is shaped this way (docs/architecture.md):

* Everything runs under ``torch.inference_mode`` (no autograd bookkeeping), on CUDA when
  present, optionally under bf16 autocast.
* Outputs leave the device batch by batch. On CUDA they are copied into reused pinned host
  buffers with ``non_blocking=True`` and collected one batch later, so the copy of batch i
  overlaps the launch of batch i+1 and the device never holds more than one batch of traces.
* The result is validated as a TraceSet and, by default, stored in the content-addressed
  cache (:mod:`routeaudit.model.cache`), so re-running an audit never re-runs the model.
  The session says which happened (``cache_status``, ``cache_report()``): a cache that
  silently reuses traces is only trustworthy if the user can see that it did, and why not.
* :class:`ModelSession` keeps the loaded model for the extra passes that causal audits ask
  for (``session.forward(intervention)``), in the same example order as the traces.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from routeaudit.errors import AdapterError, RouteAuditError, TraceValidationError, UsageError
from routeaudit.model.adapter import Adapter, ForwardOutput, TraceAdapter, supports_intervention
from routeaudit.model.cache import CacheKey, CacheWarning, TraceCache, compute_key, describe_changes
from routeaudit.traces import TraceMeta, TraceSet

AUTOCAST_MODES = ("none", "bf16")
FIELDS = ("logits", "labels", "routing", "expert_logits", "group", "token_index")
FLOAT_FIELDS = ("logits", "routing", "expert_logits")
#: bf16 keeps ~3 significant digits, so a bf16 softmax row can miss 1 by more than the trace
#: tolerance (1e-3). Rows within this looser bound are renormalised; worse rows still fail.
LOW_PRECISION_ROW_TOLERANCE = 0.02
#: How many hex digits of a cache key the status line shows.
SHORT_KEY = 12

HostBatch = dict[str, np.ndarray]


# ---------------------------------------------------------------------------- settings
def pick_device(requested: Any = None) -> Any:
    """The requested torch device, else CUDA when present, else CPU."""
    import torch

    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def normalize_autocast(mode: str | None) -> str:
    """``None``/``"none"`` → ``"none"``; ``"bf16"`` (or ``"bfloat16"``) → ``"bf16"``."""
    text = "none" if mode in (None, False) else str(mode).lower()
    text = {"bfloat16": "bf16", "off": "none"}.get(text, text)
    if text not in AUTOCAST_MODES:
        raise UsageError(f"autocast must be one of {AUTOCAST_MODES}, not {mode!r}")
    return text


def autocast_context(device: Any, mode: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the device's type (CUDA and CPU both support it), or nothing."""
    if mode == "none":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- progress
class Progress:
    """Progress of a pass over the batches on stderr (tqdm): batches, examples, examples/s,
    ETA, elapsed time.

    ``mode``: True or ``"auto"`` draws only on a terminal (tqdm's ``disable=None``);
    ``"always"`` (or ``"force"``) draws anywhere (throttled to one redraw per 5 s off a
    terminal, for logs); False/``"never"`` is silent. The bar starts with the first batch,
    so its first line already has a rate, and it stays on screen when the pass ends.
    """

    def __init__(self, label: str, *, total: int | None, unit: str = "examples",
                 mode: bool | str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        mode = {True: "auto", False: "never", None: "never", "force": "always"}.get(mode, mode)
        if mode not in ("auto", "always", "never"):
            raise UsageError(f"progress must be auto, always or never, not {mode!r}")
        self.mode = mode
        self.enabled = mode == "always" or (mode == "auto" and self.tty)
        self.label, self.total, self.unit = label, total, unit
        self.batches = self.examples = 0
        self.started = time.perf_counter()
        self.bar: Any = None

    def update(self, n_examples: int) -> None:
        self.batches += 1
        self.examples += n_examples
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = _bar_class()(self, total=self.total, initial=self.batches, desc=self.label,
                                    file=self.stream, unit=self.unit, leave=True,
                                    disable=None if self.mode == "auto" else False,
                                    mininterval=0.1 if self.tty else 5.0)
        else:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def line(self, now: float | None = None) -> str:
        """The line tqdm draws: it counts batches, but the rate that matters is examples/s,
        and the ETA is by batches from the start of the pass."""
        from tqdm import tqdm

        elapsed = max((time.perf_counter() if now is None else now) - self.started, 1e-9)
        batches = f"{self.batches}/{self.total}" if self.total else str(self.batches)
        text = (f"{self.label}: batch {batches}, {self.examples} {self.unit}, "
                f"{self.examples / elapsed:.0f} {self.unit}/s")
        if self.total and 0 < self.batches < self.total:
            eta = elapsed / self.batches * (self.total - self.batches)
            text += f", ETA {tqdm.format_interval(eta)}"
        return text + f", {tqdm.format_interval(elapsed)} elapsed"


@functools.cache
def _bar_class() -> type:
    """tqdm counting batches whose line is :meth:`Progress.line` (tqdm imported lazily)."""
    from tqdm import tqdm

    class BatchBar(tqdm):  # type: ignore[misc]
        monitor_interval = 0  # no monitor thread: the bar redraws on each batch anyway

        def __init__(self, progress: Progress, **kwargs: Any) -> None:
            self.progress = progress
            super().__init__(bar_format="{line}", **kwargs)

        @property
        def format_dict(self) -> dict[str, Any]:
            return {**super().format_dict, "line": self.progress.line()}

    return BatchBar


def _n_batches(adapter: Any, batches: Iterable[Any]) -> int | None:
    """How many batches there will be, when the adapter or its iterable says so."""
    for candidate in (adapter, batches):
        if hasattr(type(candidate), "__len__"):
            with contextlib.suppress(TypeError, NotImplementedError):
                return len(candidate)  # type: ignore[arg-type]
    declared = getattr(adapter, "n_batches", None)
    if callable(declared):
        declared = declared()
    return int(declared) if declared is not None else None


# ---------------------------------------------------------------------------- device → host
class HostCopier:
    """Moves one batch of outputs to host numpy arrays.

    On CUDA the copies go into pinned buffers with ``non_blocking=True`` and are finished one
    batch later (double-buffered, so a buffer is never overwritten before it is read). On
    other devices the copy is plain and immediate. ``submit`` returns the previous batch (or
    this one, off CUDA); ``flush`` returns what is still in flight.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.low_precision: set[str] = set()
        self._pending: tuple[Any, dict[str, Any], HostBatch] | None = None
        self._pool: dict[tuple[Any, ...], Any] = {}
        self._slot = 0

    def submit(self, fields: Mapping[str, Any]) -> HostBatch | None:
        staged: dict[str, Any] = {}
        host: HostBatch = {}
        for name, value in fields.items():
            if value is None:
                continue
            if self.torch.is_tensor(value):
                if value.dtype in (self.torch.bfloat16, self.torch.float16):
                    self.low_precision.add(name)
                if self.cuda and value.device.type == "cuda":
                    buffer = self._buffer(name, value)
                    buffer.copy_(value.detach(), non_blocking=True)
                    staged[name] = buffer
                    continue
            host[name] = self._plain(value)
        if not self.cuda:
            return host
        event = self.torch.cuda.Event()
        event.record()
        previous, self._pending = self._pending, (event, staged, host)
        self._slot ^= 1
        return self._finish(previous)

    def flush(self) -> HostBatch | None:
        previous, self._pending = self._pending, None
        return self._finish(previous)

    def _buffer(self, name: str, value: Any) -> Any:
        key = (self._slot, name, value.dtype, tuple(value.shape))
        buffer = self._pool.get(key)
        if buffer is None:
            buffer = self.torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._pool[key] = buffer
        return buffer

    def _finish(self, pending: tuple[Any, dict[str, Any], HostBatch] | None) -> HostBatch | None:
        if pending is None:
            return None
        event, staged, host = pending
        event.synchronize()
        for name, buffer in staged.items():  # copy out: the pinned buffer is reused
            host[name] = self._tensor_to_numpy(buffer, copy=True)
        return host

    def _plain(self, value: Any) -> np.ndarray:
        if not self.torch.is_tensor(value):
            return np.asarray(value)
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        # A view into a larger buffer (e.g. the last position of [B, T, H]) would keep the
        # whole buffer alive in the host list; copy those, share everything else.
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        return self._tensor_to_numpy(tensor, copy=not (whole and tensor.is_contiguous()))

    def _tensor_to_numpy(self, tensor: Any, *, copy: bool) -> np.ndarray:
        if tensor.dtype == self.torch.bfloat16:  # numpy has no bf16
            return tensor.to(self.torch.float32).numpy()
        array = tensor.numpy()
        return array.copy() if copy else array


# ---------------------------------------------------------------------------- collection
def as_fields(out: Any, where: str) -> dict[str, Any]:
    """A ForwardOutput, a tuple in its order, or a mapping of contract names → a dict."""
    if isinstance(out, ForwardOutput):
        return out._asdict()
    if isinstance(out, Mapping):
        unknown = set(out) - set(FIELDS)
        if unknown:
            raise AdapterError(f"{where} returned unknown fields {sorted(unknown)}; "
                               f"known: {', '.join(FIELDS)}")
        return dict(out)
    if isinstance(out, tuple):
        return ForwardOutput(*out)._asdict()
    raise AdapterError(f"{where} must return a ForwardOutput, not {type(out).__name__}")


def _leading(value: Any) -> int:
    if value is None:
        raise TraceValidationError("labels", "missing from a batch", expected="one label per example")
    shape = getattr(value, "shape", None)
    if shape is None:
        shape = np.shape(value)
    if len(shape) == 0:
        raise TraceValidationError("labels", "is a scalar", expected="one label per example")
    return int(shape[0])


class Collector:
    """Accumulates host batches, checking each against the first so errors name the batch."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.n = 0
        self.batches = 0
        self.rows: list[int] = []  # rows of each batch, in order (a shard's join needs them)

    def add(self, batch: HostBatch) -> None:
        if "labels" not in batch or "logits" not in batch or "routing" not in batch:
            missing = next(f for f in ("logits", "labels", "routing") if f not in batch)
            raise TraceValidationError(missing, f"missing from batch {self.batches}",
                                       index=self.n, expected="logits, labels and routing")
        n = len(batch["labels"]) if np.ndim(batch["labels"]) else 0
        if self.batches == 0:
            self.shapes = {name: array.shape[1:] for name, array in batch.items()}
        for name, array in batch.items():
            if array.ndim == 0 or array.shape[0] != n:
                raise TraceValidationError(
                    name, f"batch {self.batches} has shape {array.shape}", index=self.n,
                    expected=f"{n} rows, as labels in that batch")
            if name not in self.shapes or array.shape[1:] != self.shapes[name]:
                want = self.shapes.get(name)
                raise TraceValidationError(
                    name, f"batch {self.batches} has shape {array.shape}", index=self.n,
                    expected="absent, as in batch 0" if want is None
                    else f"[*, {', '.join(map(str, want))}] as in batch 0")
            self.parts.setdefault(name, []).append(array)
        for name in self.shapes:
            if name not in batch:
                raise TraceValidationError(name, f"missing from batch {self.batches}",
                                           index=self.n, expected="present, as in batch 0")
        self.n += n
        self.batches += 1
        self.rows.append(n)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(chunks) for name, chunks in self.parts.items()}


def renormalize_rows(routing: np.ndarray, source_mask: Any) -> np.ndarray:
    """Renormalise routing rows that miss 1 only by low-precision rounding."""
    valid = (np.ones(routing.shape[1:], dtype=bool) if source_mask is None
             else np.asarray(source_mask, dtype=bool))
    if valid.shape != routing.shape[1:]:
        return routing  # validation will name the mismatch
    wide = routing.astype(np.float64)
    sums = np.where(valid[None], wide, 0.0).sum(axis=2, keepdims=True)
    ok = (np.abs(sums - 1.0) <= LOW_PRECISION_ROW_TOLERANCE) & (sums > 0)
    scaled = np.where(ok & valid[None], wide / np.where(ok, sums, 1.0), wide)
    return scaled.astype(np.float32)


# ---------------------------------------------------------------------------- session
class ModelSession:
    """An adapter, its lazily loaded model and device, for extraction and causal passes.

    ``traces()`` returns the clean TraceSet (from the cache when it can, without loading the
    model). ``forward(intervention)`` runs the same evaluation batches inside
    ``adapter.intervene(model, intervention)`` and returns host arrays in trace order;
    ``forward(None)`` is served from the traces. The model is loaded at most once.

    After ``traces()``, the session says where the traces came from:

    * ``cache_hit``: True when they were reused from the cache;
    * ``cache_status``: one short line, "reused traces from the cache (key 1a2b3c4d5e6f…)",
      "extracted (cache miss: no entry for key 1a2b3c4d5e6f…)" or "extracted (cache
      disabled)" (before ``traces()``: "not extracted yet");
    * ``cache_changes``: on a miss, what differs from the newest cached entry of the same
      adapter class ("model.py changed"), empty when there is none;
    * ``cache_key`` (the :class:`CacheKey`, or None) and ``cache_entry`` (its directory);
    * ``cache_report(verbose=False)``: the line to print, with the changes (and, verbose,
      the entry's path).

    Usage::

        with ModelSession(MyAdapter(), autocast="bf16") as session:
            traces = session.traces()
            print(session.cache_report(), file=sys.stderr)
            ablated = session.forward(RoutingIntervention(kind="mask", family="history"))
    """

    def __init__(self, adapter: Any, *, device: Any = None, autocast: str | None = None,
                 cache: bool = True, cache_dir: str | os.PathLike[str] | None = None,
                 progress: bool | str = "auto", stream: TextIO | None = None,
                 split: str | None = None) -> None:
        if isinstance(adapter, type):
            adapter = adapter()
        for method in ("load", "batches", "forward"):
            if not callable(getattr(adapter, method, None)):
                raise AdapterError(f"{type(adapter).__name__} has no {method}(); a model adapter "
                                   "needs load, batches and forward")
        self.adapter = adapter
        self.autocast = normalize_autocast(autocast)
        self.progress = progress
        self.stream = stream
        self.cache = TraceCache(cache_dir) if cache else None
        self.cache_hit = False
        self.cache_status = "not extracted yet"
        self.cache_changes: list[str] = []
        self.cache_key: CacheKey | None = None
        self.cache_entry: Path | None = None
        self.n_loads = 0
        self.n_passes = 0
        self._device_request = device
        self._device: Any = None
        self._model: Any = None
        self._loaded = False
        self._traces: TraceSet | None = None
        self._split = split
        self._siblings: dict[str, ModelSession] = {}
        self._parent: ModelSession | None = None  # a sibling split uses its parent's model
        self._shard: tuple[int, int] | None = None  # (rank, world_size) during shard_traces
        self.batch_rows: list[int] = []  # rows of each batch of the last pass

    # --- properties
    @property
    def name(self) -> str:
        return str(getattr(self.adapter, "name", type(self.adapter).__name__))

    @property
    def split(self) -> str:
        if self._split is not None:
            return self._split
        return str(getattr(self.adapter, "split", "eval"))

    @property
    def extra_splits(self) -> tuple[str, ...]:
        """Other splits the adapter offers (``Adapter.extra_splits``, e.g. ``("shift",)``)."""
        value = getattr(self.adapter, "extra_splits", ()) or ()
        if isinstance(value, str):
            value = (value,)
        return tuple(str(v) for v in value if str(v) != self.split)

    def for_split(self, split: str) -> ModelSession:
        """A session over another split of the same adapter, sharing the loaded model and
        the trace cache (each split has its own cache entry); memoised per split."""
        if split == self.split:
            return self
        if split not in self._siblings:
            sibling = ModelSession(self.adapter, device=self._device_request,
                                   autocast=self.autocast, cache=self.cache is not None,
                                   progress=self.progress, stream=self.stream, split=split)
            sibling.cache = self.cache
            sibling._parent = self
            self._siblings[split] = sibling
        return self._siblings[split]


    @property
    def per_token(self) -> bool:
        meta = dict(getattr(self.adapter, "meta", {}) or {})
        return bool(getattr(self.adapter, "per_token", meta.get("per_token", False)))

    @property
    def device(self) -> Any:
        if self._parent is not None:
            return self._parent.device
        if self._device is None:
            self._device = pick_device(self._device_request)
        return self._device

    @property
    def model(self) -> Any:
        """The adapter's model, loaded on first use and kept (one per adapter: a session
        over another split uses the first session's)."""
        if self._parent is not None:
            return self._parent.model
        if not self._loaded:
            try:
                self._model = self.adapter.load(self.device)
            except RouteAuditError:
                raise
            except Exception as exc:
                raise AdapterError(f"{type(self.adapter).__name__}.load failed: "
                                   f"{type(exc).__name__}: {exc}{self._path_hint(exc)}") from exc
            self._loaded = True
            self.n_loads += 1
            if getattr(self._model, "training", False):
                warnings.warn(f"{type(self.adapter).__name__}.load returned a model in training "
                              "mode (dropout active): traces will be random; call model.eval()",
                              RuntimeWarning, stacklevel=3)
        return self._model

    # --- public API
    def traces(self) -> TraceSet:
        """The clean, validated TraceSet: cached, or extracted (and stored) on a miss.

        Sets ``cache_hit``, ``cache_status`` and, on a miss, ``cache_changes``.
        """
        if self._traces is not None:
            return self._traces
        key = self._key()
        self.cache_key = key
        if self.cache is None:
            self.cache_status = "extracted (cache disabled)"
        elif key is None:
            self.cache_status = (f"extracted (cache disabled: {type(self.adapter).__name__} has "
                                 "no source file to key it by)")
        else:
            self.cache_entry = self.cache.path(key)
            existed = self.cache_entry.is_dir()
            cached = self.cache.load(key)
            if cached is not None:
                self.cache_hit = True
                self.cache_status = f"reused traces from the cache (key {_short(key)})"
                self._traces = cached
                return cached
            self.cache_status = (f"extracted (cache miss: the entry for key {_short(key)} was "
                                 "unusable, rebuilt)" if existed else
                                 f"extracted (cache miss: no entry for key {_short(key)})")
            self.cache_changes = self._changes(key)
        arrays, low_precision = self._run_pass(None)
        traces = self._build(arrays, low_precision, key)
        if key is not None and self.cache is not None:
            try:
                self.cache.store(key, traces)
            except OSError as exc:
                self.cache_status = self.cache_status[:-1] + "; not stored)"
                warnings.warn(f"could not write the routeaudit cache entry under "
                              f"{self.cache.root}: {exc}", CacheWarning, stacklevel=2)
        self._traces = traces
        return traces

    def shard_traces(self, rank: int, world_size: int) -> TraceSet:
        """This rank's share of the clean pass (routeaudit.model.shards): the batches i with
        ``i % world_size == rank``, built and validated exactly as ``traces()`` builds the
        whole set (same dtypes, same meta, cache key included), so the shards joined in
        batch order equal a single-process extraction. ``batch_rows`` then holds the rows
        of each of those batches. The trace cache is neither read nor written.
        """
        key = self._key()
        self.cache_status = f"extracted (rank {rank} of {world_size}; trace cache not used)"
        self._shard = (rank, world_size)
        try:
            arrays, low_precision = self._run_pass(None)
        finally:
            self._shard = None
        return self._build(arrays, low_precision, key)

    def cache_report(self, verbose: bool = False) -> str:
        """``cache_status``, plus what changed since the last cached extraction on a miss.

        ``verbose`` adds the cache entry's directory and puts each change on its own line.
        """
        text = self.cache_status
        if self.cache_changes:
            cls = type(self.adapter).__name__
            if verbose:
                text += f"\n  changed since the last cached extraction of {cls}:"
                text += "".join(f"\n    {change}" for change in self.cache_changes)
            else:
                text += f"; changed since the last cached extraction of {cls}: " \
                        + ", ".join(self.cache_changes)
        if verbose and self.cache_entry is not None:
            text += f"\n  cache entry: {self.cache_entry}"
        return text

    def forward(self, intervention: Any = None) -> dict[str, np.ndarray]:
        """Host arrays (logits, labels, routing, ...) of one pass, in trace example order."""
        if intervention is None:
            arrays = self.traces().arrays()
            return {name: value for name, value in arrays.items() if name != "source_mask"}
        if not supports_intervention(self.adapter):
            raise AdapterError(f"{type(self.adapter).__name__} does not implement "
                               "intervene(model, intervention); causal audits need it")
        arrays, _ = self._run_pass(intervention)
        for name in FLOAT_FIELDS:
            if name in arrays:
                arrays[name] = arrays[name].astype(np.float32, copy=False)
        if self._traces is not None and not np.array_equal(arrays["labels"], self._traces.labels):
            raise AdapterError(f"{type(self.adapter).__name__}.batches({self.split!r}) yielded "
                               "examples in a different order than at extraction; batches "
                               "must be deterministic for causal audits")
        return arrays

    def close(self) -> None:
        """Drop the model (and, on CUDA, the cached device memory it held)."""
        self._model, self._loaded = None, False
        if self._device is not None and self._device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def __enter__(self) -> ModelSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals
    def _key(self) -> CacheKey | None:
        if self.cache is None:
            return None
        key = compute_key(self.adapter, split=self.split, autocast=self.autocast)
        if key is None:
            warnings.warn(f"{type(self.adapter).__name__} has no source file, so its traces "
                          "cannot be cached", CacheWarning, stacklevel=3)
        return key

    def _changes(self, key: CacheKey) -> list[str]:
        """On a miss: what differs from the newest entry of the same adapter class."""
        assert self.cache is not None
        try:
            closest = self.cache.closest(key)
            return describe_changes(closest[1], key.parts) if closest is not None else []
        except (OSError, KeyError, TypeError, ValueError):  # an odd old record: no explanation
            return []

    def _path_hint(self, exc: Exception) -> str:
        """When ``load`` could not find a file by a relative path, say which folder it means."""
        if not isinstance(exc, FileNotFoundError):
            return ""
        missing = getattr(exc, "filename", None)
        declared = getattr(self.adapter, "checkpoint", None)
        if missing is None and isinstance(declared, (str, os.PathLike)) \
                and os.fspath(declared) in str(exc):  # safetensors does not set filename
            missing = declared
        if not isinstance(missing, (str, os.PathLike)) or os.path.isabs(os.fspath(missing)):
            return ""
        return (f" (a relative path in load() is taken from the working directory, "
                f"{os.getcwd()}; use self.resolve({os.fspath(missing)!r}) to take it next to "
                "the adapter's file, as the trace cache does)")

    def _intervention_context(self, model: Any, intervention: Any
                              ) -> contextlib.AbstractContextManager[Any]:
        if intervention is None:
            return contextlib.nullcontext()
        try:
            context = self.adapter.intervene(model, intervention)
        except NotImplementedError as exc:
            raise AdapterError(f"{type(self.adapter).__name__}.intervene: {exc}") from exc
        if not (hasattr(context, "__enter__") and hasattr(context, "__exit__")):
            raise AdapterError(f"{type(self.adapter).__name__}.intervene must return a context "
                               f"manager, not {type(context).__name__}")
        return context

    def _batches(self) -> Iterable[Any]:
        try:
            return self.adapter.batches(self.split)
        except RouteAuditError:
            raise
        except Exception as exc:
            raise AdapterError(f"{type(self.adapter).__name__}.batches({self.split!r}) failed: "
                               f"{type(exc).__name__}: {exc}") from exc

    def _forward_each(self, model: Any, batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
        where = f"{type(self.adapter).__name__}.forward"
        rank, world = self._shard or (0, 1)
        for i, batch in enumerate(batches):
            if i % world != rank:  # another rank's batch (round-robin, as the reader joins)
                continue
            try:
                out = self.adapter.forward(model, batch)
            except RouteAuditError:
                raise
            except Exception as exc:
                raise AdapterError(f"{where} failed on batch {i}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            yield as_fields(out, where)

    def _run_pass(self, intervention: Any) -> tuple[dict[str, np.ndarray], set[str]]:
        """One streamed pass over the evaluation batches; host arrays and low-precision fields."""
        import torch

        model = self.model
        device = self.device
        batches = self._batches()
        label = "extracting" if intervention is None else "intervening"
        label += f" {self.name}"
        if intervention is not None and getattr(intervention, "label", ""):
            label += f" [{intervention.label}]"
        total = _n_batches(self.adapter, batches)
        if self._shard is not None:
            rank, world = self._shard
            label += f" [rank {rank} of {world}]"
            total = None if total is None else total // world + (rank < total % world)
        progress = Progress(label, total=total,
                            unit="tokens" if self.per_token else "examples",
                            mode=self.progress, stream=self.stream)
        copier = HostCopier(device)
        collector = Collector()
        with (self._intervention_context(model, intervention), torch.inference_mode(),
              autocast_context(device, self.autocast)):
            for fields in self._forward_each(model, batches):
                n = _leading(fields["labels"])
                done = copier.submit(fields)
                del fields  # the device keeps only the batch being computed
                if done is not None:
                    collector.add(done)
                progress.update(n)
            done = copier.flush()
            if done is not None:
                collector.add(done)
        progress.close()
        self.n_passes += 1
        self.batch_rows = collector.rows
        if collector.batches == 0 and self._shard is not None:
            rank, world = self._shard
            raise AdapterError(f"{type(self.adapter).__name__}.batches({self.split!r}) yielded "
                               f"no batches for rank {rank} of {world}: run at most as many "
                               "processes as there are batches")
        if collector.batches == 0:
            raise AdapterError(f"{type(self.adapter).__name__}.batches({self.split!r}) "
                               "yielded no batches")
        return collector.arrays(), copier.low_precision

    def _build(self, arrays: dict[str, np.ndarray], low_precision: set[str],
               key: CacheKey | None) -> TraceSet:
        source_mask = getattr(self.adapter, "source_mask", None)
        routing = arrays["routing"]
        if "routing" in low_precision or self.autocast != "none":
            routing = renormalize_rows(routing, source_mask)
        meta = {"name": self.name, **dict(getattr(self.adapter, "meta", {}) or {}),
                "per_token": self.per_token,
                "extraction": {"device": str(self.device), "autocast": self.autocast,
                               "split": self.split,
                               "cache_key": key.digest if key is not None else None}}
        optional = {name: arrays.get(name) for name in ("group", "token_index")}
        expert = arrays.get("expert_logits")
        return TraceSet(arrays["logits"].astype(np.float32, copy=False), arrays["labels"],
                        routing.astype(np.float32, copy=False), source_mask=source_mask,
                        expert_logits=None if expert is None else expert.astype(np.float32),
                        meta=TraceMeta(**meta), **optional)


def extract_traces(adapter: Any, *, device: Any = None, progress: bool | str = "auto",
                   autocast: str | None = None, cache: bool = True,
                   cache_dir: str | os.PathLike[str] | None = None,
                   stream: TextIO | None = None,
                   on_session: Callable[[ModelSession], None] | None = None) -> TraceSet:
    """Extract (or fetch from the cache) the validated TraceSet of a model adapter.

    ``on_session`` is called with the session once the traces exist, so a caller can report
    ``session.cache_report()`` without managing the session itself.
    """
    with ModelSession(adapter, device=device, autocast=autocast, cache=cache,
                      cache_dir=cache_dir, progress=progress, stream=stream) as session:
        traces = session.traces()
        if on_session is not None:
            on_session(session)
        return traces


def _short(key: CacheKey) -> str:
    return key.digest[:SHORT_KEY] + "…"


def traces_from_adapter(obj: Any, *, device: str | None = None, progress: bool | str = True,
                        autocast: str | None = None, cache: bool = True,
                        cache_dir: str | os.PathLike[str] | None = None,
                        on_session: Callable[[ModelSession], None] | None = None
                        ) -> list[TraceSet]:
    """Turn any registered adapter into a list of validated TraceSets.

    Model adapters go through :func:`routeaudit.model.extract.extract_traces` (device, bf16
    autocast, progress, and the content-addressed cache unless ``cache=False``);
    ``on_session`` sees their :class:`ModelSession` (for ``cache_report()``).
    """
    if isinstance(obj, type) and issubclass(obj, Adapter):
        obj = obj()
    if isinstance(obj, Adapter):
        return [extract_traces(obj, device=device, progress=progress, autocast=autocast,
                               cache=cache, cache_dir=cache_dir, on_session=on_session)]
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
