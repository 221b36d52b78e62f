"""End to end through the command line: exit codes, reports, selection, plugins."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from routeaudit.cli import main
from routeaudit.fixtures.synthetic import make_traces

FAST = ["--permutations", "199", "--bootstrap", "200"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    paths = {}
    for kind in ("planted", "null", "frozen"):
        paths[kind] = str(make_traces(kind, 4000, seed=1).save_npz(root / f"{kind}.npz"))
    return paths


def run_json(args, tmp_path, name="r.json"):
    out = tmp_path / name
    code = main(["run", *args, *FAST, "--json", str(out)])
    return code, json.loads(out.read_text())


def by_audit(report, audit):
    return {v["cell"]["summary"]: v for v in report["verdicts"] if v["audit"] == audit}


def test_planted_passes_with_schema(npz, tmp_path):
    code, report = run_json([npz["planted"]], tmp_path)
    assert code == 0, [v["reason"] for v in report["verdicts"] if v["status"] != "pass"]
    assert report["exit_code"] == 0
    assert set(report) >= {"routeaudit_version", "exit_code", "targets", "seeds", "config",
                           "verdicts", "summary"}
    assert set(report["summary"]) == {"pass", "fail", "inconclusive", "error", "skip"}
    verdict = report["verdicts"][0]
    assert set(verdict) >= {"audit", "claim", "cell", "status", "effect", "ci", "p_value",
                            "p_value_corrected", "per_seed", "threshold", "reason"}
    perm = by_audit(report, "permutation_null")
    assert set(perm) == {"r_agg", "r_agg_normalized", "depth_variance", "depth_variance_across"}
    assert all(v["status"] == "pass" for v in perm.values())
    assert all(len(v["per_seed"]) == 3 for v in perm.values())


def test_confounded_null_is_never_passed_and_is_refuted_at_a_wider_margin(npz, tmp_path):
    code, report = run_json([npz["null"]], tmp_path)
    assert code == 1
    perm = by_audit(report, "permutation_null")
    assert all(v["status"] == "inconclusive" for v in perm.values())
    assert all("× the evaluation data" in v["reason"] for v in perm.values())
    code, report = run_json([npz["null"], "--gap-margin", "0.05"], tmp_path / "wide")
    perm = by_audit(report, "permutation_null")
    assert code == 1 and all(v["status"] == "fail" for v in perm.values())
    assert all("below the margin 0.05" in v["reason"] for v in perm.values())


def test_frozen_reports_no_variation(npz, tmp_path):
    code, report = run_json([npz["frozen"]], tmp_path)
    assert code == 1
    assert report["verdicts"]
    claimed = [v for v in report["verdicts"] if v["status"] != "skip"]
    assert claimed
    for verdict in claimed:
        assert verdict["status"] == "fail"
        assert "no routing variation" in verdict["reason"]
    # audits this target cannot run are listed as skipped, with why
    skipped = {v["audit"]: v["reason"] for v in report["verdicts"] if v["status"] == "skip"}
    assert set(skipped) == {"capacity_control", "shuffled_profile", "baseline_gain",
                            "bandwidth_sensitivity", "causal_ablation", "expert_calibration"}
    assert "calibrator" in skipped["capacity_control"]
    assert "not a mixture of experts" in skipped["expert_calibration"]
    assert "not a model" in skipped["causal_ablation"]


def test_bad_traces_exit_4_naming_field_and_index(tmp_path, capsys):
    ts = make_traces("null", 500, seed=0)
    arrays = ts.arrays()
    arrays["logits"] = arrays["logits"].copy()
    arrays["logits"][17, 3] = np.nan
    np.savez(tmp_path / "bad.npz", **arrays)
    assert main(["run", str(tmp_path / "bad.npz")]) == 4
    err = capsys.readouterr().err
    assert "logits" in err and "(17, 3)" in err


def test_too_few_examples_are_inconclusive_per_audit(tmp_path):
    """Too little data is not invalid traces: each audit that needs more says how much."""
    make_traces("null", 60, seed=0).save_npz(tmp_path / "small.npz")
    code, report = run_json([str(tmp_path / "small.npz")], tmp_path)
    assert code == 1
    rows = {(v["audit"], v["cell"].get("summary")): v for v in report["verdicts"]}
    perm = rows[("permutation_null", "r_agg")]
    assert perm["status"] == "inconclusive"
    assert "60 examples" in perm["reason"] and "at least 100" in perm["reason"]
    assert "40 more" in perm["reason"]
    # an audit content with 60 examples still runs
    assert rows[("content_dependence", None)]["status"] in ("pass", "fail")


def test_junit_one_testcase_per_verdict(npz, tmp_path):
    xml_path = tmp_path / "out.xml"
    code = main(["run", npz["null"], *FAST, "--junitxml", str(xml_path), "--audit",
                 "permutation_null"])
    assert code == 1
    suite = ET.parse(xml_path).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 4
    assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases) == 4


def test_keyword_and_audit_selection(npz, tmp_path):
    code, report = run_json([npz["planted"], "-k", "permutation and depth_variance"], tmp_path)
    assert code == 0
    cells = sorted((v["audit"], v["cell"]["summary"]) for v in report["verdicts"])
    assert cells == [("permutation_null", "depth_variance"),
                     ("permutation_null", "depth_variance_across")]
    code, report = run_json([npz["planted"], "-k", "not stratification and r_agg_normalized"],
                            tmp_path)
    assert [(v["audit"], v["cell"]["summary"]) for v in report["verdicts"]] == [
        ("permutation_null", "r_agg_normalized")]


def test_nothing_selected_exits_5(npz):
    assert main(["run", npz["planted"], "-k", "no_such_audit"]) == 5


def test_unknown_audit_is_usage_error(npz):
    assert main(["run", npz["planted"], "--audit", "nope"]) == 4


def test_block_builtin_plugin(npz, tmp_path):
    _, report = run_json([npz["planted"], "-p", "no:stratification", "--summary", "r_agg"],
                            tmp_path)
    audits = {v["audit"] for v in report["verdicts"]}
    assert "stratification" not in audits and "permutation_null" in audits


def test_same_seed_bit_identical(npz, tmp_path):
    _, a = run_json([npz["null"], "--summary", "r_agg"], tmp_path, "a.json")
    _, b = run_json([npz["null"], "--summary", "r_agg"], tmp_path, "b.json")
    strip = [{k: v for k, v in x.items() if k != "duration_s"} for x in (a, b)]
    assert strip[0]["verdicts"] == strip[1]["verdicts"]


USER_FILE = '''
import routeaudit
from routeaudit import Status, Verdict
from routeaudit.fixtures.synthetic import make_traces


@routeaudit.adapter
def traces():
    return make_traces("planted", 3000, seed=2)


class Boom:
    name = "boom"
    claim = "This audit always raises."
    needs = frozenset({"traces"})
    min_examples = 1

    def cells(self, ctx):
        return [{"part": "only"}]

    def run(self, ctx, cells):
        raise RuntimeError("kaboom")


class Always:
    name = "always"
    claim = "A third-party audit."
    needs = frozenset({"traces"})
    min_examples = 1

    def cells(self, ctx):
        return [{"n": len(ctx.seeds)}]

    def run(self, ctx, cells):
        return [Verdict(audit=self.name, claim=self.claim, cell=c, status=Status.PASS,
                        reason="ok") for c in cells]


@routeaudit.hookimpl
def routeaudit_collect_audits(config):
    return [Boom(), Always()]
'''


def test_user_file_adapter_and_plugin_audits(tmp_path):
    path = tmp_path / "my_adapter.py"
    path.write_text(USER_FILE)
    out = tmp_path / "r.json"
    code = main(["run", str(path), *FAST, "--summary", "r_agg", "--json", str(out)])
    report = json.loads(out.read_text())
    statuses = {v["audit"]: v["status"] for v in report["verdicts"]}
    assert statuses["boom"] == "error"
    assert statuses["always"] == "pass"
    assert statuses["permutation_null"] == "pass"  # the battery went on after the error
    boom = next(v for v in report["verdicts"] if v["audit"] == "boom")
    assert "kaboom" in boom["reason"] and "RuntimeError" in boom["traceback"]
    assert code == 1


def test_misspelled_hook_fails_at_start(tmp_path, capsys):
    path = tmp_path / "typo_adapter.py"
    path.write_text(textwrap.dedent('''
        import routeaudit

        @routeaudit.hookimpl
        def routeaudit_collect_audit(config):
            return []
    '''))
    assert main(["run", str(path)]) == 4
    assert "routeaudit_collect_audit" in capsys.readouterr().err


def test_audits_lists_claims(capsys):
    assert main(["audits"]) == 0
    out = capsys.readouterr().out
    assert "permutation_null" in out and "stratification" in out
    assert "beyond confidence" in out


def test_terminal_table_and_summary_line(npz, capsys):
    main(["run", npz["null"], *FAST, "--audit", "permutation_null", "--gap-margin", "0.05"])
    out = capsys.readouterr().out
    assert "FAIL" in out and "p raw / corr" in out
    assert out.strip().splitlines()[-1].startswith("=") and "4 failed" in out
