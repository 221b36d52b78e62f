"""Building the plugin manager: built-ins, ``-p`` plugins, entry points, the user's file.

A plugin that cannot be imported because of its own code (it raises at import) does not end
the run: it becomes an ``error`` row, like a hook that raises. A plugin that does not exist
(``-p`` names no importable module or file) is a usage error.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pluggy

import routeaudit.hookspecs as hookspecs
from routeaudit.errors import AdapterError, UsageError
from routeaudit.session.calls import CallInfo, PluginFailure

ENTRY_POINT_GROUP = "routeaudit"

#: Built-in plugins, registered first under these names (``-p no:NAME`` blocks them).
BUILTIN_PLUGINS: dict[str, str] = {
    "stratification": "routeaudit.audits.stratification",
    "permutation_null": "routeaudit.audits.permutation_null",
    "capacity_control": "routeaudit.audits.capacity_control",
    "shuffled_profile": "routeaudit.audits.shuffled_profile",
    "baseline_gain": "routeaudit.audits.baseline_gain",
    "bandwidth_sensitivity": "routeaudit.audits.bandwidth_sensitivity",
    "content_dependence": "routeaudit.audits.content_dependence",
    "causal_ablation": "routeaudit.audits.causal_ablation",
    "expert_calibration": "routeaudit.audits.expert_calibration",
    "executors": "routeaudit.session.executors",
    "terminal": "routeaudit.report.terminal",
    "jsonreport": "routeaudit.report.jsonreport",
    "junitxml": "routeaudit.report.junitxml",
    "html": "routeaudit.report.html",
    "markdown": "routeaudit.report.markdown",
}


def is_file_plugin(arg: str) -> bool:
    """``-p ./my_audits.py`` or ``-p sub/dir/plugin.py``: a file, not a module name."""
    return arg.endswith(".py") or os.sep in arg or (os.altsep is not None and os.altsep in arg)


def plugin_name(arg: str) -> str:
    """The name a ``-p`` plugin is registered (and blocked) under: a file's stem, else the
    module name."""
    return Path(arg).stem if is_file_plugin(arg) else arg


def make_plugin_manager(
    plugin_args: list[str] | None = None,
    *,
    load_entry_points: bool = True,
    failures: list[PluginFailure] | None = None,
) -> pluggy.PluginManager:
    """A PluginManager with the hookspecs, built-ins, ``-p`` plugins and entry points.

    ``plugin_args`` are the values of ``-p``: module names or ``.py`` paths to import and
    register, or ``no:NAME`` to block a plugin by name (built-in, entry point or module).
    Plugins that raise while being imported are appended to ``failures`` (when given; else
    the exception propagates).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = {arg[3:] for arg in plugin_args or [] if arg.startswith("no:")}
    wanted = [arg for arg in plugin_args or [] if not arg.startswith("no:")]
    for name in blocked:
        pm.set_blocked(name)
    for name, module in BUILTIN_PLUGINS.items():
        if not pm.is_blocked(name):
            pm.register(importlib.import_module(module), name=name)
    for arg in wanted:
        name = plugin_name(arg)
        if pm.is_blocked(name) or pm.get_plugin(name) is not None:
            continue
        call = CallInfo.from_call(lambda arg=arg: _import_plugin(arg), when=f"import -p {arg}",
                                  reraise=(UsageError,))
        if call.excinfo is not None:
            _record(failures, PluginFailure(name, "import", call))
            continue
        if pm.is_registered(call.result):  # e.g. -p routeaudit.audits.X: a built-in already
            continue
        pm.register(call.result, name=name)
    if load_entry_points:
        for ep in _entry_points():
            if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
                continue
            call = CallInfo.from_call(ep.load, when=f"load entry point {ep.name}")
            if call.excinfo is not None:
                _record(failures, PluginFailure(ep.name, "import", call))
                continue
            if pm.is_registered(call.result):  # the same module under another name
                continue
            pm.register(call.result, name=ep.name)
    return pm


def _record(failures: list[PluginFailure] | None, failure: PluginFailure) -> None:
    if failures is None:
        raise failure.call.excinfo  # type: ignore[misc]
    failures.append(failure)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


@contextlib.contextmanager
def _on_path(directory: str) -> Iterator[None]:
    """``directory`` first on sys.path while importing (and only then)."""
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _import_plugin(arg: str) -> ModuleType:
    """A ``-p`` plugin: a ``.py`` path (imported like the adapter file) or a module name,
    found from the working directory as well as the installed packages."""
    if is_file_plugin(arg):
        path = Path(arg)
        if not path.is_file():
            raise UsageError(f"-p {arg}: no such plugin file")
        return import_user_file(path, kind="plugin")
    with _on_path(os.getcwd()):
        try:
            return importlib.import_module(arg)
        except ModuleNotFoundError as exc:
            if exc.name is not None and arg.split(".")[0] == exc.name.split(".")[0]:
                raise UsageError(f"-p {arg}: cannot import plugin module: {exc}") from exc
            raise
        except (TypeError, ValueError) as exc:  # e.g. a relative or empty module name
            raise UsageError(f"-p {arg}: not a module name or a .py file: {exc}") from exc


def load_plugins(
    plugin_args: list[str],
    targets: list[str],
    *,
    load_entry_points: bool = True,
    failures: list[PluginFailure] | None = None,
) -> tuple[pluggy.PluginManager, dict[str, ModuleType]]:
    """Every plugin of a run: built-ins, ``-p`` / the project file's, entry points, and the
    targets' own ``.py`` files (imported once, registered under their file names); hooks
    checked. The command line and the executors' workers start from this one function."""
    pm = make_plugin_manager(plugin_args, load_entry_points=load_entry_points, failures=failures)
    modules: dict[str, ModuleType] = {}
    for target in targets:
        if target.endswith(".py"):
            modules[target] = import_user_file(target)
            register_user_module(pm, modules[target], Path(target).name)
    check_hooks(pm)
    return pm, modules


def import_user_file(path: str | os.PathLike[str], *, kind: str = "adapter") -> ModuleType:
    """Import a user's ``.py`` file as a module; its directory is on sys.path meanwhile, so
    the file's own imports resolve next to it. Importing the same file twice returns the
    module already imported."""
    path = Path(path).resolve()
    if not path.exists():
        raise UsageError(f"file not found: {path}")
    digest = hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:10]
    name = f"routeaudit_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _on_path(str(path.parent)):
            spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        if kind == "plugin":
            raise
        raise AdapterError(f"importing {path.name} failed: {type(exc).__name__}: {exc}") from exc
    return module


def register_user_module(pm: pluggy.PluginManager, module: ModuleType, label: str) -> None:
    """The user's file is a plugin too: its ``@routeaudit.hookimpl`` functions take part."""
    if pm.is_registered(module) or pm.is_blocked(label):
        return
    pm.register(module, name=label)


def check_hooks(pm: pluggy.PluginManager) -> None:
    """Fail at start-up on a hook implementation that matches no spec (a misspelled hook)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise UsageError(f"unknown hook: {exc}") from exc
