"""Content-addressed trace cache: extraction runs once per (adapter code, weights, split).

Stage A is the expensive, model-bound part (docs/architecture.md). Its output is a pure function of
the adapter's source, its checkpoint bytes, the split and the extraction settings, so those
bytes are the key: editing the adapter or retraining the model misses the cache, re-running
an audit hits it. Entries are ordinary trace directories (``TraceSet.save``), so a cached
entry can be passed to ``routeaudit run`` directly.

Layout::

    <cache_dir>/<sha256 key>/manifest.json, logits.npy, ...   (a trace directory)
    <cache_dir>/<sha256 key>/cache_key.json                    (what went into the key)

Writes are atomic (stage in a temp dir in ``cache_dir``, then ``os.replace``), so a crash
leaves no half entry; an entry that fails its sha256 check is removed and rebuilt.

The key covers the adapter's own file, not the modules it imports: an adapter whose model
code lives elsewhere should name it in ``checkpoint`` or return a version in ``cache_key()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routeaudit.errors import AdapterError, RouteAuditError
from routeaudit.traces import SCHEMA_VERSION, TraceSet

CACHE_ENV = "ROUTEAUDIT_CACHE_DIR"
DEFAULT_CACHE_DIR = ".routeaudit_cache"
KEY_FILE = "cache_key.json"
_BLOCK = 1 << 20


class CacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, unreadable) or the adapter cannot be cached."""


def default_cache_dir() -> Path:
    """``$ROUTEAUDIT_CACHE_DIR`` when set, else ``.routeaudit_cache`` in the working directory."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.cwd() / DEFAULT_CACHE_DIR


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def adapter_source_file(adapter: Any) -> Path | None:
    """The file that defines the adapter's class, or None (REPL, built-in, C extension)."""
    try:
        source = inspect.getsourcefile(type(adapter))
    except (TypeError, OSError):
        return None
    return Path(source).resolve() if source and Path(source).is_file() else None


def checkpoint_paths(adapter: Any, source: Path | None) -> list[Path]:
    """Files the adapter declares in ``checkpoint`` (relative to the adapter's own file).

    Directories count as every file beneath them, in sorted order.
    """
    declared = getattr(adapter, "checkpoint", None)
    if declared is None:
        return []
    items: Iterable[Any] = [declared] if isinstance(declared, (str, os.PathLike)) else declared
    base = source.parent if source is not None else Path.cwd()
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        path = path if path.is_absolute() else base / path
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            paths.append(path)
        else:
            raise AdapterError(f"{type(adapter).__name__}.checkpoint names {item!r}, but "
                               f"{path} does not exist")
    return paths


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CacheKey:
    """The sha256 key and a readable record of the parts it was computed from."""

    digest: str
    parts: dict[str, Any] = field(default_factory=dict)


def compute_key(adapter: Any, *, split: str, autocast: str) -> CacheKey | None:
    """The content key of one extraction, or None when the adapter's source is unknown.

    Each part is hashed on its own and the part digests are hashed in a fixed order, so no
    two different inputs can collide by concatenation.
    """
    source = adapter_source_file(adapter)
    if source is None:
        return None
    extra = adapter.cache_key() if callable(getattr(adapter, "cache_key", None)) else None
    if extra is not None and not isinstance(extra, str):
        raise AdapterError(f"{type(adapter).__name__}.cache_key() must return a str, "
                           f"not {type(extra).__name__}")
    checkpoints = [{"path": str(p), "sha256": file_sha256(p)}
                   for p in checkpoint_paths(adapter, source)]
    parts: dict[str, Any] = {
        "adapter_source": {"path": str(source), "sha256": file_sha256(source)},
        "adapter_class": type(adapter).__qualname__,
        "checkpoints": checkpoints,
        "split": str(split),
        "schema_version": SCHEMA_VERSION,
        "autocast": autocast,
        "adapter_cache_key": extra,
    }
    digest = hashlib.sha256()
    for name, value in [
        ("adapter_source", parts["adapter_source"]["sha256"]),
        ("adapter_class", parts["adapter_class"]),
        ("checkpoints", ",".join(c["sha256"] for c in checkpoints)),
        ("split", parts["split"]),
        ("schema_version", str(SCHEMA_VERSION)),
        ("autocast", autocast),
        ("adapter_cache_key", "" if extra is None else "1" + extra),
    ]:
        piece = hashlib.sha256(value.encode()).hexdigest()
        digest.update(f"{name}={piece};".encode())
    return CacheKey(digest.hexdigest(), parts)


class TraceCache:
    """One cache directory of trace entries addressed by :class:`CacheKey`."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = resolve_cache_dir(root)

    def path(self, key: CacheKey) -> Path:
        return self.root / key.digest

    def load(self, key: CacheKey) -> TraceSet | None:
        """The cached TraceSet, or None on a miss; a corrupt entry is removed with a warning."""
        entry = self.path(key)
        if not entry.is_dir():
            return None
        try:
            return TraceSet.load(entry)
        except (RouteAuditError, OSError, ValueError, KeyError) as exc:
            warnings.warn(f"routeaudit cache entry {entry} is unusable ({exc}); rebuilding it",
                          CacheWarning, stacklevel=3)
            self._discard(entry)
            return None

    def store(self, key: CacheKey, traces: TraceSet) -> Path:
        """Write ``traces`` under the key atomically.

        Same key, same content: when another process got there first, its entry is kept.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key.digest[:12]}-", dir=self.root))
        try:
            entry = traces.save(staging / "entry")
            (entry / KEY_FILE).write_text(json.dumps(key.parts, indent=2, sort_keys=True))
            try:
                os.replace(entry, target)
            except OSError:
                if not (target / "manifest.json").exists():  # not a concurrent writer: real error
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _discard(self, entry: Path) -> None:
        """Move the entry out of its key's name first, so readers never see it half-deleted."""
        doomed = Path(tempfile.mkdtemp(prefix=".discard-", dir=self.root))
        with contextlib.suppress(OSError):
            os.replace(entry, doomed / "entry")
        shutil.rmtree(doomed, ignore_errors=True)
