"""The session: load targets, collect and select audits, run them, report.

Stage B (docs/architecture.md): everything here is a pure function of (traces, options, seed), so
a given seed gives bit-identical verdicts. Every call into plugin code goes through
:class:`~routeaudit.session.calls.CallInfo`: an audit or hook that raises becomes an
``error`` row and the battery goes on; an audit whose needs are unmet gets a ``skip`` row.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Generator, Sequence
from types import SimpleNamespace
from typing import Any

from routeaudit._version import __version__
from routeaudit.audit import (
    Audit,
    AuditContext,
    SerialExecutor,
    WorkItem,
    audit_member,
    experts_missing,
    seeds_for,
)
from routeaudit.calibration.features import check_features
from routeaudit.calibrators import REFERENCE_CALIBRATORS
from routeaudit.calibrators.base import spec_of
from routeaudit.errors import RouteAuditError, UsageError
from routeaudit.session.calls import CallInfo, HookCaller, PluginFailure, error_verdicts
from routeaudit.session.config import Config
from routeaudit.session.selection import Selection, nodeid
from routeaudit.session.targets import Target, load_target, resolve_calibrator
from routeaudit.summaries import content_independent
from routeaudit.verdict import Report, Status, Summary, Verdict, exit_code_for

#: Members an object must have to be an audit (the rest have defaults; see routeaudit.audit).
REQUIRED_MEMBERS = ("name", "claim", "needs", "cells", "run")
#: ``config.stash`` key that is true while a progress bar is drawn on stderr; the terminal
#: reporter then leaves out its verdict marks, which would tear the bar's line.
PROGRESS_KEY = "routeaudit.progress"


def hooks(config: Config) -> HookCaller:
    """The guarded hook caller of this session (failures land in ``config.failures``)."""
    return HookCaller(config.pluginmanager, config.failures, reraise=(RouteAuditError,))


def collect_audits(config: Config) -> list[Audit]:
    """Every audit the plugins contribute, in registration order (built-ins, ``-p``, entry
    points, the user's file); then ``--audit`` selects among them."""
    audits: list[Audit] = []
    # pluggy calls the last-registered plugin first; reverse so audits (and report rows) come
    # in registration order
    for contributed in reversed(hooks(config).call("routeaudit_collect_audits", config=config)):
        for audit in contributed or []:
            missing = [m for m in REQUIRED_MEMBERS if not hasattr(audit, m)]
            if missing:
                info = CallInfo.from_call(lambda audit=audit, missing=missing: _not_an_audit(
                    audit, missing), "routeaudit_collect_audits")
                config.failures.append(PluginFailure(type(audit).__module__,
                                                     "routeaudit_collect_audits", info))
                continue
            audits.append(audit)
    names = [a.name for a in audits]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise UsageError(f"audit names registered twice: {', '.join(sorted(duplicates))}")
    wanted = getattr(config.options, "audit", None) or []
    unknown = set(wanted) - set(names)
    if unknown:
        raise UsageError(f"unknown audit(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(names))}")
    return audits


def _not_an_audit(audit: Any, missing: list[str]) -> None:
    raise TypeError(f"{audit!r} is not an audit: it lacks {', '.join(missing)} "
                    "(see routeaudit.audit.Audit)")


def check_claims(ctx: AuditContext, requested: Sequence[str]) -> None:
    """Usage errors found while collecting, before any work: a ``--summary`` or calibrator
    feature that names nothing these traces have is one error naming what exists."""
    traces = ctx.seeds[0].traces if ctx.seeds else None
    if traces is None:
        return
    for name in requested:
        try:
            ctx.summaries.check(name, traces)
        except UsageError as exc:
            raise UsageError(f"{ctx.target}: --summary {name}: {exc}") from exc
    spec = spec_of(ctx.calibrator) if ctx.calibrator is not None else None
    if spec is not None:
        try:
            check_features(spec.features, traces, ctx.summaries)
        except UsageError as exc:
            raise UsageError(f"{ctx.target}: calibrator {spec.name!r}: {exc}") from exc


def unmet_need(audit: Audit, ctx: AuditContext) -> str | None:
    """Why an audit cannot run on this target (its ``skip`` reason), or None."""
    if "calibrator" in audit.needs and ctx.calibrator is None:
        return ("no calibrator to audit: register one with @routeaudit.calibrator in the "
                "adapter file, or pass --calibrator NAME")
    if "model" in audit.needs and not ctx.can_intervene:
        if ctx.session is None:
            return "the target is traces, not a model: this audit re-runs the model"
        return (f"the model adapter {type(ctx.session.adapter).__name__} does not implement "
                "intervene(model, intervention), which this audit needs")
    if "experts" in audit.needs and ctx.seeds:
        return experts_missing(ctx.seeds[0].traces)
    return None


def too_little_data(audit: Audit, ctx: AuditContext) -> str | None:
    """Why the target has too few examples for this audit (an ``inconclusive`` reason that
    says how many it needs), or None."""
    need = int(audit_member(audit, "min_examples"))
    have = min((seed.traces.n_examples for seed in ctx.seeds), default=0)
    if have >= need:
        return None
    return (f"too little data: {have} examples, and this audit needs at least {need}; "
            f"{need - have} more would let it decide")


def frozen_routing_reason(ctx: AuditContext) -> str | None:
    """Why no routing-aware claim can hold, when the routing does not vary; else None.

    One shared check, so every routing-aware audit fails for the same stated reason instead
    of each running its statistics on float noise.
    """
    tv_min = ctx.settings.tv_min
    for traces in {id(seed.traces): seed.traces for seed in ctx.seeds}.values():  # once per trace set
        independent, largest = content_independent(traces, tv_min)
        if independent:
            return (f"routing is content-independent (no routing variation: largest per-layer "
                    f"TV distance from the mean routing {largest:.2g} < {tv_min:g}), so no "
                    "routing feature can carry signal")
    return None


def make_context(config: Config, target: Target, audits: Sequence[Audit]) -> AuditContext:
    calibrator = config.calibrators.get("__cli__") or target.calibrator
    return AuditContext(
        target=target.name, seeds=seeds_for(target.traces, config.options.seeds, config.summaries),
        settings=config.settings(), summaries=config.summaries,
        requested_summaries=list(config.options.summary or []), calibrator=calibrator,
        options=config.options, session=target.session,
        audits={audit.name: audit for audit in audits})


class GridProgress:
    """Progress over one target's audit grid, each audit weighted by its cells × seeds (the
    permutations, bootstraps and control fits it runs per cell and seed), on stderr.

    Drawn only on a terminal and without ``-q``. It advances once an audit's verdicts are
    in (audits report nothing finer to the runner), reads only counts, and never touches a
    random stream or a verdict: results are identical with and without it.
    """

    def __init__(self, config: Config, label: str, total: int, stream: Any = None) -> None:
        self.config = config
        self.counts: Counter[str] = Counter()
        self.current = ""
        self.current_phase = ""
        self.bar: Any = None
        stream = sys.stderr if stream is None else stream
        if total <= 0 or config.options.quiet >= 1 or not _isatty(stream):
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=label, file=stream, leave=False, dynamic_ncols=True,
                        mininterval=0.1,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} cell-seeds "
                                   "[{elapsed}<{remaining}{postfix}]")
        config.stash[PROGRESS_KEY] = True

    def start(self, audit: str) -> None:
        """Show the audit that is running now."""
        self.current = audit
        self.current_phase = ""
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix())

    def phase(self, what: str) -> None:
        """Show what the running audit is doing (``AuditContext.step``)."""
        self.current_phase = what
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix())

    def advance(self, units: int, verdicts: Sequence[Verdict]) -> None:
        """Count an audit's verdicts and its share of the grid."""
        self.counts.update(v.status.value for v in verdicts)
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(units)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.config.stash.pop(PROGRESS_KEY, None)

    def _postfix(self) -> str:
        tally = ", ".join(f"{self.counts[s.value]} {s.value}" for s in Status if self.counts[s.value])
        running = f"{self.current}: {self.current_phase}" if self.current_phase else self.current
        return " · ".join(part for part in (running, tally) if part)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def run_audits(config: Config, target: Target, audits: list[Audit],
               selection: Selection | None = None) -> list[Verdict]:
    """Run the selected cells of every audit on one target. An exception in ``cells`` or
    ``run`` becomes ``error`` rows; an audit whose needs are unmet becomes a ``skip`` row.
    ``selection`` counts what ``-k`` kept across targets (a fresh one when not given)."""
    ctx = make_context(config, target, audits)
    check_claims(ctx, ctx.requested_summaries)
    if selection is None:
        selection = Selection(config.options.keyword, config.options.audit)
    wanted = set(config.options.audit or [])
    rows: list[Verdict | tuple[Audit, list[dict[str, Any]]]] = []
    for audit in audits:
        if wanted and audit.name not in wanted:
            continue
        why = unmet_need(audit, ctx)
        if why is not None:
            if selection.keeps(nodeid(target.name, audit.name, {})):
                rows.append(Verdict(audit=audit.name, claim=audit.claim, status=Status.SKIP,
                                    reason=why, target=target.name))
            continue
        call = CallInfo.from_call(lambda audit=audit: audit.cells(ctx), "cells")
        if call.failed:
            rows.extend(error_verdicts(audit, [], target.name, call))
            continue
        cells = [c for c in call.result or [] if selection.keeps(nodeid(target.name, audit.name, c))]
        if not cells:
            continue
        short = too_little_data(audit, ctx)
        if short is not None:
            rows.extend(ctx.verdict(audit, cell, Status.INCONCLUSIVE, short) for cell in cells)
            continue
        rows.append((audit, cells))
    plan = [row for row in rows if isinstance(row, tuple)]
    ctx.control_kinds = _control_kinds(ctx, [audit for audit, _ in plan])
    frozen = (frozen_routing_reason(ctx)
              if any(audit_member(a, "routing_aware") for a, _ in plan) else None)

    n_seeds = max(len(ctx.seeds), 1)
    progress = GridProgress(config, f"auditing {target.name}",
                            sum(len(cells) * n_seeds for _, cells in plan))
    ctx.progress = progress.phase
    work = work_items(config, target, plan, ctx.control_kinds, frozen)

    def run_local(item: WorkItem) -> list[Verdict]:
        """The in-process fast path: the run's own context, shared memoised results."""
        audit, cells = plan[item.index]
        progress.start(audit.name)
        return run_planned(ctx, audit, cells, frozen)

    caller = hooks(config)
    executor = caller.call("routeaudit_make_executor", firstresult=True, config=config)
    results = _in_order(executor or SerialExecutor(), run_local, work, progress, n_seeds)
    verdicts: list[Verdict] = []
    planned = iter(work)
    try:
        for row in rows:
            if isinstance(row, Verdict):
                progress.advance(0, [row])
                batch = [row]
            else:
                item = next(planned)
                found = next(results, None)  # an executor that returns too few results
                batch = found if found is not None else _batch(item, LookupError(
                    f"the executor {type(executor).__name__} returned no result for this item"))
            for verdict in batch:
                caller.call("routeaudit_verdict", config=config, verdict=verdict)
                verdicts.append(verdict)
    finally:
        results.close()
        progress.close()
    return verdicts


def run_planned(ctx: AuditContext, audit: Audit, cells: list[dict[str, Any]],
                frozen: str | None) -> list[Verdict]:
    """One planned audit on its cells: the frozen-routing rule, the guarded ``run``, the
    target on every verdict. The same in this process and in a worker."""
    if frozen and audit_member(audit, "routing_aware"):
        return [ctx.verdict(audit, cell, Status.FAIL, frozen) for cell in cells]
    call = CallInfo.from_call(lambda: _checked_run(audit, ctx, cells), "run")
    if call.failed:
        return error_verdicts(audit, cells, ctx.target, call)
    for verdict in call.result or []:
        verdict.target = ctx.target
    return list(call.result or [])


def work_items(config: Config, target: Target, plan: Sequence[tuple[Audit, list[dict[str, Any]]]],
               control_kinds: tuple[str, ...] | None, frozen: str | None) -> list[WorkItem]:
    """The plan as picklable (target × audit) items (cheap: no copies of the traces)."""
    options = {key: value for key, value in vars(config.options).items() if _picklable(value)}
    targets = tuple(getattr(config.options, "targets", None) or [target.name])
    run_id = uuid.uuid4().hex
    # a model adapter's worker loads it (trace cache) to re-run the model; other traces travel
    traces = tuple(target.traces) if target.session is None else None
    return [WorkItem(index=i, target=target.name, audit=audit.name, claim=audit.claim,
                     cells=tuple(cells), options=options,
                     plugins=tuple(getattr(config.options, "plugins", None) or []),
                     targets=targets, cwd=os.getcwd(), control_kinds=control_kinds,
                     frozen=frozen, run_id=run_id, traces=traces)
            for i, (audit, cells) in enumerate(plan)]


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # a plugin's option holding a live object stays in this process
        return False
    return True


def _in_order(executor: Any, run_local: Any, work: list[WorkItem], progress: GridProgress,
              n_seeds: int) -> Generator[list[Verdict], None, None]:
    """The executor's results in plan order; the progress bar advances as each comes back
    (in completion order with ``map_unordered``)."""
    units = [len(item.cells) * n_seeds for item in work]
    unordered = getattr(executor, "map_unordered", None)
    if unordered is None:
        for item, result in zip(work, executor.map(run_local, work), strict=False):
            batch = _batch(item, result)
            progress.advance(units[item.index], batch)
            yield batch
        return
    ready: dict[int, list[Verdict]] = {}
    following = 0
    for index, result in unordered(run_local, work):
        batch = _batch(work[index], result)
        progress.start(work[index].audit)
        progress.advance(units[index], batch)
        ready[index] = batch
        while following in ready:
            yield ready.pop(following)
            following += 1


def _batch(item: WorkItem, result: Any) -> list[Verdict]:
    """An item's verdicts; an exception (a worker that died, a task that failed outside
    the audit's own guard) becomes ``error`` rows, never the end of the run."""
    if isinstance(result, BaseException):
        text = "".join(traceback.format_exception(type(result), result, result.__traceback__))
        call: CallInfo[Any] = CallInfo("executor", excinfo=result, traceback=text)
        return error_verdicts(SimpleNamespace(name=item.audit, claim=item.claim),
                              list(item.cells), item.target, call)
    return list(result)


def _checked_run(audit: Audit, ctx: AuditContext, cells: list[dict[str, Any]]) -> list[Verdict]:
    result = audit.run(ctx, cells)
    if not isinstance(result, list) or not all(isinstance(v, Verdict) for v in result):
        raise TypeError(f"{type(audit).__name__}.run must return a list of Verdict, "
                        f"not {type(result).__name__}")
    return result


def _control_kinds(ctx: AuditContext, planned: Sequence[Audit]) -> tuple[str, ...] | None:
    """The calibrator variants the planned audits need: their own and those of the audits
    they re-run (found by name, so a blocked audit contributes none)."""
    kinds: list[str] = []
    for audit in planned:
        kinds.extend(audit_member(audit, "control_kinds"))
        for name in audit_member(audit, "reruns"):
            other = ctx.audit(name)
            if other is not None:
                kinds.extend(audit_member(other, "control_kinds"))
    return tuple(dict.fromkeys(kinds)) or None


def prepare_session(config: Config) -> Any:
    """Register summaries and calibrators (built-in and plugins') and resolve
    ``--calibrator``: what ``run`` and ``validate`` do before loading targets."""
    caller = hooks(config)
    caller.call("routeaudit_register_summaries", registry=config.summaries)
    for name, reference in REFERENCE_CALIBRATORS.items():
        config.calibrators.setdefault(name, reference.factory)
    caller.call("routeaudit_register_calibrators", registry=config.calibrators)
    cli_calibrator = resolve_calibrator(config.options.calibrator, config)
    if cli_calibrator is not None:
        config.calibrators["__cli__"] = cli_calibrator
    return cli_calibrator


def run_session(config: Config, targets: list[str], modules: dict[str, Any]) -> Report:
    """Load every target, run the battery, build the report and hand it to the reporters."""
    started = time.perf_counter()
    verdicts = audit_targets(config, load_targets(config, targets, modules))
    report = build_report(config, targets, verdicts, started)
    render(config, report)
    return report


def load_targets(config: Config, targets: Sequence[str | Target],
                 modules: dict[str, Any]) -> list[Target]:
    """Register summaries and calibrators, load each target (paths; a ready ``Target`` is
    taken as it is), call ``routeaudit_traces_ready``, and check ``--calibrator`` names one."""
    caller = hooks(config)
    cli_calibrator = prepare_session(config)
    loaded = []
    for given in targets:
        target = given if isinstance(given, Target) else load_target(given, config, modules)
        for traces in target.traces:
            caller.call("routeaudit_traces_ready", config=config, traces=traces)
        loaded.append(target)
    wanted = config.options.calibrator
    if wanted and cli_calibrator is None and not any(
            t.calibrator is not None and t.calibrator.name == wanted for t in loaded):
        known = sorted(n for n in config.calibrators if n != "__cli__")
        raise UsageError(f"--calibrator {wanted!r}: not registered (known: {', '.join(known)}) "
                         "and not module:factory")
    return loaded


def audit_targets(config: Config, loaded: list[Target]) -> list[Verdict]:
    """Collect the audits once and run them on every loaded target; say so when ``-k`` /
    ``--audit`` selected nothing."""
    audits = collect_audits(config)
    verdicts: list[Verdict] = []
    selection = Selection(config.options.keyword, config.options.audit)
    for target in loaded:
        verdicts.extend(run_audits(config, target, audits, selection))
    why = selection.nothing_selected()
    if why is not None:  # exit 5 as before, but with the reason rather than "no verdicts"
        _say(why)
    return verdicts


def build_report(config: Config, targets: list[str], verdicts: list[Verdict],
                 started: float) -> Report:
    """The report: plugin failures first (they concern the whole run), then the verdicts."""
    rows = [failure.verdict() for failure in config.failures] + verdicts
    code = exit_code_for(rows, inconclusive_fails=config.options.inconclusive == "fail")
    return Report(routeaudit_version=__version__, exit_code=int(code), targets=targets,
                  seeds=config.options.seeds, config=config.as_dict(),
                  config_sources=config.source_of(), verdicts=rows,
                  summary=Summary.of(rows), duration_s=time.perf_counter() - started)


def _say(text: str) -> None:
    """One line on stderr that cannot end the run (a closed stderr loses only the line)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"routeaudit: {text}", file=sys.stderr, flush=True)


def render(config: Config, report: Report) -> None:
    """Hand the report to every reporter, one at a time. A reporter that raises becomes an
    ``error`` row of the report the later reporters render (user plugins run before the
    built-in terminal, JSON, JUnit and HTML reporters, so those show it)."""

    def add_row(failure: PluginFailure) -> None:
        report.verdicts.insert(0, failure.verdict())
        report.summary = Summary.of(report.verdicts)
        report.exit_code = int(exit_code_for(
            report.verdicts, inconclusive_fails=config.options.inconclusive == "fail"))

    HookCaller(config.pluginmanager, [], on_failure=add_row).call(
        "routeaudit_report", config=config, report=report)
