"""The session: load targets, collect and select audits, run them, correct, report.

Stage B of DESIGN.md §5: everything here is a pure function of (traces, options, seed),
so a given seed gives bit-identical verdicts.
"""

from __future__ import annotations

import importlib
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routeaudit import __version__
from routeaudit.adapter import Adapter, find_adapters, traces_from_adapter
from routeaudit.audit import Audit, AuditContext, SeedData, SerialExecutor, stratified_split
from routeaudit.calibrators import REFERENCE_CALIBRATORS, find_calibrators
from routeaudit.config import Config
from routeaudit.content import TV_MIN, content_independent
from routeaudit.errors import AdapterError, UsageError
from routeaudit.extract import ModelSession
from routeaudit.summaries import FeatureCache
from routeaudit.traces import TraceSet
from routeaudit.verdict import Report, Status, Summary, Verdict, exit_code_for


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
            return Target(path, [session.traces()], calibrator, session)
        traces = traces_from_adapter(found, progress=not options.quiet, **extraction)
        return Target(path, traces, calibrator)
    if p.is_dir() or p.suffix == ".npz":
        if not p.exists():
            raise UsageError(f"target not found: {path}")
        return Target(path, [TraceSet.load(p)])
    raise UsageError(f"target {path!r} is not an adapter .py file, a trace directory or a .npz")


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


def seed_data_for(target: Target, seeds: list[int], config: Config) -> list[SeedData]:
    """Replicates are the seeds when there are several; else each seed redraws the split."""
    if len(target.traces) > 1:
        pairs = list(zip(range(len(target.traces)), target.traces, strict=True))
    else:
        pairs = [(seed, target.traces[0]) for seed in seeds]
    out = []
    caches: dict[int, FeatureCache] = {}
    for seed, traces in pairs:
        cache = caches.setdefault(id(traces), FeatureCache(traces, config.summaries))
        data = SeedData(seed, traces, cal_index=None, eval_index=None, features=cache)  # type: ignore[arg-type]
        data.cal_index, data.eval_index = stratified_split(data.confidence, data.correct, seed)
        out.append(data)
    return out


_K_TOKEN = re.compile(r"\s*(\(|\)|and\b|or\b|not\b|[^\s()]+)")


def keyword_matches(expression: str, nodeid: str) -> bool:
    """pytest-like ``-k``: words match as case-insensitive substrings; and/or/not/parentheses."""
    tokens = _K_TOKEN.findall(expression)
    if not tokens:
        return True
    pieces = []
    for token in tokens:
        if token in ("(", ")", "and", "or", "not"):
            pieces.append(token)
        else:
            pieces.append(str(token.lower() in nodeid.lower()))
    try:
        return bool(eval(" ".join(pieces), {"__builtins__": {}}, {}))  # only True/False/ops
    except SyntaxError as exc:
        raise UsageError(f"-k {expression!r}: malformed expression") from exc


def collect_audits(config: Config) -> list[Audit]:
    audits: list[Audit] = []
    # pluggy calls the last-registered plugin first; reverse so audits (and report rows) come
    # in registration order: built-ins, -p plugins, entry points, the user's file
    for contributed in reversed(config.hook.routeaudit_collect_audits(config=config)):
        audits.extend(contributed or [])
    names = [a.name for a in audits]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise UsageError(f"audit names registered twice: {', '.join(sorted(duplicates))}")
    wanted = config.options.audit or []
    unknown = set(wanted) - set(names)
    if unknown:
        raise UsageError(f"unknown audit(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(names))}")
    if wanted:
        audits = [a for a in audits if a.name in wanted]
    return audits


def _node(target: str, audit: str, cell: dict[str, Any]) -> str:
    cell_id = "-".join(str(v) for v in cell.values())
    return f"{target}::{audit}[{cell_id}]" if cell else f"{target}::{audit}"


def error_verdicts(audit: Audit, cells: list[dict[str, Any]], target: str,
                   exc: BaseException) -> list[Verdict]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return [Verdict(audit=audit.name, claim=audit.claim, cell=cell, status=Status.ERROR,
                    reason=f"{type(exc).__name__}: {exc}", target=target, traceback=tb)
            for cell in cells or [{}]]


def frozen_routing_reason(ctx: AuditContext) -> str | None:
    """Why no routing-aware claim can hold, when the routing does not vary; else None.

    One shared check, so every routing-aware audit fails for the same stated reason instead
    of each running its statistics on float noise.
    """
    tv_min = float(getattr(ctx.options, "tv_min", None) or TV_MIN)
    for seed in ctx.seeds:
        independent, largest = content_independent(seed.traces, tv_min)
        if independent:
            return (f"routing is content-independent (no routing variation: largest per-layer "
                    f"TV distance from the mean routing {largest:.2g} < {tv_min:g}), so no "
                    "routing feature can carry signal")
    return None


def run_audits(config: Config, target: Target, audits: list[Audit], seeds: list[int]
               ) -> list[Verdict]:
    """Run the selected cells of every audit on one target; an exception becomes `error`."""
    needs_calibrator = config.calibrators.get("__cli__") or target.calibrator
    ctx = AuditContext(target=target.name, seeds=seed_data_for(target, seeds, config),
                       settings=config.settings(), summaries=config.summaries,
                       requested_summaries=list(config.options.summary or []),
                       calibrator=needs_calibrator, options=config.options,
                       session=target.session)
    for name in ctx.requested_summaries:
        config.summaries.get(name)  # unknown names are a usage error, before any work
    plan = []
    for audit in audits:
        if "calibrator" in audit.needs and ctx.calibrator is None:
            continue
        if "model" in audit.needs and not ctx.can_intervene:
            continue
        cells = audit.cells(ctx)
        if config.options.keyword:
            cells = [c for c in cells
                     if keyword_matches(config.options.keyword, _node(target.name, audit.name, c))]
        if cells:
            for seed in ctx.seeds:
                seed.traces.require_examples(audit.min_examples, f"audit {audit.name}")
            plan.append((audit, cells))

    frozen = frozen_routing_reason(ctx)

    def run_one(item: tuple[Audit, list[dict[str, Any]]]) -> list[Verdict]:
        audit, cells = item
        if frozen and getattr(audit, "routing_aware", False):
            return [Verdict(audit=audit.name, claim=audit.claim, cell=cell, status=Status.FAIL,
                            reason=frozen, target=target.name) for cell in cells]
        try:
            verdicts = audit.run(ctx, cells)
        except Exception as exc:
            return error_verdicts(audit, cells, target.name, exc)
        for verdict in verdicts:
            verdict.target = target.name
        return verdicts

    kinds = [kind for audit, _ in plan for kind in getattr(audit, "control_kinds", ())]
    ctx.control_kinds = tuple(dict.fromkeys(kinds)) or None
    executor = config.hook.routeaudit_make_executor(config=config) or SerialExecutor()
    verdicts: list[Verdict] = []
    for batch in executor.map(run_one, plan):
        for verdict in batch:
            config.hook.routeaudit_verdict(config=config, verdict=verdict)
            verdicts.append(verdict)
    return verdicts


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


def run_session(config: Config, targets: list[str], modules: dict[str, Any]) -> Report:
    """Load every target, run the battery, build the report and hand it to the reporters."""
    started = time.perf_counter()
    config.hook.routeaudit_register_summaries(registry=config.summaries)
    for name, reference in REFERENCE_CALIBRATORS.items():
        config.calibrators.setdefault(name, reference.factory)
    config.hook.routeaudit_register_calibrators(registry=config.calibrators)
    cli_calibrator = resolve_calibrator(config.options.calibrator, config)
    if cli_calibrator is not None:
        config.calibrators["__cli__"] = cli_calibrator
    seeds = config.options.seeds
    loaded = []
    for path in targets:
        target = load_target(path, config, modules)
        for traces in target.traces:
            config.hook.routeaudit_traces_ready(config=config, traces=traces)
        loaded.append(target)
    wanted = config.options.calibrator
    if wanted and cli_calibrator is None and not any(
            t.calibrator is not None and t.calibrator.name == wanted for t in loaded):
        known = sorted(n for n in config.calibrators if n != "__cli__")
        raise UsageError(f"--calibrator {wanted!r}: not registered (known: {', '.join(known)}) "
                         "and not module:factory")
    audits = collect_audits(config)
    verdicts: list[Verdict] = []
    for target in loaded:
        verdicts.extend(run_audits(config, target, audits, seeds))
    code = exit_code_for(verdicts, inconclusive_fails=config.options.inconclusive == "fail")
    report = Report(routeaudit_version=__version__, exit_code=int(code), targets=targets,
                    seeds=seeds, config=config.as_dict(), verdicts=verdicts,
                    summary=Summary.of(verdicts), duration_s=time.perf_counter() - started)
    config.hook.routeaudit_report(config=config, report=report)
    return report
