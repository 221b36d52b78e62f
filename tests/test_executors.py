"""--executor process / ray: the same verdicts as the serial run, failures as error rows.

Every verdict is compared field by field (``model_dump``) with the serial run of the same
command line: a worker rebuilds the plugins, the target and the context from a picklable
work item, and must not change a number. Ray runs on one local instance with 2 CPUs for
the whole module (its start-up is slow); its tests skip when Ray is not installed.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import textwrap
from pathlib import Path

import pytest

from routeaudit.errors import UsageError
from routeaudit.session import executors
from routeaudit.testing import run_report
from routeaudit.verdict import Status

ROOT = Path(__file__).resolve().parents[1]
PLANTED = str(ROOT / "fixtures" / "planted.npz")
ADAPTER = str(ROOT / "fixtures" / "calibrator_genuine.py")
FAST = ["--seeds", "0,1", "--permutations", "99", "--bootstrap", "100"]
#: Two gain audits that share one fitted study in the serial run; each worker refits it.
GAIN = ["--audit", "capacity_control", "--audit", "baseline_gain"]


def dumps(report):
    return [v.model_dump(mode="json") for v in report.verdicts]


@pytest.fixture(scope="module")
def serial_planted():
    return run_report([PLANTED, *FAST])


@pytest.fixture(scope="module")
def serial_adapter(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return run_report([ADAPTER, *FAST, *GAIN, "--cache-dir", str(cache)]), str(cache)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'routeaudit[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_planted_traces_serial_baseline_is_what_the_fixture_plants(serial_planted):
    """The comparison below is only as good as its baseline: the planted effect is found."""
    statuses = {(v.audit, v.status) for v in serial_planted.verdicts}
    assert ("stratification", Status.PASS) in statuses
    assert ("permutation_null", Status.PASS) in statuses
    assert not any(v.status is Status.ERROR for v in serial_planted.verdicts)


def test_explicit_serial_is_the_default(serial_planted):
    assert dumps(run_report([PLANTED, *FAST, "--executor", "serial"])) == dumps(serial_planted)


def test_process_pool_gives_the_serial_verdicts_on_traces(serial_planted):
    assert dumps(run_report([PLANTED, *FAST, "--executor", "process:2"])) == dumps(serial_planted)


def test_process_pool_gives_the_serial_verdicts_on_an_adapter(serial_adapter):
    serial, cache = serial_adapter
    assert {v.audit for v in serial.verdicts} == {"capacity_control", "baseline_gain"}
    assert not any(v.status is Status.ERROR for v in serial.verdicts)
    parallel = run_report([ADAPTER, *FAST, *GAIN, "--cache-dir", cache, "--executor", "process:2"])
    assert dumps(parallel) == dumps(serial)


def test_ray_gives_the_serial_verdicts_on_traces(ray_local, serial_planted):
    assert dumps(run_report([PLANTED, *FAST, "--executor", "ray"])) == dumps(serial_planted)
    assert ray_local.is_initialized()  # a running instance is used, not shut down


def test_ray_gives_the_serial_verdicts_on_an_adapter(ray_local, serial_adapter):
    serial, cache = serial_adapter
    assert dumps(run_report([ADAPTER, *FAST, *GAIN, "--cache-dir", cache, "--executor", "ray"])) \
        == dumps(serial)


RAISING = """
import os
import routeaudit

class Boom(routeaudit.BaseAudit):
    name = "boom"
    claim = "Nothing."

    def cells(self, ctx):
        return [{"part": "a"}, {"part": "b"}]

    def run(self, ctx, cells):
        raise ZeroDivisionError("run exploded")


class Dies(routeaudit.BaseAudit):
    name = "dies"
    claim = "Nothing either."

    def cells(self, ctx):
        return [{"part": "c"}]

    def run(self, ctx, cells):
        if os.environ.get("ROUTEAUDIT_TEST_MAIN") != str(os.getpid()):
            os._exit(3)  # a worker process that dies outright
        return [ctx.verdict(self, cells[0], routeaudit.Status.PASS, "in the main process")]


@routeaudit.hookimpl
def routeaudit_collect_audits(config):
    return [Boom(), Dies()]
"""


def test_a_plugin_that_raises_or_dies_in_a_worker_is_error_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTEAUDIT_TEST_MAIN", str(__import__("os").getpid()))
    path = tmp_path / "boom_plugin.py"
    path.write_text(textwrap.dedent(RAISING))
    args = ["-p", str(path), PLANTED, *FAST, "--audit", "boom", "--audit", "dies",
            "--audit", "permutation_null"]
    serial = run_report(args)
    parallel = run_report([*args, "--executor", "process:2"])
    boom = [v for v in parallel.verdicts if v.audit == "boom"]
    assert [v.cell for v in boom] == [{"part": "a"}, {"part": "b"}]
    assert all(v.status is Status.ERROR and "ZeroDivisionError: run exploded" in v.reason
               for v in boom)
    assert [v.reason for v in boom] == [v.reason for v in serial.verdicts if v.audit == "boom"]
    died = [v for v in parallel.verdicts if v.audit == "dies"]
    assert [v.status for v in died] == [Status.ERROR] and "BrokenProcessPool" in died[0].reason
    assert [v.status for v in serial.verdicts if v.audit == "dies"] == [Status.PASS]
    # the rest of the battery still reports, in the serial order
    assert [v.audit for v in parallel.verdicts] == [v.audit for v in serial.verdicts]


def test_work_items_are_picklable_plain_data(serial_planted):
    from routeaudit.session.runner import work_items

    options = argparse.Namespace(seeds=[0, 1], plugins=["x.py"], targets=[PLANTED],
                                 live=lambda: None)  # a live object stays behind
    config = argparse.Namespace(options=options)
    target = argparse.Namespace(name=PLANTED, traces=[object()], session=object())
    audit = argparse.Namespace(name="a", claim="c")
    [item] = work_items(config, target, [(audit, [{"summary": "r_agg"}])], ("zeros",), None)
    assert item.traces is None  # a model adapter's worker loads it through the trace cache
    assert "live" not in item.options and item.options["seeds"] == [0, 1]
    back = pickle.loads(pickle.dumps(item))
    assert back == item and back.cells == ({"summary": "r_agg"},)


@pytest.mark.parametrize("text, expected", [
    ("serial", ("serial", None)), ("process", ("process", None)), ("process:4", ("process", "4")),
    ("ray", ("ray", None)), ("ray:10.0.0.1:6379", ("ray", "10.0.0.1:6379")),
])
def test_executor_option_values(text, expected):
    assert executors.executor_spec(text) == expected


@pytest.mark.parametrize("text", ["threads", "process:0", "process:two", "serial:3"])
def test_a_bad_executor_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--executor"):
        run_report([PLANTED, *FAST, "--executor", text])


def test_ray_missing_is_a_usage_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, find_spec says None
    with pytest.raises(UsageError, match=r"routeaudit\[ray\]"):
        run_report([PLANTED, *FAST, "--executor", "ray"])


def test_progress_advances_over_the_whole_grid_as_results_come_back(monkeypatch):
    from routeaudit.session import runner

    seen: list[tuple[str, int]] = []
    advance = runner.GridProgress.advance

    def record(self, units, verdicts):
        seen.extend((v.audit, units) for v in verdicts[:1])
        advance(self, units, verdicts)

    monkeypatch.setattr(runner.GridProgress, "advance", record)
    report = run_report([PLANTED, *FAST, "--audit", "permutation_null", "--audit",
                         "stratification", "--executor", "process:2"])
    cells = {a: sum(v.audit == a for v in report.verdicts) for a in ("permutation_null",
                                                                    "stratification")}
    assert sorted(seen) == sorted((a, n * 2) for a, n in cells.items())  # cells × 2 seeds


def test_a_model_adapter_is_loaded_in_the_worker_and_re_run(tmp_path):
    """A model adapter's traces do not travel: the worker loads the target through the
    trace cache and re-runs the model for the causal audit, with the serial verdicts."""
    from test_causal_content import TOY

    path = tmp_path / "toy_adapter.py"
    path.write_text(TOY.format(ROUTING_LOGITS=[0.0, 3.0]))
    args = [str(path), "--seeds", "0,1", "--bootstrap", "100", "--permutations", "99",
            "--cache-dir", str(tmp_path / "cache"), "--audit", "causal_ablation",
            "--audit", "permutation_null"]
    serial = run_report(args)
    assert [v.status for v in serial.verdicts if v.audit == "causal_ablation"] == [Status.PASS]
    assert dumps(run_report([*args, "--executor", "process:2"])) == dumps(serial)
