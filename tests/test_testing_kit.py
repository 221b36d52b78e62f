"""routeaudit.testing for audit authors: one audit, given traces and options, its verdicts.

A toy plugin's audit records in its verdict what the run handed it (seeds, options, the
traces' sizes, its own instance), so each test compares that with what the test passed;
the command line's own in-process run (``run_report``) is the reference for equality.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import routeaudit
from routeaudit.testing import AuditTester, AuditVerdicts, run_audit, run_report, synthetic_traces

ROOT = Path(__file__).resolve().parents[1]
PLANTED = ROOT / "fixtures" / "planted.npz"

TOY = '''
import routeaudit


class Echo(routeaudit.BaseAudit):
    """Passes; its verdict records what the run handed it."""

    name = "echo"
    claim = "The run hands the audit what the test asked for."

    def __init__(self, label="collected"):
        self.label = label

    def cells(self, ctx):
        return [{"part": "eval"}, {"part": "cal"}]

    def run(self, ctx, cells):
        return [ctx.verdict(self, cell, routeaudit.Status.PASS, "seen",
                            effect=float(ctx.option("echo_scale", 1.0)),
                            evidence={"seeds": [s.seed for s in ctx.seeds],
                                      "n": [int(s.traces.n_examples) for s in ctx.seeds],
                                      "part_sizes": [int(s.index(cell["part"]).size)
                                                     for s in ctx.seeds],
                                      "label": self.label, "alpha": ctx.settings.alpha,
                                      "summary": "echo_label" in ctx.summaries})
                for cell in cells]


class Boom(routeaudit.BaseAudit):
    name = "boom"
    claim = "Never raises."

    def cells(self, ctx):
        return [{"x": 1}]

    def run(self, ctx, cells):
        raise RuntimeError("kaboom in the audit")


@routeaudit.hookimpl
def routeaudit_addoption(parser):
    parser.getgroup("echo").add_argument("--echo-scale", type=float, default=1.0)


@routeaudit.hookimpl
def routeaudit_register_summaries(registry):
    registry.register("echo_label", lambda ts: ts.labels.astype(float), "the label",
                      categorical=True)


@routeaudit.hookimpl
def routeaudit_collect_audits(config):
    return [Echo(), Boom()]
'''


@pytest.fixture(scope="module")
def traces() -> routeaudit.TraceSet:
    return synthetic_traces(600, seed=0)


@pytest.fixture()
def toy_file(tmp_path: Path) -> Path:
    path = tmp_path / "toy_audits.py"
    path.write_text(textwrap.dedent(TOY))
    return path


@pytest.fixture()
def toy(toy_file: Path):
    """The toy plugin imported as a module (as a test imports the plugin it tests)."""
    name = f"toy_audits_{id(toy_file)}"
    spec = importlib.util.spec_from_file_location(name, toy_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


def test_the_audit_gets_the_seeds_options_and_traces_asked_for(toy, traces):
    result = run_audit(toy, traces, "--seeds", "3,4", "--alpha", "0.1", "--echo-scale", "2.5",
                       audit="echo")
    assert isinstance(result, list) and isinstance(result, AuditVerdicts)
    assert [v.nodeid for v in result] == ["traces::echo[eval]", "traces::echo[cal]"]
    ev = result.select(part="eval")[0].evidence
    assert ev["seeds"] == [3, 4] and ev["n"] == [600, 600] and ev["alpha"] == 0.1
    assert ev["summary"] is True  # the plugin's summaries are registered
    cal, eval_ = result[1].evidence["part_sizes"], ev["part_sizes"]
    assert [a + b for a, b in zip(cal, eval_, strict=True)] == [600, 600]
    assert all(v.effect == 2.5 for v in result)
    result.assert_passes("echo")
    assert result.status_of(part="cal") is routeaudit.Status.PASS


def test_replicates_are_the_seeds(toy):
    a, b = synthetic_traces(300, seed=1), synthetic_traces(500, seed=2)
    (verdict, _) = run_audit(toy, [a, b], audit="echo", name="replicas")
    assert verdict.target == "replicas"
    assert verdict.evidence["seeds"] == [0, 1] and verdict.evidence["n"] == [300, 500]


def test_an_audit_object_runs_with_its_modules_options_but_alone(toy, traces):
    result = run_audit(toy.Echo("mine"), traces, "--seeds", "0", "--echo-scale", "3")
    assert {v.audit for v in result} == {"echo"}
    assert all(v.evidence["label"] == "mine" and v.effect == 3.0 for v in result)
    assert result[0].evidence["summary"] is True
    assert not [k for k in sys.modules if k.startswith("audit:")]  # nothing left behind


def test_a_plugin_with_several_audits_needs_the_name(toy, traces):
    with pytest.raises(routeaudit.UsageError, match=r"provides 2 audits \(echo, boom\)"):
        run_audit(toy, traces)


def test_same_verdicts_as_the_command_line(toy_file):
    args = ["--seeds", "0,1", "--echo-scale", "0.5"]
    ours = run_audit(str(toy_file), PLANTED, *args, audit="echo")
    cli = run_report([str(PLANTED), "-p", str(toy_file), "--audit", "echo", *args])
    assert list(ours) == cli.verdicts
    with np.load(PLANTED) as data:  # the traces are the file's
        assert ours[0].evidence["n"] == [int(data["labels"].shape[0])] * 2
    assert ours[0].target == str(PLANTED)


def test_nothing_is_printed_or_written(toy, traces, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    report = tmp_path / "r.json"
    result = run_audit(toy, traces, "--seeds", "0", "--json", str(report), "-v", audit="echo")
    assert len(result) == 2
    assert capsys.readouterr() == ("", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_audit_that_raises_is_an_error_row_with_its_traceback(toy, traces):
    result = run_audit(toy, traces, "--seeds", "0", audit="boom")
    assert result.status_of("boom") is routeaudit.Status.ERROR
    with pytest.raises(AssertionError, match="kaboom in the audit") as info:
        result.assert_passes("boom", x=1)
    assert "RuntimeError" in str(info.value)  # the traceback's last lines are shown


def test_usage_errors_raise(toy, traces):
    with pytest.raises(routeaudit.UsageError, match="--echo-scale"):
        run_audit(toy, traces, "--echo-scale", "x", audit="echo")
    with pytest.raises(routeaudit.UsageError, match="unrecognized arguments: --nope"):
        run_audit(toy, traces, "--nope", audit="echo")
    with pytest.raises(routeaudit.UsageError, match="unknown audit"):
        run_audit(toy, traces, audit="absent")


def test_a_plugin_that_cannot_import_is_its_error_row(tmp_path, traces):
    bad = tmp_path / "broken_plugin.py"
    bad.write_text("raise ImportError('no such thing')\n")
    result = run_audit(str(bad), traces)
    (row,) = result
    assert row.status is routeaudit.Status.ERROR and row.audit == "broken_plugin"
    assert "no such thing" in row.reason


def test_entry_points_are_left_out_unless_asked(toy, traces, tmp_path, monkeypatch):
    """An installed plugin whose hook raises shows up only with entry_points=True."""
    (tmp_path / "ep_plugin.py").write_text(textwrap.dedent('''
        import routeaudit

        @routeaudit.hookimpl
        def routeaudit_configure(config):
            raise RuntimeError("installed plugin ran")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="ep_plugin", value="ep_plugin", group="routeaudit")
    monkeypatch.setattr("routeaudit.session.plugins._entry_points", lambda: [ep])
    tester = AuditTester(toy, "--seeds", "0", audit="echo")
    assert [v.status for v in tester.run(traces)] == [routeaudit.Status.PASS] * 2
    with_eps = AuditTester(toy, "--seeds", "0", audit="echo", entry_points=True).run(traces)
    assert with_eps[0].status is routeaudit.Status.ERROR and "installed plugin ran" in \
        with_eps[0].reason
    assert [v.status for v in with_eps[1:]] == [routeaudit.Status.PASS] * 2


def test_assertions_say_what_did_not_match(toy, traces):
    result = run_audit(toy, traces, "--seeds", "0", audit="echo")
    with pytest.raises(AssertionError, match="2 verdicts match"):
        result.status_of("echo")
    with pytest.raises(AssertionError, match="no verdict of echo"):
        result.assert_passes("echo", part="nowhere")
    with pytest.raises(AssertionError, match=r"expected any audit to fail; 2 did not"):
        result.assert_fails()


def test_synthetic_traces_have_the_stated_calibration():
    """effect 0: accuracy = confidence in every routing tertile; effect > 0: the tertiles
    of the routing sharpness differ in accuracy at the same confidence."""

    def tertile_gaps(ts: routeaudit.TraceSet) -> tuple[np.ndarray, np.ndarray]:
        p = np.exp(ts.logits - ts.logits.max(axis=1, keepdims=True))
        conf = p.max(axis=1) / p.sum(axis=1)
        correct = (ts.logits.argmax(axis=1) == ts.labels).astype(float)
        a = np.where(ts.source_mask[None], ts.routing.astype(float), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(a > 0, a * np.log(a), 0.0).sum(axis=2)[:, 1:].mean(axis=1)
        tile = np.searchsorted(np.quantile(h, [1 / 3, 2 / 3]), h)
        r = correct - conf
        return (np.array([r[tile == t].mean() for t in range(3)]),
                np.array([r[tile == t].std() / np.sqrt((tile == t).sum()) for t in range(3)]))

    gaps, se = tertile_gaps(synthetic_traces(30000, seed=5))
    assert np.all(np.abs(gaps) < 4 * se), gaps
    gaps, se = tertile_gaps(synthetic_traces(30000, seed=5, effect=0.4))
    assert abs(gaps[0] - gaps[2]) > 8 * np.hypot(se[0], se[2]), gaps


def test_run_report_prints_nothing(capsys):
    """The in-process run behind the pytest plugin leaves reporting to its caller."""
    from routeaudit.testing import run_report

    report = run_report([str(ROOT / "fixtures" / "planted.npz"), "--seeds", "0", "--permutations", "99",
                         "--bootstrap", "100", "--audit", "stratification"])
    assert report.verdicts
    captured = capsys.readouterr()
    assert captured.out == "" and "passed" not in captured.err
