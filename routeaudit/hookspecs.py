"""Every hook routeaudit calls, documented where it is declared: the plugin author's manual.

A plugin is any module or object with functions decorated ``@routeaudit.hookimpl`` whose
names match the specs below. Plugins come, in this order, from the built-in modules, the
``-p MODULE`` options, the ``routeaudit`` entry-point group of installed packages, and the
user's own adapter file. ``-p no:NAME`` blocks a plugin by name. A function whose name starts
with ``routeaudit_`` but matches no spec fails at start-up, so a misspelled hook is never
silently ignored.

Hook implementations are called one at a time: one that raises becomes an ``error`` row (its
traceback in every report), the other implementations and the rest of the run go on, and
the exit code is 1. Only a deliberate ``routeaudit.RouteAuditError`` (e.g. a
``TraceValidationError`` from ``routeaudit_traces_ready``) ends the run, as a usage error.

Call order in one session::

    routeaudit_addoption            (historic)  add command-line options
    routeaudit_configure            (historic)  read options, set up state
    routeaudit_register_summaries               add routing summaries
    routeaudit_register_calibrators             add calibrator factories
    routeaudit_traces_ready                     observe each TraceSet once it is loaded
    routeaudit_collect_audits                   contribute Audit objects
    routeaudit_make_executor        (first)     decide how audits are executed
    routeaudit_verdict                          observe each verdict as it is decided
    routeaudit_report                           render the finished report
    routeaudit_sessionfinish                    clean up; sees the exit status

``routeaudit validate`` calls the same hooks up to ``routeaudit_collect_audits``, then
``routeaudit_planted_cases`` (first) once per selected audit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    from routeaudit.audit import Audit, Executor, PlantedCases
    from routeaudit.session.config import Config
    from routeaudit.summaries import SummaryRegistry
    from routeaudit.traces import TraceSet
    from routeaudit.verdict import Report, Verdict

PROJECT = "routeaudit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(historic=True)
def routeaudit_addoption(parser: argparse.ArgumentParser) -> None:
    """Add command-line options to ``routeaudit run``.

    Called once per plugin, before the command line is parsed. Use
    ``parser.getgroup("my-plugin").add_argument(...)`` (pytest's spelling; one help section
    per group) and prefix options with the plugin's name. Give every option its real default
    (not None), so that the report records it; audits read their options with
    ``ctx.option(name, default)``, which honours 0. Plugins from the user's adapter file are
    registered before parsing too, so they may add options as well. Blocking a plugin
    (``-p no:NAME``) removes its options.
    """


@hookspec(historic=True)
def routeaudit_configure(config: Config) -> None:
    """Called after the command line is parsed, with the session's Config.

    Read ``config.options`` (an argparse Namespace) here and keep what you need.
    """


@hookspec
def routeaudit_register_summaries(registry: SummaryRegistry) -> None:
    """Register extra routing summaries: ``registry.register(name, fn, description)``.

    ``fn(traces) -> ndarray`` returns one value per example (``shape="scalar"``) or one
    vector per example (``shape="profile"``). Scalar routing summaries become default cells
    of the matched-confidence audits.
    """


@hookspec
def routeaudit_register_calibrators(registry: dict[str, Any]) -> None:
    """Register calibrator factories by name: ``registry[name] = factory``.

    A factory is a zero-argument callable returning a fresh, unfitted calibrator. Named
    factories can be selected with ``--calibrator NAME``.
    """


@hookspec
def routeaudit_traces_ready(config: Config, traces: TraceSet) -> None:
    """Observe a TraceSet once it is loaded or extracted and validated.

    Raise ``routeaudit.TraceValidationError`` to reject traces that break a plugin's own
    contract (the run then exits 4).
    """


@hookspec
def routeaudit_collect_audits(config: Config) -> list[Audit] | None:
    """Return the Audit objects this plugin contributes (or None).

    An audit has ``name``, ``claim`` (one sentence), ``needs`` (a set drawn from
    ``{"traces", "calibrator", "model"}``), ``cells(ctx)`` (the claims it can test, each a
    dict) and ``run(ctx, cells) -> list[Verdict]``, plus optional members with defaults
    (``min_examples``, ``routing_aware``, ``control_kinds``, ``reruns``): every member the
    runner reads is declared, with its docstring, on :class:`routeaudit.Audit`; subclass
    :class:`routeaudit.BaseAudit` for the defaults. Names must be unique. An audit whose
    needs a target does not meet gets a ``skip`` row with the reason.
    """


@hookspec(firstresult=True)
def routeaudit_make_executor(config: Config) -> Executor | None:
    """Return the executor that runs a target's audits (an object with ``map(fn, items)``).

    ``items`` are :class:`routeaudit.audit.WorkItem` s, one per (target × audit): plain,
    picklable data (target, audit name, cells, the run's options, plugin specs, the traces
    when no loader is needed), never a closure over a loaded model. ``map`` returns one
    result per item, in order: its verdicts, or the exception that stopped it (``error``
    rows). ``fn(item)`` runs an item in this process with the run's live context (the fast
    path); to run it elsewhere, call ``routeaudit.session.executors.run_work_item(item)``
    there: it rebuilds plugins, target and context and gives the same verdicts. An optional
    ``map_unordered(fn, items)`` yielding ``(index, result)`` as items finish lets the
    progress bar advance as results come back. The first non-None result wins; without
    one (or with ``--executor serial``) audits run one after another in this process.
    """


@hookspec
def routeaudit_verdict(config: Config, verdict: Verdict) -> None:
    """Observe each verdict as soon as it is decided (e.g. for live progress)."""


@hookspec
def routeaudit_report(config: Config, report: Report) -> None:
    """Render or store the finished report (terminal, JSON, JUnit XML and HTML are plugins)."""


@hookspec
def routeaudit_sessionfinish(config: Config, exitstatus: int) -> None:
    """Called once at the very end, with the exit status the process will return."""


@hookspec(firstresult=True)
def routeaudit_planted_cases(audit: Audit, config: Config) -> PlantedCases | str | None:
    """Planted cases of ``audit`` for ``routeaudit validate``: a
    :class:`routeaudit.PlantedCases` (a generator of traces with a planted effect of a given
    size, 0 being the audit's null), or a string saying why this audit cannot be simulated,
    or None when the plugin does not know the audit. The first non-None answer wins.
    """
