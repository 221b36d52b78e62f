"""Calls into plugin code that can never end the run (like pytest's ``CallInfo``).

Every call into an audit (``cells``, ``run``) or a hook implementation goes through
:meth:`CallInfo.from_call`: an exception is captured with its traceback and becomes an
``error`` verdict in every report, and the battery goes on. Only ``KeyboardInterrupt`` and
the deliberate usage errors a caller names in ``reraise`` pass through.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy

from routeaudit.verdict import Status, Verdict

T = TypeVar("T")


@dataclass
class CallInfo(Generic[T]):
    """The outcome of one call: its result, or the exception it raised and the traceback."""

    when: str
    """What was called (``"cells"``, ``"run"``, ``"hook routeaudit_report"``, ...)."""
    result: T | None = None
    excinfo: BaseException | None = None
    traceback: str = ""

    @classmethod
    def from_call(cls, fn: Callable[[], T], when: str,
                  reraise: tuple[type[BaseException], ...] = ()) -> CallInfo[T]:
        """Call ``fn()``; any ``Exception`` not in ``reraise`` is captured, not raised."""
        try:
            return cls(when, result=fn())
        except reraise:
            raise
        except Exception as exc:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            return cls(when, excinfo=exc, traceback=text)

    @property
    def failed(self) -> bool:
        return self.excinfo is not None

    @property
    def message(self) -> str:
        exc = self.excinfo
        return "" if exc is None else f"{type(exc).__name__}: {exc}"


@dataclass
class PluginFailure:
    """A hook implementation (or a plugin's import) that raised outside any audit."""

    plugin: str
    hook: str
    call: CallInfo[Any]
    count: int = field(default=1)

    def verdict(self, target: str = "") -> Verdict:
        times = "" if self.count == 1 else f" ({self.count} times; the first is shown)"
        what = "import" if self.hook == "import" else f"hook {self.hook}"
        return Verdict(audit=self.plugin, claim=f"plugin {self.plugin!r} runs its {what} "
                       "without raising", cell={"hook": self.hook}, status=Status.ERROR,
                       reason=f"{what} raised {self.call.message}{times}", target=target,
                       traceback=self.call.traceback)


def error_verdicts(audit: Any, cells: list[dict[str, Any]], target: str,
                   call: CallInfo[Any]) -> list[Verdict]:
    """One ``error`` row per cell (one row when the cells are unknown) of an audit that raised."""
    name = str(getattr(audit, "name", type(audit).__name__))
    claim = str(getattr(audit, "claim", ""))
    return [Verdict(audit=name, claim=claim, cell=cell, status=Status.ERROR,
                    reason=f"{call.when} raised {call.message}", target=target,
                    traceback=call.traceback)
            for cell in cells or [{}]]


class HookCaller:
    """Calls hooks one implementation at a time, so that one that raises is recorded as a
    :class:`PluginFailure` and the others still run (pluggy itself stops at the first)."""

    def __init__(self, pm: pluggy.PluginManager, failures: list[PluginFailure],
                 reraise: tuple[type[BaseException], ...] = (),
                 on_failure: Callable[[PluginFailure], None] | None = None) -> None:
        self.pm = pm
        self.failures = failures
        self.reraise = reraise
        #: called with each new failure as it happens (before the next implementation runs)
        self.on_failure = on_failure

    def call(self, hook_name: str, *, firstresult: bool = False, **kwargs: Any) -> Any:
        """Like ``pm.hook.<hook_name>(**kwargs)``: a list of non-None results in pluggy's
        order (last registered first), or the first non-None result with ``firstresult``."""
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            # wrappers need pluggy's own call loop; the hook is then guarded as a whole
            info = CallInfo.from_call(lambda: caller(**kwargs), f"hook {hook_name}", self.reraise)
            if info.failed:
                self._record("(hook wrappers)", hook_name, info)
                return None if firstresult else []
            return info.result
        results = []
        for impl in reversed(impls):
            args = {name: kwargs[name] for name in impl.argnames}
            info = CallInfo.from_call(lambda impl=impl, args=args: impl.function(**args),
                                      f"hook {hook_name}", self.reraise)
            if info.failed:
                self._record(impl.plugin_name, hook_name, info)
                continue
            if info.result is not None:
                if firstresult:
                    return info.result
                results.append(info.result)
        return None if firstresult else results

    def _record(self, plugin: str, hook: str, info: CallInfo[Any]) -> None:
        for failure in self.failures:
            if failure.plugin == plugin and failure.hook == hook:
                failure.count += 1
                return
        self.failures.append(PluginFailure(plugin, hook, info))
        if self.on_failure is not None:
            self.on_failure(self.failures[-1])
