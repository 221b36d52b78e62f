"""pytest integration: ``pytest --routeaudit TARGET`` and the ``routeaudit`` fixture.

Each verdict becomes one pytest item whose node id is routeaudit's own
(``target::audit[cell]``), so ``-k``, ``-x``, ``--junitxml`` and CI integrations work as for
any test. The battery runs once per target, at collection, in-process; items only replay
the verdicts. Enable with ``-p routeaudit.plugins.pytest_plugin`` (or the ``pytest11``
entry point).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import routeaudit
from routeaudit.testing import VerdictAssertions, parse_run_args, run_report

#: Errors that concern one target (its file or traces), not the whole command line.
TARGET_ERRORS = (routeaudit.AdapterError, routeaudit.TraceValidationError, routeaudit.TraceFileError)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("routeaudit", "routeaudit: audit routing-aware calibration claims")
    group.addoption("--routeaudit", action="append", default=[], metavar="TARGET",
                    help="audit TARGET (adapter .py, trace directory or .npz); one item per "
                         "verdict, node id TARGET::audit[cell] (repeatable)")
    group.addoption("--routeaudit-args", default="", metavar="ARGS",
                    help="routeaudit run options, shell-quoted, e.g. "
                         "--routeaudit-args='--seeds 0 --bootstrap 200'")
    group.addoption("--routeaudit-inconclusive", choices=["xfail", "fail"], default="xfail",
                    help="report an inconclusive verdict as xfail (default) or as a failure")


def _extra_args(config: pytest.Config) -> list[str]:
    return shlex.split(config.getoption("routeaudit_args") or "")


def pytest_configure(config: pytest.Config) -> None:
    """Check --routeaudit-args up front: a bad option is a usage error of the run."""
    if config.getoption("routeaudit"):
        try:
            # core options only; options that audit plugins add are checked by run_report
            parse_run_args(["__target__", *_extra_args(config)])
        except routeaudit.UsageError as exc:
            raise pytest.UsageError(f"--routeaudit-args: {exc}") from exc


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """Add the verdict items before pytest's own -k / -m deselection runs. The battery runs
    here, once per target: a usage error stops the session (pytest.UsageError, exit 4); a bad
    target becomes that target's collection error."""
    for target in config.getoption("routeaudit"):
        node = RouteAuditTarget.from_parent(session, path=Path(target).resolve(), nodeid=target)
        node.target = target
        node.outcome = _audit(target, _extra_args(config))
        items.extend(session.genitems(node))


def _audit(target: str, extra: list[str]) -> routeaudit.Report | str:
    """The report of one target, or the text of why the target is unusable."""
    if not Path(target).exists():
        return f"{target}: no such file or directory"
    args = [target, *extra]
    try:
        return run_report(args)
    except TARGET_ERRORS as exc:  # most already name the file; say it once
        return str(exc) if Path(target).name in str(exc) else f"{target}: {exc}"
    except routeaudit.RouteAuditError as exc:
        raise pytest.UsageError(f"routeaudit run {shlex.join(args)}: {exc}") from exc


class RouteAuditTarget(pytest.File):
    """One audited target; its children replay the verdicts of the run made for it."""

    target: str = ""
    outcome: routeaudit.Report | str = ""

    def collect(self) -> Iterator[VerdictItem]:
        if isinstance(self.outcome, str):
            raise self.CollectError(self.outcome)
        prefix = f"{self.target}::"
        for verdict in self.outcome.verdicts:
            nodeid = verdict.nodeid
            name = nodeid[len(prefix):] if nodeid.startswith(prefix) else nodeid.lstrip(":")
            yield VerdictItem.from_parent(self, name=name, verdict=verdict)


class VerdictFailed(Exception):
    """A fail / error verdict (or an inconclusive one under --routeaudit-inconclusive fail)."""


class VerdictItem(pytest.Item):
    """One verdict replayed as a test outcome."""

    def __init__(self, *, verdict: routeaudit.Verdict, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.verdict = verdict
        self.user_properties.append(("status", verdict.status.value))

    def runtest(self) -> None:
        v = self.verdict
        status = routeaudit.Status
        if v.status is status.PASS:
            return
        if v.status is status.SKIP:
            pytest.skip(v.reason or "skipped")
        if v.status is status.INCONCLUSIVE and \
                self.config.getoption("routeaudit_inconclusive") == "xfail":
            pytest.xfail(f"inconclusive: {v.reason}")
        raise VerdictFailed(f"{v.status.value}: {v.reason}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str | Any:
        if isinstance(excinfo.value, VerdictFailed):
            text = f"{self.verdict.claim}\n{excinfo.value}"
            if self.verdict.traceback:
                text += f"\n{self.verdict.traceback}"
            return text
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.nodeid


@dataclass
class AuditResult(VerdictAssertions):
    """What one ``routeaudit.run`` decided, with the assertions of
    :class:`routeaudit.testing.VerdictAssertions` for hand-written tests."""

    report: routeaudit.Report

    @property
    def verdicts(self) -> list[routeaudit.Verdict]:
        return self.report.verdicts

    @property
    def exit_code(self) -> int:
        return self.report.exit_code


class RouteAuditRunner:
    """The ``routeaudit`` fixture: ``routeaudit.run(target, *options)`` -> AuditResult."""

    def run(self, target: str | Path, *args: str) -> AuditResult:
        return AuditResult(run_report([str(target), *args]))


@pytest.fixture(name="routeaudit")
def routeaudit_fixture() -> RouteAuditRunner:
    """Run routeaudit in a test: ``routeaudit.run("adapter.py", "--seeds", "0")``."""
    return RouteAuditRunner()
