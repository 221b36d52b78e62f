"""Targets: what the user handed over (adapter file, trace directory, ``.npz``), loaded.

A model adapter keeps its :class:`~routeaudit.model.extract.ModelSession`, so causal audits
can re-run the model; every other adapter is turned into TraceSets by the one dispatcher,
:func:`routeaudit.model.extract.traces_from_adapter`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routeaudit.calibrators import find_calibrators
from routeaudit.errors import AdapterError, UsageError
from routeaudit.model.adapter import Adapter, find_adapters
from routeaudit.model.extract import ModelSession, traces_from_adapter
from routeaudit.session.config import Config
from routeaudit.traces import TraceSet


@dataclass
class Target:
    """One thing to audit: a name for node ids, its traces (replicates), and its calibrator."""

    name: str
    traces: list[TraceSet]
    calibrator: Any = None
    session: ModelSession | None = None  # model adapters only: runs interventions


def load_target(path: str, config: Config, modules: dict[str, Any]) -> Target:
    """A ``.py`` adapter file, a trace directory or a ``.npz`` file → Target."""
    p = Path(path)
    if p.suffix == ".py":
        module = modules[path]
        adapters = find_adapters(module)
        if not adapters:
            raise AdapterError(f"{path}: no adapter found; mark one with @routeaudit.adapter")
        if len(adapters) > 1:
            raise AdapterError(f"{path}: {len(adapters)} adapters found; mark exactly one")
        options = config.options
        extraction = dict(device=options.device, autocast=getattr(options, "autocast", None),
                          cache=not getattr(options, "no_cache", False),
                          cache_dir=getattr(options, "cache_dir", None))
        calibrator = file_calibrator(path, module, config)
        found = adapters[0]
        if isinstance(found, Adapter) or (isinstance(found, type) and issubclass(found, Adapter)):
            # a model adapter: keep the session, causal audits run extra passes through it
            session = ModelSession(found, progress=not options.quiet, **extraction)
            traces = session.traces()
            say_cache(path, session, options)
            return Target(path, [traces], calibrator, session)
        traces = traces_from_adapter(found, progress=not options.quiet,
                                     on_session=lambda s: say_cache(path, s, options),
                                     **extraction)
        return Target(path, traces, calibrator)
    # anything else is traces: TraceSet.load names the file and says what it expected
    # (a missing path, a dangling link, a .npy or a text file included)
    return Target(path, [TraceSet.load(p)])


def say_cache(path: str, session: ModelSession, options: Any) -> None:
    """One line on stderr: were the traces reused from the cache, or extracted (and, with
    ``-v``, what changed since the last cached extraction)?"""
    if not getattr(options, "quiet", 0):
        verbose = getattr(options, "verbose", 0) > 0
        print(f"{path}: {session.cache_report(verbose=verbose)}", file=sys.stderr)


def file_calibrator(path: str, module: Any, config: Config) -> Any:
    """The calibrator registered in the user's file with ``@routeaudit.calibrator``.

    With several, ``--calibrator NAME`` picks one; without one, the target has none (and
    the calibrator audits do not apply to it).
    """
    specs = find_calibrators(module)
    if len(specs) <= 1:
        return specs[0] if specs else None
    wanted = config.options.calibrator
    for spec in specs:
        if spec.name == wanted:
            return spec
    names = ", ".join(s.name for s in specs)
    raise UsageError(f"{path} registers {len(specs)} calibrators ({names}); "
                     "choose one with --calibrator NAME")


def resolve_calibrator(spec: str | None, config: Config) -> Any:
    """``--calibrator NAME`` (registered by a plugin) or ``module:factory``."""
    if not spec:
        return None
    if spec in config.calibrators:
        return config.calibrators[spec]
    module_name, _, attr = spec.partition(":")
    if not attr:
        return None  # a name that only the user's adapter file registers (see file_calibrator)
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"--calibrator {spec!r}: {exc}") from exc
