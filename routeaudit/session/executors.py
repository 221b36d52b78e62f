"""Executors on existing engines: ``--executor serial|process[:N]|ray[:ADDRESS]``.

A built-in plugin (``-p no:executors`` removes the option). The runner hands an executor
picklable :class:`~routeaudit.audit.WorkItem` s, one per (target × audit); in a worker,
:func:`run_work_item` rebuilds what the item needs (plugins, the target, the AuditContext as
the runner builds it) and returns its verdicts. Every random stream is keyed by (audit,
cell, seed) (``routeaudit.stats.rng``), so a worker's verdicts are those of the serial run;
what a run shares in one context (fitted controls, permutation tests, the gain audits that
``bandwidth_sensitivity`` re-runs) is recomputed in each worker, identically.

``serial`` (the default) keeps the in-process fast path. ``process[:N]`` is a
``concurrent.futures`` pool of N spawned processes (default: the CPU count), one BLAS/OpenMP
thread each. ``ray[:ADDRESS]`` (``pip install 'routeaudit[ray]'``) connects to a Ray cluster
at ADDRESS, or uses the running local instance, or starts one with 2 CPUs; each target's
traces go into Ray's object store once and the items become tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from routeaudit.audit import WorkItem
from routeaudit.errors import UsageError
from routeaudit.hookspecs import hookimpl
from routeaudit.verdict import Verdict

#: ``config.stash`` key of the session's executor (created once, closed at the end).
STASH_KEY = "routeaudit.executor"
#: Worker processes inherit this (numpy, torch and scipy read it at import).
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
#: CPUs of a local Ray instance this plugin starts.
RAY_LOCAL_CPUS = 2

Result = list[Verdict] | BaseException


# --------------------------------------------------------------------------- the option
def executor_spec(text: str) -> tuple[str, str | None]:
    """``serial``, ``process``, ``process:N``, ``ray`` or ``ray:ADDRESS`` → (kind, argument)."""
    kind, _, arg = str(text).strip().partition(":")
    if kind == "serial" and not arg:
        return "serial", None
    if kind == "process":
        if arg and (not arg.isdigit() or int(arg) < 1):
            raise argparse.ArgumentTypeError(f"process:N needs a positive number of workers, not {arg!r}")
        return "process", arg or None
    if kind == "ray":
        return "ray", arg or None
    raise argparse.ArgumentTypeError(f"expected serial, process[:N] or ray[:ADDRESS], not {text!r}")


def executor_option(text: str) -> str:
    """The option's type: checked, kept as text (so reports record it as given)."""
    executor_spec(text)
    return str(text).strip()


@hookimpl
def routeaudit_addoption(parser: Any) -> None:
    parser.getgroup("executors").add_argument(
        "--executor", type=executor_option, default="serial", metavar="serial|process[:N]|ray[:ADDRESS]",
        help="run the audits one after another here (serial, the default), in N local processes, "
             "or as Ray tasks (needs routeaudit[ray]); the verdicts are the same")


def _spec(config: Any) -> tuple[str, str | None]:
    return executor_spec(getattr(config.options, "executor", None) or "serial")


@hookimpl
def routeaudit_configure(config: Any) -> None:
    kind, _ = _spec(config)
    if kind == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError("--executor ray: Ray is not installed; pip install 'routeaudit[ray]' "
                         "(or pip install ray)")


@hookimpl
def routeaudit_make_executor(config: Any) -> Any:
    """The session's executor, made once and kept in ``config.stash`` (None: serial)."""
    kind, arg = _spec(config)
    if kind == "serial":
        return None
    if STASH_KEY not in config.stash:
        config.stash[STASH_KEY] = (ProcessExecutor(int(arg) if arg else None) if kind == "process"
                                   else RayExecutor(arg))
    return config.stash[STASH_KEY]


@hookimpl
def routeaudit_sessionfinish(config: Any) -> None:
    executor = config.stash.pop(STASH_KEY, None)
    if executor is not None:
        executor.close()


# --------------------------------------------------------------------------- the worker
#: The context a worker built last: items of one (run, target) reuse it.
_WORKER: dict[str, Any] = {}


def run_work_item(item: WorkItem) -> list[Verdict]:
    """Run one item in this process from its plain data, as the runner would: never raises
    for a plugin's fault (a start-up or an audit that raises is ``error`` rows)."""
    from routeaudit.session.calls import CallInfo, error_verdicts
    from routeaudit.session.runner import run_planned

    call = CallInfo.from_call(lambda: _context(item), "worker start-up")
    if call.failed:
        return error_verdicts(_named(item), list(item.cells), item.target, call)
    ctx, audits = call.result  # type: ignore[misc]
    audit = audits.get(item.audit)
    if audit is None:
        missing = CallInfo.from_call(lambda: _missing(item), "worker start-up")
        return error_verdicts(_named(item), list(item.cells), item.target, missing)
    return run_planned(ctx, audit, [dict(c) for c in item.cells], item.frozen)


def _named(item: WorkItem) -> Any:
    return argparse.Namespace(name=item.audit, claim=item.claim)


def _missing(item: WorkItem) -> None:
    raise LookupError(f"audit {item.audit!r} is not collected in the worker (a plugin that "
                      "registers audits differently outside the main process?)")


def _context(item: WorkItem) -> tuple[Any, dict[str, Any]]:
    key = f"{item.run_id}:{item.target}"
    if _WORKER.get("key") != key:
        _WORKER.clear()
        _WORKER["value"] = _build_context(item)
        _WORKER["key"] = key
    return _WORKER["value"]


def _build_context(item: WorkItem) -> tuple[Any, dict[str, Any]]:
    """The command line's start-up (plugins from ``-p``, the project file and entry points,
    the adapter files; ``routeaudit_configure``), with the run's options instead of parsing,
    then the target and its context exactly as ``run_audits`` builds them."""
    from routeaudit.session.calls import HookCaller
    from routeaudit.session.config import Config
    from routeaudit.session.plugins import load_plugins
    from routeaudit.session.runner import collect_audits, make_context, prepare_session
    from routeaudit.session.targets import Target, file_calibrator, load_target
    from routeaudit.summaries import default_registry

    if os.path.isdir(item.cwd):
        os.chdir(item.cwd)  # relative targets, plugins and the trace cache mean the same here
    options = argparse.Namespace(**item.options)
    failures: list[Any] = []  # the main process reports plugin failures once
    pm, modules = load_plugins(list(item.plugins), list(item.targets), load_entry_points=not getattr(
        options, "no_entry_points", False), failures=failures)
    config = Config(options=options, pluginmanager=pm, summaries=default_registry(),
                    failures=failures)
    HookCaller(pm, failures).call("routeaudit_configure", config=config)
    prepare_session(config)
    if item.traces is not None:
        calibrator = (file_calibrator(item.target, modules[item.target], config)
                      if item.target in modules else None)
        target = Target(item.target, list(item.traces), calibrator)
    else:
        quiet = options.quiet
        options.quiet = max(quiet, 2)  # no cache line or extraction bar from every worker
        try:
            target = load_target(item.target, config, modules)
        finally:
            options.quiet = quiet
    audits = collect_audits(config)
    ctx = make_context(config, target, audits)
    ctx.control_kinds = item.control_kinds
    return ctx, {audit.name: audit for audit in audits}


# --------------------------------------------------------------------------- process pool
@contextlib.contextmanager
def _one_thread_env() -> Iterator[None]:
    """ONE_THREAD in os.environ while workers are spawned (they copy it at start)."""
    saved = {name: os.environ.get(name) for name in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _init_worker() -> None:
    os.environ.update(ONE_THREAD)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


class _Unordered:
    """An executor whose work comes back as it finishes (``map_unordered``); ``map`` puts it
    back in plan order."""

    def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[WorkItem]
                      ) -> Iterator[tuple[int, Result]]:
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], items: Iterable[WorkItem]) -> Iterator[Result]:
        done = dict(self.map_unordered(fn, items))
        return iter(done[i] for i in sorted(done))


class ProcessExecutor(_Unordered):
    """A pool of spawned processes (``--executor process[:N]``), made on first use."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.pool: Any = None

    def _pool(self) -> Any:
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker)
        return self.pool

    def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[WorkItem]
                      ) -> Iterator[tuple[int, Result]]:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        pool = self._pool()
        with _one_thread_env():
            futures = {pool.submit(run_work_item, item): item.index for item in items}
        for future in as_completed(futures):
            outcome = _outcome(future.result)
            if isinstance(outcome, BrokenProcessPool):  # a worker died: a fresh pool next time
                self.close()
            yield futures[future], outcome

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _outcome(get: Callable[[], Any]) -> Result:
    """A finished item's verdicts, or the exception it ended with (a worker that died)."""
    try:
        return list(get())
    except Exception as exc:
        return exc


# --------------------------------------------------------------------------- Ray
def _ray_run(item: WorkItem, traces: Any) -> list[Verdict]:
    """A Ray task: the item with its traces from the object store."""
    os.environ.update(ONE_THREAD)
    return run_work_item(dataclasses.replace(item, traces=traces))


class RayExecutor(_Unordered):
    """Items as Ray tasks (``--executor ray[:ADDRESS]``); traces go to the object store once
    per target. Connects to ADDRESS, else uses Ray if this process already started it, else
    starts a local instance with :data:`RAY_LOCAL_CPUS` CPUs (shut down at the end)."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self.started = False
        self.remote: Any = None
        self.stored: dict[int, tuple[Any, Any]] = {}  # id(traces) -> (traces, ObjectRef)

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError as exc:
            raise UsageError("--executor ray: Ray is not installed; pip install "
                             "'routeaudit[ray]'") from exc
        if not ray.is_initialized():
            env = {"env_vars": dict(ONE_THREAD)}
            if self.address:
                ray.init(address=self.address, runtime_env=env, log_to_driver=False)
            else:
                ray.init(num_cpus=RAY_LOCAL_CPUS, include_dashboard=False, runtime_env=env,
                         log_to_driver=False)
            self.started = True
        if self.remote is None:
            self.remote = ray.remote(num_cpus=1)(_ray_run)
        return ray

    def _traces_ref(self, ray: Any, traces: Any) -> Any:
        if traces is None:
            return None
        if id(traces) not in self.stored:  # the item keeps the traces alive meanwhile
            self.stored[id(traces)] = (traces, ray.put(traces))
        return self.stored[id(traces)][1]

    def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[WorkItem]
                      ) -> Iterator[tuple[int, Result]]:
        ray = self._ray()
        pending = {}
        for item in items:
            ref = self._traces_ref(ray, item.traces)
            task = self.remote.remote(dataclasses.replace(item, traces=None), ref)
            pending[task] = item.index
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for task in done:
                yield pending.pop(task), _outcome(lambda task=task: ray.get(task))

    def close(self) -> None:
        self.stored.clear()
        if self.started:
            import ray

            ray.shutdown()
            self.started = False
