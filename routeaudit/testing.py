"""Run the battery in-process and get the Report back: what the pytest plugin builds on.

``routeaudit.cli.main`` ends in an exit code and prints; a test runner needs the verdicts
themselves, and needs to tell a usage error (bad options: the whole run is wrong) from a
bad target (one file is wrong). This module does the ``run`` path of the CLI with the same
parser, plugin manager and session, and raises instead of printing.

For audit authors, :class:`AuditTester` / :func:`run_audit` run ONE audit (an audit
object, or a plugin providing it) on given traces and options and return its verdicts,
with assertions (:class:`VerdictAssertions`), like pytest's ``pytester``;
:func:`synthetic_traces` draws traces whose calibration truth is known.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from routeaudit.cli import Startup, build_parser, finish, split_plugin_args, start
from routeaudit.errors import UsageError
from routeaudit.hookspecs import PROJECT, hookimpl
from routeaudit.traces import TraceSet
from routeaudit.verdict import Report, Status, Verdict


def parse_run_args(args: list[str]) -> tuple[Any, list[str]]:
    """Check ``routeaudit run`` arguments without running anything; argparse's complaint
    (which it would print and exit on) becomes a UsageError with its text. Returns the
    options and the arguments left for plugins' options."""
    _, rest = split_plugin_args(list(args))
    parser = build_parser(early=True)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            options, unknown = parser.parse_known_args(["run", *rest])
    except SystemExit as exc:
        raise UsageError(_argparse_text(err.getvalue()) or "invalid routeaudit arguments") from exc
    return options, unknown


def _argparse_text(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].split("error:", 1)[-1].strip() if lines else ""


def run_report(args: list[str], *, quiet: bool = True) -> Report:
    """``routeaudit run ARGS`` in this process: the Report, or the RouteAuditError
    (UsageError, AdapterError, TraceValidationError, TraceFileError) that stopped it.

    The same start-up as the command line (``routeaudit.cli.start``); ``quiet`` adds ``-qq``
    so the terminal reporter stays silent (the caller reports).
    """
    from routeaudit.session.runner import run_session

    plugin_args, rest = split_plugin_args(list(args))
    argv = ["run", *rest, *(["-qqq"] if quiet else [])]
    parse_run_args(argv[1:])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            started = start(plugin_args, argv)
    except SystemExit as exc:
        raise UsageError(_argparse_text(err.getvalue()) or "invalid routeaudit arguments") from exc
    started.caller.call("routeaudit_configure", config=started.config)
    report = run_session(started.config, started.options.targets, started.modules)
    finish(started.config, report.exit_code)
    return report


# --------------------------------------------------------------------------- audit authors
#
# pytest's ``pytester`` for audit plugins: run ONE audit on given traces with given options
# and get its verdicts back, through the same start-up (``routeaudit.cli.start``: plugins,
# options, Config) and the same run loop (``routeaudit.session.runner.run_audits``) as
# ``routeaudit run``; only the reporters are not called, so nothing is printed or written.

#: Traces an :class:`AuditTester` runs on: one TraceSet, trained replicates (a list of
#: them), or a path that ``routeaudit run`` accepts (``.npz``, trace directory, adapter).
TracesLike = TraceSet | Sequence[TraceSet] | str | os.PathLike


class VerdictAssertions:
    """Assertions over ``self.verdicts``, shared by every result of a run in a test.

    ``audit`` narrows to one audit (optional when a run has one); cell keys narrow to the
    verdicts whose cell has every given key = value (compared as text)."""

    @property
    def verdicts(self) -> list[Verdict]:
        raise NotImplementedError

    def select(self, audit: str | None = None, /, **cell: Any) -> list[Verdict]:
        """The matching verdicts (possibly none)."""
        return [v for v in self.verdicts if (audit is None or v.audit == audit)
                and all(str(v.cell.get(k)) == str(val) for k, val in cell.items())]

    def status_of(self, audit: str | None = None, /, **cell: Any) -> Status:
        """The status of the one matching verdict (AssertionError unless exactly one)."""
        found = self._one_or_more(audit, cell)
        if len(found) != 1:
            ids = ", ".join(v.nodeid for v in found)
            raise AssertionError(f"{len(found)} verdicts match {_what(audit, cell)}: {ids}; "
                                 "give more of the cell")
        return found[0].status

    def assert_passes(self, audit: str | None = None, /, **cell: Any) -> None:
        """Every matching verdict passes; else list the others with their reasons."""
        self._assert(audit, cell, Status.PASS)

    def assert_fails(self, audit: str | None = None, /, **cell: Any) -> None:
        """Every matching verdict fails (the data refute the claim)."""
        self._assert(audit, cell, Status.FAIL)

    def assert_inconclusive(self, audit: str | None = None, /, **cell: Any) -> None:
        """Every matching verdict is inconclusive (neither shown nor refuted)."""
        self._assert(audit, cell, Status.INCONCLUSIVE)

    def _one_or_more(self, audit: str | None, cell: dict[str, Any]) -> list[Verdict]:
        found = self.select(audit, **cell)
        if not found:
            ids = [v.nodeid for v in self.verdicts]
            known = (f"verdicts: {', '.join(ids)}" if len(ids) <= 10 else
                     f"audits: {', '.join(sorted({v.audit for v in self.verdicts}))}")
            raise AssertionError(f"no verdict of {_what(audit, cell)} ({known or 'none'})")
        return found

    def _assert(self, audit: str | None, cell: dict[str, Any], status: Status) -> None:
        bad = [v for v in self._one_or_more(audit, cell) if v.status is not status]
        if bad:
            lines = "\n".join(_describe(v) for v in bad)
            raise AssertionError(f"expected {_what(audit, cell)} to {status.value}; "
                                 f"{len(bad)} did not:\n{lines}")


def _what(audit: str | None, cell: dict[str, Any]) -> str:
    return " ".join(part for part in (audit or "any audit", str(cell) if cell else "") if part)


def _describe(v: Verdict) -> str:
    text = f"  {v.nodeid}: {v.status.value}: {v.reason}"
    if v.status is Status.ERROR and v.traceback:  # an audit that raised: show where
        text += "\n" + "\n".join("    " + line for line in v.traceback.rstrip().splitlines()[-8:])
    return text


class AuditVerdicts(list[Verdict], VerdictAssertions):
    """The verdicts of one :meth:`AuditTester.run`: a plain list of Verdict (plugin failures
    first, as in a report), with the assertions of :class:`VerdictAssertions`, the
    :class:`~routeaudit.verdict.Report` the command line would have rendered, and what the
    run printed (captured, never shown)."""

    def __init__(self, report: Report, output: str = "") -> None:
        super().__init__(report.verdicts)
        self.report = report
        self.output = output

    @property
    def verdicts(self) -> list[Verdict]:
        return list(self)


class AuditTester:
    """Run one audit in a test, as ``routeaudit run`` would, and get its verdicts.

    ``plugin`` is an audit object (it runs with the other hooks of its own module: options,
    summaries, calibrators; only this instance is collected), a plugin module or object
    whose hooks provide audits, or a ``-p`` value (module name or ``.py`` file). ``args``
    are ``routeaudit run`` options used by every :meth:`run` (``"--seeds", "0"``, the
    plugin's own options). ``audit`` names the audit to run; without it the plugin must
    provide exactly one. Entry-point plugins are left out unless ``entry_points=True``, so
    a test does not depend on what else is installed; the built-ins are registered as in
    any run (their audits are not run).

    Usage errors (a bad option, an unknown summary) raise :class:`~routeaudit.UsageError`;
    bad traces raise as ``routeaudit run`` would; an audit that raises is an ``error`` row,
    and so is a plugin that fails to import or a hook that raises (first, as in a report).
    With ``entry_points=True``, pass an installed plugin's module rather than one of its
    audit objects (its hooks would be registered twice).
    """

    def __init__(self, plugin: Any, *args: Any, audit: str | None = None,
                 entry_points: bool = False) -> None:
        self.plugin = plugin
        self.args = [str(a) for a in args]
        self.audit = audit if audit is not None else _audit_name(plugin)
        self.entry_points = entry_points

    def run(self, traces: TracesLike, *args: Any, name: str | None = None) -> AuditVerdicts:
        """Verdicts of the audit on ``traces``, with ``args`` added to the tester's options.
        Node ids are ``TARGET::audit[cell]``: TARGET is the path, or ``name`` (default
        ``"traces"``) for in-memory TraceSets."""
        began = time.perf_counter()
        label, sets = _target(traces, name)
        out = io.StringIO()
        with _as_plugin(self.plugin) as (plugin_arg, plugin_obj), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            extra_plugins, rest = split_plugin_args([*self.args, *(str(a) for a in args)])
            run_args = [label, *rest, "-qq", *(("--audit", self.audit) if self.audit else ())]
            started = _start([plugin_arg, *extra_plugins], run_args, out,
                             entry_points=self.entry_points)
            config = started.config
            started.caller.call("routeaudit_configure", config=config)
            if not self.audit:
                found = _own_audits(config, plugin_obj, plugin_arg)
                if found is None:  # the plugin failed to import: its error rows are the result
                    return AuditVerdicts(_report(config, label, [], began), out.getvalue())
                config.options.audit = [found]
            verdicts = _run_one_target(config, label, sets, started.modules)
            report = _report(config, label, verdicts, began)
            finish(config, report.exit_code)
        return AuditVerdicts(report, out.getvalue())


def run_audit(plugin: Any, traces: TracesLike, *args: Any, audit: str | None = None,
              entry_points: bool = False, name: str | None = None) -> AuditVerdicts:
    """``AuditTester(plugin, audit=audit).run(traces, *args)``: the verdicts of one audit,
    e.g. ``run_audit(my_plugin, traces, "--seeds", "0", audit="multicalibration")``."""
    return AuditTester(plugin, audit=audit, entry_points=entry_points).run(traces, *args, name=name)


def synthetic_traces(n: int = 4000, *, seed: int = 0, effect: float = 0.0,
                     miscalibration: float = 1.0, shape: str = "logit_linear",
                     n_layers: int = 4, n_classes: int = 10) -> TraceSet:
    """Depth-routing traces whose calibration truth is known, for audits' tests.

    Routing sharpness tracks confidence (every routing summary is confounded with it) and a
    latent u. With ``effect = 0`` and ``miscalibration = 1``, P(correct | c, routing) = c:
    calibrated on every routing-defined group. ``effect > 0`` moves P(correct) at fixed
    confidence by ``effect · (u − ½)``: routing-conditional miscalibration;
    ``miscalibration > 1`` makes the model over-confident everywhere (P = c ** m). A thin
    front for :func:`routeaudit.simulation.cases.generate`; MoE traces with known expert
    calibration come from :func:`routeaudit.simulation.experts.generate_moe`.
    """
    from routeaudit.simulation.cases import generate

    return generate(shape, n, effect=effect, seed=seed, miscalibration=miscalibration,
                    n_layers=n_layers, n_classes=n_classes)


# --------------------------------------------------------------------------- internals


def _audit_name(plugin: Any) -> str | None:
    """The name of an audit object (None for a plugin: found from its hooks at run time)."""
    if _is_audit(plugin):
        return str(plugin.name)
    return None


def _is_audit(obj: Any) -> bool:
    from routeaudit.session.runner import REQUIRED_MEMBERS

    return not isinstance(obj, (str, os.PathLike, ModuleType, type)) and \
        all(hasattr(obj, m) for m in REQUIRED_MEMBERS)


def _is_hookimpl(value: Any) -> bool:
    return callable(value) and getattr(value, f"{PROJECT}_impl", None) is not None


def _plugin_for_audit(audit: Any) -> ModuleType:
    """A plugin collecting only ``audit``, with every other hook of the audit's own module
    (its options, summaries, calibrators), so the audit runs as its plugin would run it."""
    plugin = ModuleType(f"audit:{audit.name}")
    home = sys.modules.get(type(audit).__module__)
    for attr in dir(home) if home is not None else ():
        value = getattr(home, attr)
        if attr.startswith("routeaudit_") and attr != "routeaudit_collect_audits" and \
                _is_hookimpl(value):
            setattr(plugin, attr, value)

    @hookimpl
    def routeaudit_collect_audits(config: Any) -> list[Any]:
        return [audit]

    plugin.routeaudit_collect_audits = routeaudit_collect_audits  # type: ignore[attr-defined]
    return plugin


@contextlib.contextmanager
def _as_plugin(plugin: Any) -> Iterator[tuple[str, Any]]:
    """The ``-p`` value that registers ``plugin`` in ``start`` (which loads plugins by
    name), and the object it registers (None when given a name or file). An object that
    is not an importable module is importable under a private name meanwhile."""
    if isinstance(plugin, (str, os.PathLike)):
        yield os.fspath(plugin), None
        return
    if isinstance(plugin, type):
        raise TypeError(f"{plugin.__name__} is a class: pass an instance (an audit or a "
                        "plugin object)")
    if _is_audit(plugin):
        plugin = _plugin_for_audit(plugin)
    name = getattr(plugin, "__name__", None)
    if isinstance(plugin, ModuleType) and name and sys.modules.get(name) is plugin:
        yield name, plugin
        return
    alias = name if isinstance(plugin, ModuleType) and name and name not in sys.modules \
        else f"plugin:{type(plugin).__name__}:{id(plugin)}"
    sys.modules[alias] = plugin  # type: ignore[assignment]
    try:
        yield alias, plugin
    finally:
        sys.modules.pop(alias, None)


def _start(plugin_args: list[str], run_args: list[str], err: io.StringIO, *,
           entry_points: bool) -> Startup:
    """``routeaudit.cli.start`` of ``routeaudit run RUN_ARGS`` with argparse's complaint
    as a UsageError (as run_report)."""
    before = err.tell()
    parse_run_args(run_args)
    argv = [*(() if entry_points else ("--no-entry-points",)), "run", *run_args]
    try:
        return start(plugin_args, argv)
    except SystemExit as exc:
        text = err.getvalue()[before:]
        raise UsageError(_argparse_text(text) or "invalid routeaudit arguments") from exc


def _own_audits(config: Any, plugin_obj: Any, plugin_arg: str) -> str | None:
    """The one audit the plugin contributes (its ``routeaudit_collect_audits`` alone), or
    None when the plugin could not be imported (its error row is in ``config.failures``)."""
    from routeaudit.session.plugins import plugin_name

    pm = config.pluginmanager
    own = plugin_obj if plugin_obj is not None else pm.get_plugin(plugin_name(plugin_arg))
    if own is None or not pm.is_registered(own):
        if config.failures:
            return None
        raise UsageError(f"plugin {plugin_arg!r} is not registered (blocked with -p no:?)")
    others = [p for p in pm.get_plugins() if p is not own]
    caller = pm.subset_hook_caller("routeaudit_collect_audits", remove_plugins=others)
    names = [str(getattr(a, "name", a)) for batch in caller(config=config) for a in batch or []]
    if len(names) != 1:
        which = ", ".join(names) if names else "none"
        raise UsageError(f"plugin {plugin_arg!r} provides {len(names)} audits ({which}); "
                         "name the one to run with audit=NAME")
    return names[0]


def _target(traces: TracesLike, name: str | None) -> tuple[str, list[TraceSet] | None]:
    """(the target's name, its TraceSets) for in-memory traces; (the path, None) for a path
    that ``load_target`` reads as ``routeaudit run`` does."""
    if isinstance(traces, (str, os.PathLike)):
        return os.fspath(traces), None
    sets = [traces] if isinstance(traces, TraceSet) else list(traces)
    if not sets or not all(isinstance(t, TraceSet) for t in sets):
        raise TypeError("traces must be a TraceSet, a list of TraceSets (replicates) or a path")
    label = name or "traces"
    if label.endswith(".py") or label.startswith("-"):
        raise ValueError(f"name {label!r} would be read as an adapter file or an option")
    return label, sets


def _run_one_target(config: Any, label: str, sets: list[TraceSet] | None,
                    modules: dict[str, Any]) -> list[Verdict]:
    """``run_session`` up to the report, for one target (in-memory traces allowed): the
    same ``load_targets`` and ``audit_targets``."""
    from routeaudit.session.runner import audit_targets, load_targets
    from routeaudit.session.targets import Target

    given: str | Target = label if sets is None else Target(label, sets)
    return audit_targets(config, load_targets(config, [given], modules))


def _report(config: Any, label: str, verdicts: list[Verdict], began: float) -> Report:
    """The report ``routeaudit run`` would render (plugin failures first), not rendered."""
    from routeaudit.session.runner import build_report

    return build_report(config, [label], verdicts, began)
