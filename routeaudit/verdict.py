"""Verdicts and the report: one serialisable model that every rendering comes from."""

from __future__ import annotations

import math
from enum import Enum, IntEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"
    SKIP = "skip"


class ExitCode(IntEnum):
    """Mirrors pytest's ExitCode."""

    OK = 0
    VERDICT_FAILED = 1
    INTERRUPTED = 2
    INTERNAL_ERROR = 3
    USAGE_ERROR = 4
    NO_AUDITS = 5


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Verdict(BaseModel):
    """One claim, (audit, cell), and what the evidence says about it."""

    model_config = ConfigDict(ser_json_inf_nan="null")

    audit: str
    claim: str
    cell: dict[str, Any] = Field(default_factory=dict)
    status: Status
    statistic: str | None = None
    effect: float | None = None
    ci: tuple[float, float] | None = None
    p_value: float | None = None
    p_value_corrected: float | None = None
    threshold: dict[str, Any] = Field(default_factory=dict)
    per_seed: list[dict[str, Any]] = Field(default_factory=list)
    evidence: dict[str, Any] = Field(default_factory=dict)
    """The pooled evidence behind the outcome (estimates, standard errors, one-sided
    p-values, how much more data would decide): docs/methods.md §5.2."""
    reason: str = ""
    target: str = ""
    traceback: str | None = None

    @field_validator("effect", "p_value", "p_value_corrected", mode="before")
    @classmethod
    def _nan_is_none(cls, value: Any) -> Any:
        return _finite_or_none(float(value)) if value is not None else None

    @property
    def cell_id(self) -> str:
        return "-".join(str(v) for v in self.cell.values())

    @property
    def nodeid(self) -> str:
        """pytest-style id: ``target::audit[cell]``."""
        cell = f"[{self.cell_id}]" if self.cell else ""
        return f"{self.target}::{self.audit}{cell}"


class Summary(BaseModel):
    passed: int = Field(0, alias="pass")
    fail: int = 0
    inconclusive: int = 0
    error: int = 0
    skip: int = 0

    model_config = ConfigDict(populate_by_name=True)

    @classmethod
    def of(cls, verdicts: list[Verdict]) -> Summary:
        counts = {status.value: 0 for status in Status}
        for verdict in verdicts:
            counts[verdict.status.value] += 1
        return cls(**counts)


class Report(BaseModel):
    """Everything a run decided; the JSON report is this model dumped."""

    model_config = ConfigDict(ser_json_inf_nan="null")

    routeaudit_version: str
    exit_code: int
    targets: list[str]
    seeds: list[int]
    config: dict[str, Any]
    config_sources: dict[str, str] = Field(default_factory=dict)
    """Where each value of ``config`` came from: ``default``, ``pyproject.toml`` or ``command line``."""
    verdicts: list[Verdict]
    summary: Summary
    duration_s: float = 0.0

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)


def exit_code_for(verdicts: list[Verdict], *, inconclusive_fails: bool = True) -> ExitCode:
    """0 when every claim survives; 1 when any claim fails, errors or (by default) is
    inconclusive; 5 when nothing was audited (no verdicts, or only ``skip`` rows)."""
    if all(v.status is Status.SKIP for v in verdicts):
        return ExitCode.NO_AUDITS
    failing = {Status.FAIL, Status.ERROR}
    if inconclusive_fails:
        failing.add(Status.INCONCLUSIVE)
    if any(v.status in failing for v in verdicts):
        return ExitCode.VERDICT_FAILED
    return ExitCode.OK
