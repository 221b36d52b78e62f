"""Building the plugin manager: built-ins, ``-p`` modules, entry points, the user's file."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pluggy

from routeaudit import hookspecs
from routeaudit.errors import AdapterError, UsageError

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
    "terminal": "routeaudit.report.terminal",
    "jsonreport": "routeaudit.report.jsonreport",
    "junitxml": "routeaudit.report.junitxml",
    "html": "routeaudit.report.html",
}


def make_plugin_manager(
    plugin_args: list[str] | None = None,
    *,
    load_entry_points: bool = True,
) -> pluggy.PluginManager:
    """A PluginManager with the hookspecs, built-ins, ``-p`` plugins and entry points.

    ``plugin_args`` are the values of ``-p``: module names to import and register, or
    ``no:NAME`` to block a plugin by name (built-in, entry point or module).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = set()
    wanted = []
    for arg in plugin_args or []:
        if arg.startswith("no:"):
            blocked.add(arg[3:])
        else:
            wanted.append(arg)
    for name in blocked:
        pm.set_blocked(name)
    for name, module in BUILTIN_PLUGINS.items():
        if not pm.is_blocked(name):
            pm.register(importlib.import_module(module), name=name)
    for module_name in wanted:
        if pm.is_blocked(module_name):
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"-p {module_name}: cannot import plugin module: {exc}") from exc
        pm.register(module, name=module_name)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def import_user_file(path: str | Path) -> ModuleType:
    """Import the user's adapter file as a module (its directory goes on sys.path first)."""
    path = Path(path).resolve()
    if not path.exists():
        raise UsageError(f"file not found: {path}")
    name = f"routeaudit_user_{path.stem}_{abs(hash(str(path))) % 10**8}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise AdapterError(f"importing {path.name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent))
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
