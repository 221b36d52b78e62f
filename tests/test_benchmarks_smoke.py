"""benchmarks/speed.py must keep running: every section at its smallest size, in a few seconds.

The timings themselves mean nothing at this size; what is checked is that each section runs
end to end, times every row, and that its baselines compute what they claim to compute.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import speed

# routeaudit/calibrators/kernel.py: "Measured against exact on realistic data: max |Δp| <= 5e-4,
# mean <= 5e-5" for the binned (fast) method.
NW_MAX_ABS_ERROR = 5e-4
NW_MEAN_ABS_ERROR = 5e-5


@pytest.fixture(scope="module")
def sections() -> dict[str, speed.Section]:
    return {name: run("smoke") for name, run in speed.SECTIONS.items()}


def test_every_section_runs_and_times_every_row(sections):
    assert set(sections) == {"permutation", "ece", "nw", "mlp", "bootstrap"}
    for sec in sections.values():
        assert sec.tables and (sec.targets or sec.name == "bootstrap"), sec.name  # no target set
        for timing in sec.timings():
            assert math.isfinite(timing.median) and timing.median > 0.0, sec.name
        for table in sec.tables:
            assert table.ratio(table.ref) == pytest.approx(1.0)
        speed.print_section(sec)  # the report itself must not fail either


def test_permutation_loop_baseline_computes_the_engines_statistic(sections):
    assert sections["permutation"].facts["max_wg_diff_loop"] < 1e-12


def test_bootstrap_loop_baseline_reproduces_the_replicates(sections):
    assert sections["bootstrap"].facts["max_replicate_diff_loop"] < 1e-12


def test_nw_fast_path_error_within_the_bound_stated_in_kernel_py(sections):
    facts = sections["nw"].facts
    errors = [v for k, v in facts.items() if k.startswith("max_abs_dp_")]
    assert errors
    assert max(errors) < NW_MAX_ABS_ERROR
    assert max(v for k, v in facts.items() if k.startswith("mean_abs_dp_")) < NW_MEAN_ABS_ERROR


def test_ece_agrees_with_libraries(sections):
    sec = sections["ece"]
    assert 0.0 < sec.facts["ece_value"] < 1.0
    libs = next(t for t in sec.tables if t.ref == "routeaudit ece")
    assert len(libs.rows) >= 2  # at least one library installed in the dev environment
    assert sec.facts["max_lib_diff"] < 1e-6  # torchmetrics accumulates in float32


def test_cli_parses_only_and_quick():
    with pytest.raises(SystemExit):
        speed.main(["--only", "no-such-section"])
