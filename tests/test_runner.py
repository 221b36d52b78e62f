"""The runner never crashes on a plugin, says why an audit did not run, and catches a user's
mistakes at collection; plugin options, ``-p`` paths, closed pipes; the README's plugin
example, executed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from routeaudit.cli import main
from routeaudit.fixtures.synthetic import make_traces

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--permutations", "99", "--bootstrap", "100", "--seeds", "0,1"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "planted.npz"
    make_traces("planted", 3000, seed=2).save_npz(path)
    return str(path)


def run(args, tmp_path, *, name="r.json"):
    out = tmp_path / name
    code = main(["run", *args, *FAST, "--json", str(out), "-q"])
    return code, json.loads(out.read_text()) if out.exists() else None


def plugin(tmp_path, body, name="my_plugin.py"):
    path = tmp_path / name
    path.write_text("import routeaudit\nfrom routeaudit import Status\n\n" + textwrap.dedent(body))
    return str(path)


RAISING_CELLS = """
class Broken(routeaudit.BaseAudit):
    name = "broken"
    claim = "Nothing."

    def cells(self, ctx):
        raise RuntimeError("cells exploded")

    def run(self, ctx, cells):
        return []


@routeaudit.hookimpl
def routeaudit_collect_audits(config):
    return [Broken()]
"""


def test_audit_whose_cells_raise_is_an_error_row_and_the_battery_goes_on(npz, tmp_path):
    code, report = run(["-p", plugin(tmp_path, RAISING_CELLS), npz], tmp_path)
    assert code == 1 and report["exit_code"] == 1
    broken = [v for v in report["verdicts"] if v["audit"] == "broken"]
    assert len(broken) == 1 and broken[0]["status"] == "error"
    assert "cells exploded" in broken[0]["reason"] and "RuntimeError" in broken[0]["traceback"]
    others = [v for v in report["verdicts"] if v["audit"] == "permutation_null"]
    assert others and all(v["status"] == "pass" for v in others)


def test_audit_whose_run_raises_gives_one_error_row_per_cell(npz, tmp_path):
    body = """
    class Boom(routeaudit.BaseAudit):
        name = "boom"
        claim = "Nothing."

        def cells(self, ctx):
            return [{"part": "a"}, {"part": "b"}]

        def run(self, ctx, cells):
            raise ZeroDivisionError("run exploded")


    @routeaudit.hookimpl
    def routeaudit_collect_audits(config):
        return [Boom()]
    """
    code, report = run(["-p", plugin(tmp_path, body), npz], tmp_path)
    assert code == 1
    rows = [v for v in report["verdicts"] if v["audit"] == "boom"]
    assert [v["cell"] for v in rows] == [{"part": "a"}, {"part": "b"}]
    assert all(v["status"] == "error" and "ZeroDivisionError" in v["traceback"] for v in rows)


@pytest.mark.parametrize("hook, signature", [
    ("routeaudit_verdict", "config, verdict"),
    ("routeaudit_register_summaries", "registry"),
    ("routeaudit_collect_audits", "config"),
    ("routeaudit_configure", "config"),
    ("routeaudit_report", "config, report"),
])
def test_hook_implementation_that_raises_is_an_error_row(npz, tmp_path, hook, signature):
    body = f"""
    @routeaudit.hookimpl
    def {hook}({signature}):
        raise ValueError("hook exploded")
    """
    code, report = run(["-p", plugin(tmp_path, body, name=f"{hook}_plugin.py"), npz], tmp_path)
    assert code == 1
    errors = [v for v in report["verdicts"] if v["status"] == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["cell"] == {"hook": hook} and "hook exploded" in errors[0]["reason"]
    assert "ValueError" in errors[0]["traceback"]
    assert any(v["status"] == "pass" for v in report["verdicts"])  # the battery ran


def test_plugin_that_raises_at_import_is_an_error_row(npz, tmp_path):
    path = plugin(tmp_path, "raise ImportError('a dependency is missing')\n")
    code, report = run(["-p", path, npz], tmp_path)
    assert code == 1
    (row,) = [v for v in report["verdicts"] if v["status"] == "error"]
    assert row["audit"] == "my_plugin" and "a dependency is missing" in row["reason"]


def test_unknown_plugin_is_a_usage_error(npz, capsys):
    assert main(["run", "-p", "no_such_plugin_module", npz]) == 4
    assert "no_such_plugin_module" in capsys.readouterr().err
    assert main(["run", "-p", "./no_such_file.py", npz]) == 4


def test_dash_p_takes_a_path_or_a_module_found_from_the_working_directory(npz, tmp_path,
                                                                          monkeypatch):
    body = """
    class Always(routeaudit.BaseAudit):
        name = "always"
        claim = "Always true."

        def cells(self, ctx):
            return [{}]

        def run(self, ctx, cells):
            return [ctx.verdict(self, cells[0], Status.PASS, "fine")]


    @routeaudit.hookimpl
    def routeaudit_collect_audits(config):
        return [Always()]
    """
    plugin(tmp_path, body, name="my_cwd_audits.py")
    monkeypatch.chdir(tmp_path)
    for arg in ("./my_cwd_audits.py", "my_cwd_audits"):
        code, report = run(["-p", arg, npz, "--audit", "always"], tmp_path)
        assert code == 0, report
        assert [v["audit"] for v in report["verdicts"]] == ["always"]
    code, report = run(["-p", "./my_cwd_audits.py", "-p", "no:my_cwd_audits", npz,
                        "--audit", "permutation_null"], tmp_path)
    assert code == 0


def test_unmet_needs_are_skip_rows_in_every_report(npz, tmp_path, capsys):
    xml = tmp_path / "r.xml"
    code = main(["run", npz, *FAST, "--audit", "causal_ablation", "--audit", "capacity_control",
                 "--json", str(tmp_path / "r.json"), "--junitxml", str(xml)])
    assert code == 5  # nothing was audited
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(v["audit"], v["status"]) for v in report["verdicts"]] == [
        ("capacity_control", "skip"), ("causal_ablation", "skip")]
    assert report["summary"]["skip"] == 2
    cases = ET.parse(xml).getroot().findall(".//testcase")
    assert len(cases) == 2 and all(c.find("skipped") is not None for c in cases)
    out = capsys.readouterr().out
    assert "SKIP" in out and "2 skipped" in out and "not a model" in out


def test_unknown_layer_summary_is_one_usage_error_naming_what_exists(npz, capsys):
    assert main(["run", npz, *FAST, "--summary", "H9"]) == 4
    err = capsys.readouterr().err
    assert err.count("routeaudit: error") == 1
    assert "H9" in err and "numbered from 0" in err and re.search(r"H0\.\.H\d", err)
    assert main(["run", npz, *FAST, "--summary", "no_such_summary"]) == 4
    assert "known" in capsys.readouterr().err


def test_option_given_as_zero_is_honoured_and_recorded(npz, tmp_path):
    _, report = run([npz, "--tv-min", "0", "--audit", "content_dependence",
                        "--schedule-tol", "0"], tmp_path)
    assert report["config"]["tv_min"] == 0.0
    assert report["config"]["schedule_tol"] == 0.0
    (row,) = report["verdicts"]
    assert row["threshold"]["tv_min"] == 0.0


def test_audit_options_belong_to_their_plugin(npz, capsys):
    assert main(["run", npz, "-p", "no:causal_ablation", "--mass-min", "0.2"]) == 4
    assert "--mass-min" in capsys.readouterr().err


def test_blocking_a_gain_audit_removes_it_from_bandwidth_sensitivity(tmp_path):
    target = str(ROOT / "fixtures" / "calibrator_genuine.py")
    args = [target, "--audit", "bandwidth_sensitivity", "--seeds", "0", "--bootstrap", "100",
            "--no-cache", "-p", "no:capacity_control", "-p", "no:baseline_gain"]
    _, report = run(args, tmp_path)
    (row,) = report["verdicts"]
    assert row["threshold"]["audits"] == ["shuffled_profile"]
    flipped = {key for entry in row["per_seed"] for key in entry["statuses"]}
    assert flipped and all(key.startswith("shuffled_profile[") for key in flipped)


def test_closed_output_pipe_ends_quietly(npz):
    for args in (["run", npz, *FAST], ["audits"]):
        proc = subprocess.Popen([sys.executable, "-m", "routeaudit", *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader went away before the table was written
        err = proc.stderr.read().decode()
        proc.wait(timeout=300)
        assert "Traceback" not in err and "BrokenPipe" not in err, err
        assert proc.returncode == 0


def readme_plugin() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(# my_audits\.py\n.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the README's plugin example must be one ```python block"
    return blocks[0]


def test_readme_plugin_example_runs(npz, tmp_path, monkeypatch):
    (tmp_path / "my_audits.py").write_text(readme_plugin())
    monkeypatch.chdir(tmp_path)
    code, report = run(["-p", "./my_audits.py", npz, "--audit", "accuracy_floor"], tmp_path)
    assert code == 0
    (row,) = report["verdicts"]
    assert row["status"] == "pass" and row["reason"] == "holds in 2/2 seeds"
    assert row["threshold"] == {"floor": 0.5, "stability": "all"}
    assert [entry["seed"] for entry in row["per_seed"]] == [0, 1]
    code, report = run(["-p", "my_audits", npz, "--audit", "accuracy_floor",
                        "--accuracy-floor", "0.99"], tmp_path)
    assert code == 1
    assert report["verdicts"][0]["status"] == "fail"
    assert report["verdicts"][0]["reason"] == "holds in 0/2 seeds: refuted (a pass needs every seed)"


def test_run_help_lists_the_options_plugins_add(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--mass-min" in out and "--schedule-tol" in out and "--json" in out
    assert main(["run", "--help", "-p", "no:causal_ablation"]) == 0
    assert "--mass-min" not in capsys.readouterr().out


def test_naming_a_builtin_module_with_p_is_harmless(npz, tmp_path):
    """`-p routeaudit.audits.X` names a module that is already registered as a built-in:
    it is the same plugin, not an internal error (it used to end in exit 3)."""
    code, report = run([npz, "-p", "routeaudit.audits.content_dependence",
                        "--audit", "content_dependence"], tmp_path)
    assert code in (0, 1)
    assert [v["audit"] for v in report["verdicts"]] == ["content_dependence"]
