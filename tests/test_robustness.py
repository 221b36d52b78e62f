"""A fast subset of benchmarks/robustness.py: generated bad input never crashes routeaudit.

Each generated case (corrupted arrays, meta, files, trace directories, targets) goes through
``routeaudit run``: exit 0, 1, 4 or 5, never 3; no traceback; an exit-4 message names the
file or field."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from benchmarks.robustness import CASES, check_case


@settings(max_examples=250, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(CASES)
def test_generated_bad_input_never_crashes(case):
    outcome = check_case(case)
    assert not outcome.crashed, f"{outcome.kind} case ended with exit {outcome.code}:\n{outcome.stderr}"
    assert not outcome.unnamed, f"exit-4 message names no file or field:\n{outcome.stderr}"
