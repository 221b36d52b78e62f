"""Content-addressed trace cache: extraction runs once per (adapter code, weights, split).

Stage A is the expensive, model-bound part (docs/architecture.md). Its output is a pure function of
the adapter's code, its checkpoint bytes, the split and the extraction settings, so those
bytes are the key: editing the adapter, the model code it imports or retraining the model
misses the cache, re-running an audit hits it. Entries are ordinary trace directories
(``TraceSet.save``), so a cached entry can be passed to ``routeaudit run`` directly.

Layout::

    <cache_dir>/<sha256 key>/manifest.json, logits.npy, ...   (a trace directory)
    <cache_dir>/<sha256 key>/cache_key.json                    (what went into the key)

Writes are atomic (stage in a temp dir in ``cache_dir``, then ``os.replace``), so a crash
leaves no half entry; an entry that fails its sha256 check is removed and rebuilt.

What the key covers (:func:`compute_key`):

* the file that defines the adapter class, and its **local modules**;
* the ``checkpoint`` file(s), a relative path resolved against the adapter's folder
  (:func:`routeaudit.model.adapter.adapter_path`, the rule ``load()`` should use too);
* the split, the autocast mode, the trace schema version, routeaudit's version and the
  adapter's ``cache_key()`` string.

The local-module rule (:func:`local_modules`). A module is *local* when its file is not
part of the installed environment (not under the stdlib, site-packages, user site, or the
``sys.prefix`` / ``sys.base_prefix`` / ``sys.exec_prefix`` trees) and not part of
routeaudit's own package directory (routeaudit's version is in the key instead). The key
hashes every local module reachable by **import statements** from the files that define the
adapter class and its base classes: each local file is parsed (``ast``) and its ``import``
/ ``from ... import`` statements (anywhere in the file, relative ones resolved against its
package, plus ``importlib.import_module("literal")`` calls) are followed, transitively,
through local files only. A name is resolved to the module ``sys.modules`` holds for it
(what actually ran) or, when it was never imported (a lazy import inside ``load``), found on
the path without importing it, the adapter's folder first, as ``import_user_file`` does.

Why imports and not "every local module in ``sys.modules``": ``sys.modules`` depends on what
else the process imported (a test's conftest, another adapter of the same folder imported
earlier), so the key would change with the process; the import graph depends only on the
files themselves, so the same adapter gets the same key in any process and from any working
directory. The blind spots are imports that no statement names (``import_module(f"...")``,
``exec``, files read as data): list those in ``checkpoint`` or fold them into
``cache_key()``. Installed third-party packages are not hashed (an upgrade of torch does not
miss the cache).

On a miss, :meth:`TraceCache.closest` finds the newest entry of the same adapter class and
:func:`describe_changes` says which of the recorded inputs differ ("model.py changed").
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.machinery
import json
import os
import shutil
import site
import sys
import sysconfig
import tempfile
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routeaudit._version import __version__
from routeaudit.errors import AdapterError, RouteAuditError
from routeaudit.model.adapter import adapter_path, adapter_source_file
from routeaudit.traces import SCHEMA_VERSION, TraceSet

CACHE_ENV = "ROUTEAUDIT_CACHE_DIR"
DEFAULT_CACHE_DIR = ".routeaudit_cache"
KEY_FILE = "cache_key.json"
_BLOCK = 1 << 20
#: routeaudit's own package directory: its code is covered by ``__version__`` in the key.
ROUTEAUDIT_DIR = Path(__file__).resolve().parents[1]


class CacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, unreadable) or the adapter cannot be cached."""


def default_cache_dir() -> Path:
    """``$ROUTEAUDIT_CACHE_DIR`` when set, else ``.routeaudit_cache`` in the working directory."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.cwd() / DEFAULT_CACHE_DIR


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def checkpoint_paths(adapter: Any, source: Path | None = None) -> list[Path]:
    """Files the adapter declares in ``checkpoint``, a relative path taken next to the file
    that defines the adapter class (:func:`~routeaudit.model.adapter.adapter_path`).

    Directories count as every file beneath them, in sorted order. ``source`` is accepted for
    compatibility and ignored: the rule is the adapter's, so ``load()`` can follow it too.
    """
    del source
    declared = getattr(adapter, "checkpoint", None)
    if declared is None:
        return []
    items: Iterable[Any] = [declared] if isinstance(declared, (str, os.PathLike)) else declared
    paths: list[Path] = []
    for item in items:
        path = adapter_path(adapter, item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            paths.append(path)
        else:
            raise AdapterError(f"{type(adapter).__name__}.checkpoint names {item!r}, but "
                               f"{path} does not exist (a relative path is taken next to the "
                               "file that defines the adapter class)")
    return paths


# ---------------------------------------------------------------------------- local modules
def installed_roots(adapter_dir: Path) -> list[Path]:
    """Folders whose modules are "installed", not local (see the module docstring).

    The prefixes (``sys.prefix`` and friends) are broad: one that contains the adapter's own
    folder (a project inside ``/usr/local``) is dropped, while the stdlib and site-packages
    folders inside it still count as installed.
    """
    specific = {sysconfig.get_paths().get(name) for name in ("stdlib", "platstdlib", "purelib",
                                                              "platlib", "include", "platinclude",
                                                              "scripts")}
    with contextlib.suppress(AttributeError):  # some embedded interpreters lack these
        specific.update(site.getsitepackages())
    with contextlib.suppress(AttributeError):
        specific.add(site.getusersitepackages())
    broad = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             sysconfig.get_paths().get("data")}
    roots = {ROUTEAUDIT_DIR}
    for text in specific | broad:
        if not text:
            continue
        root = Path(text).resolve()
        if text in broad and text not in specific and adapter_dir.is_relative_to(root):
            continue
        roots.add(root)
    return sorted(roots)


@dataclass(frozen=True)
class _Module:
    """A module found by name: its file (None for a namespace package) and, for a package,
    its search locations."""

    name: str
    origin: Path | None
    locations: tuple[str, ...] | None

    @property
    def package(self) -> str:
        """What a relative import in this module is relative to."""
        return self.name if self.locations is not None else self.name.rpartition(".")[0]


def _from_module(name: str, module: Any) -> _Module | None:
    try:
        file = getattr(module, "__file__", None)
        path = getattr(module, "__path__", None)
        locations = tuple(str(p) for p in path) if path is not None else None
    except Exception:  # an odd object in sys.modules (a lazy proxy): not a file we can hash
        return None
    origin = Path(file).resolve() if isinstance(file, str) and Path(file).is_file() else None
    return _Module(name, origin, locations)


def _from_spec(name: str, spec: Any) -> _Module:
    origin = Path(spec.origin).resolve() if spec.has_location and spec.origin else None
    locations = spec.submodule_search_locations
    return _Module(name, origin, tuple(str(p) for p in locations) if locations is not None else None)


class _ImportGraph:
    """Resolves module names the way the adapter's imports do, without importing anything."""

    def __init__(self, adapter_dir: Path) -> None:
        self.adapter_dir = adapter_dir
        self.roots = installed_roots(adapter_dir)
        self._found: dict[str, _Module | None] = {}

    def is_local_path(self, path: Path) -> bool:
        return not any(path.is_relative_to(root) for root in self.roots)

    def is_local(self, module: _Module) -> bool:
        if module.origin is not None:
            return self.is_local_path(module.origin)
        return any(self.is_local_path(Path(p).resolve()) for p in module.locations or ())

    def find(self, name: str) -> _Module | None:
        if name not in self._found:
            self._found[name] = self._find(name)
        return self._found[name]

    def _find(self, name: str) -> _Module | None:
        if name in sys.modules:
            return _from_module(name, sys.modules[name])
        parent_name = name.rpartition(".")[0]
        if parent_name:
            parent = self.find(parent_name)
            if parent is None or parent.locations is None:
                return None  # ``from module import attribute``: not a module
            path = list(parent.locations)
        else:
            path = [str(self.adapter_dir), *(p for p in sys.path if isinstance(p, str))]
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
        except (ImportError, ValueError, OSError):
            return None
        return _from_spec(name, spec) if spec is not None else None


def _with_parents(name: str) -> Iterator[str]:
    """``a.b.c`` → ``a``, ``a.b``, ``a.b.c``: importing a submodule runs its packages too."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def _absolute(module: str | None, level: int, package: str) -> str | None:
    if level == 0:
        return module
    parts = package.split(".") if package else []
    if level - 1 >= len(parts):
        return None  # outside any package, or beyond the top one: it failed at import
    base = parts[:len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imported_names(source: str | bytes, package: str) -> set[str]:
    """Absolute names of the modules a file's import statements may load (``source`` as
    bytes honours the file's coding cookie, as the import system does)."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            if base is None:
                continue
            names.update(_with_parents(base))
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__")):
            text = node.args[0].value
            if text and not text.startswith("."):
                names.update(_with_parents(text))
    return names


def local_modules(adapter: Any, source: Path | None = None) -> list[tuple[str, Path]]:
    """(module name, file) of every local module the adapter's class depends on, sorted by
    path; the file that defines the adapter class itself is not among them.

    See the module docstring for the rule and why it is stable across processes.
    """
    source = source or adapter_source_file(adapter)
    if source is None:
        return []
    graph = _ImportGraph(source.parent)
    queue: deque[tuple[_Module, Path]] = deque()
    cls = adapter if isinstance(adapter, type) else type(adapter)
    for klass in cls.__mro__:
        file = adapter_source_file(klass)
        if file is None or not graph.is_local_path(file):
            continue
        module = sys.modules.get(klass.__module__)
        found = _from_module(klass.__module__, module) if module is not None else None
        if found is None or found.origin != file:  # e.g. a class defined under exec
            found = _Module(klass.__module__, file, None)
        queue.append((found, file))
    seen: dict[Path, str] = {}
    while queue:
        module, file = queue.popleft()
        if file in seen:
            continue
        seen[file] = module.name
        if file.suffix != ".py":
            continue  # a compiled extension: hashed, not parsed
        try:
            names = imported_names(file.read_bytes(), module.package)
        except (SyntaxError, ValueError, OSError):
            continue
        for name in sorted(names):
            found = graph.find(name)
            if (found is not None and found.origin is not None and found.origin not in seen
                    and graph.is_local(found)):
                queue.append((found, found.origin))
    return sorted(((name, path) for path, name in seen.items() if path != source),
                  key=lambda item: str(item[1]))


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

    The key covers the adapter's file, its local modules (:func:`local_modules`), its
    checkpoint files, the split, autocast, the trace schema, routeaudit's version and the
    adapter's ``cache_key()``. Each part is hashed on its own and the part digests are
    hashed in a fixed order, so no two different inputs can collide by concatenation.
    ``parts`` records the same inputs readably (stored as ``cache_key.json``), so a miss can
    say what changed.
    """
    source = adapter_source_file(adapter)
    if source is None:
        return None
    extra = adapter.cache_key() if callable(getattr(adapter, "cache_key", None)) else None
    if extra is not None and not isinstance(extra, str):
        raise AdapterError(f"{type(adapter).__name__}.cache_key() must return a str, "
                           f"not {type(extra).__name__}")
    checkpoints = [{"path": str(p), "sha256": file_sha256(p)}
                   for p in checkpoint_paths(adapter)]
    modules = [{"module": name, "path": str(path), "sha256": file_sha256(path)}
               for name, path in local_modules(adapter, source)]
    parts: dict[str, Any] = {
        "adapter_source": {"path": str(source), "sha256": file_sha256(source)},
        "adapter_class": type(adapter).__qualname__,
        "local_modules": modules,
        "checkpoints": checkpoints,
        "split": str(split),
        "schema_version": SCHEMA_VERSION,
        "routeaudit_version": __version__,
        "autocast": autocast,
        "adapter_cache_key": extra,
    }
    digest = hashlib.sha256()
    for name, value in [
        ("adapter_source", parts["adapter_source"]["sha256"]),
        ("adapter_class", parts["adapter_class"]),
        ("local_modules", ",".join(f"{m['module']}:{m['sha256']}" for m in modules)),
        ("checkpoints", ",".join(c["sha256"] for c in checkpoints)),
        ("split", parts["split"]),
        ("schema_version", str(SCHEMA_VERSION)),
        ("routeaudit_version", __version__),
        ("autocast", autocast),
        ("adapter_cache_key", "" if extra is None else "1" + extra),
    ]:
        piece = hashlib.sha256(value.encode()).hexdigest()
        digest.update(f"{name}={piece};".encode())
    return CacheKey(digest.hexdigest(), parts)


def _display(path: str, base: Path) -> str:
    """A recorded path as the user knows it: relative to the adapter's folder when close."""
    try:
        relative = os.path.relpath(path, base)
    except ValueError:  # another drive
        return path
    return relative if relative.count("..") <= 2 else path


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two recorded key parts (``cache_key.json``), in words.

    For example ``["model.py changed", "checkpoint weights.safetensors changed"]``; empty when
    no recorded input differs.
    """
    base = Path(new["adapter_source"]["path"]).parent
    changes: list[str] = []
    old_source, new_source = old.get("adapter_source") or {}, new["adapter_source"]
    if old_source.get("path") != new_source["path"]:
        changes.append(f"the adapter file moved (was {old_source.get('path')})")
    if old_source.get("sha256") != new_source["sha256"]:
        changes.append(f"{Path(new_source['path']).name} changed")
    if "local_modules" not in old:
        changes.append("the cached entry predates local-module tracking")
    for label, field_name in (("", "local_modules"), ("checkpoint ", "checkpoints")):
        if field_name not in old:
            continue
        before = {item["path"]: item["sha256"] for item in old.get(field_name) or []}
        after = {item["path"]: item["sha256"] for item in new.get(field_name) or []}
        for path in sorted(before.keys() | after.keys()):
            shown = label + _display(path, base)
            if path not in before:
                changes.append(f"{shown} added" if label else f"{shown} is now imported")
            elif path not in after:
                changes.append(f"{shown} removed" if label else f"{shown} is no longer imported")
            elif before[path] != after[path]:
                changes.append(f"{shown} changed")
    for name, label in (("split", "split"), ("autocast", "autocast"),
                        ("schema_version", "trace schema version"),
                        ("routeaudit_version", "routeaudit version")):
        if old.get(name) != new.get(name):
            changes.append(f"{label} {old.get(name)!r} → {new.get(name)!r}")
    if old.get("adapter_cache_key") != new.get("adapter_cache_key"):
        changes.append("cache_key() changed")
    return changes


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

    def closest(self, key: CacheKey) -> tuple[Path, dict[str, Any]] | None:
        """The newest other entry of the same adapter class (same file preferred), with its
        recorded parts, or None. Used on a miss to say what changed."""
        if not self.root.is_dir():
            return None
        best: tuple[tuple[bool, float], Path, dict[str, Any]] | None = None
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or entry.name == key.digest:
                continue
            record = entry / KEY_FILE
            try:
                parts = json.loads(record.read_text())
                stamp = record.stat().st_mtime
            except (OSError, ValueError):
                continue
            if not isinstance(parts, dict) or parts.get("adapter_class") != key.parts["adapter_class"]:
                continue
            same_file = (parts.get("adapter_source") or {}).get("path") \
                == key.parts["adapter_source"]["path"]
            rank = (same_file, stamp)
            if best is None or rank > best[0]:
                best = (rank, entry, parts)
        return None if best is None else (best[1], best[2])

    def _discard(self, entry: Path) -> None:
        """Move the entry out of its key's name first, so readers never see it half-deleted."""
        doomed = Path(tempfile.mkdtemp(prefix=".discard-", dir=self.root))
        with contextlib.suppress(OSError):
            os.replace(entry, doomed / "entry")
        shutil.rmtree(doomed, ignore_errors=True)
