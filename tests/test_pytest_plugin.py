"""The pytest plugin: one item per verdict, outcomes matching ``routeaudit run --json``."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
FAST = "--seeds 0 --permutations 99 --bootstrap 100"
PLUGIN = "routeaudit.plugins.pytest_plugin"

#: routeaudit status -> pytest outcome under the default --routeaudit-inconclusive xfail
OUTCOME = {"pass": "passed", "fail": "failed", "error": "failed", "skip": "skipped",
           "inconclusive": "xfailed"}


def cli_statuses(target: Path, tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """node id -> status from the routeaudit CLI in a separate process (the reference)."""
    out = tmp_path / f"{target.stem}.json"
    subprocess.run([sys.executable, "-m", "routeaudit", "run", str(target), *FAST.split(),
                    "--json", str(out), "-qq"], check=False, capture_output=True,
                   env={"OMP_NUM_THREADS": "1", "PATH": "", **(env or {})}, cwd=ROOT)
    verdicts = json.loads(out.read_text())["verdicts"]
    return {f"{v['target']}::{v['audit']}" + (f"[{'-'.join(map(str, v['cell'].values()))}]"
                                               if v["cell"] else ""): v["status"] for v in verdicts}


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in a subprocess: an in-process run would have pytester drop the modules the
    battery imported from sys.modules afterwards, leaving stale classes for later tests."""
    return pytester.runpytest_subprocess("-p", PLUGIN, "-p", "no:cacheprovider",
                              f"--routeaudit-args={FAST}", *args)


def assert_junit_matches(junit: Path, expected: dict[str, str]) -> None:
    """JUnit: one testcase per verdict, named after routeaudit's node id, with its outcome."""
    cases = ET.parse(junit).getroot().iter("testcase")
    seen = {c.get("name"): [child.tag for child in c] for c in cases}
    names = {nodeid.split("::", 1)[1] for nodeid in expected}
    assert set(seen) == names
    for nodeid, status in expected.items():
        tags = seen[nodeid.split("::", 1)[1]]
        assert ("failure" in tags) == (status in ("fail", "error")), (nodeid, status, tags)
        assert ("skipped" in tags) == (status in ("skip", "inconclusive")), (nodeid, status, tags)


def _outcomes(statuses: dict[str, str]) -> dict[str, int]:
    counts = Counter(OUTCOME[s] for s in statuses.values())
    return dict(counts)


@pytest.mark.parametrize("name", ["planted", "frozen", "confounded_null"])
def test_outcomes_match_the_cli_json(pytester: pytest.Pytester, tmp_path: Path, name: str) -> None:
    target = FIX / f"{name}.npz"
    expected = cli_statuses(target, tmp_path)
    junit = tmp_path / "junit.xml"
    result = run(pytester, "--routeaudit", str(target), f"--junitxml={junit}", "-rA")
    result.assert_outcomes(**{k: v for k, v in _outcomes(expected).items()})
    assert result.ret == (1 if "fail" in expected.values() else 0)
    assert_junit_matches(junit, expected)


def test_failure_text_is_the_reason_without_traceback(pytester: pytest.Pytester, tmp_path: Path) -> None:
    target = FIX / "frozen.npz"
    result = run(pytester, "--routeaudit", str(target))
    text = result.stdout.str()
    assert "content-independent" in text  # frozen.npz's stated reason
    assert "Traceback" not in text and "pytest_plugin.py" not in text.split("short test summary")[0]


def test_k_selects_like_routeaudit(pytester: pytest.Pytester, tmp_path: Path) -> None:
    target = FIX / "frozen.npz"
    expected = cli_statuses(target, tmp_path)
    chosen = {n: s for n, s in expected.items() if "stratification" in n}
    assert chosen  # the fixture has stratification rows
    result = run(pytester, "--routeaudit", str(target), "-k", "stratification")
    result.assert_outcomes(**_outcomes(chosen), deselected=len(expected) - len(chosen))


def test_x_stops_at_the_first_failure(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--routeaudit", str(FIX / "frozen.npz"), "-x", "-k", "not content")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1


def test_inconclusive_as_xfail_or_fail(pytester: pytest.Pytester, tmp_path: Path) -> None:
    target = FIX / "confounded_null.npz"
    n_inc = sum(s == "inconclusive" for s in cli_statuses(target, tmp_path).values())
    assert n_inc > 0
    soft = run(pytester, "--routeaudit", str(target), "-k", "not content")
    assert soft.parseoutcomes().get("xfailed") == n_inc and soft.ret == 0
    hard = run(pytester, "--routeaudit", str(target), "--routeaudit-inconclusive", "fail",
               "-k", "not content")
    assert hard.parseoutcomes().get("failed") == n_inc and hard.ret == 1
    assert "inconclusive:" in hard.stdout.str()


def test_two_targets_each_run_once(pytester: pytest.Pytester, tmp_path: Path) -> None:
    a, b = FIX / "planted.npz", FIX / "frozen.npz"
    both = {**cli_statuses(a, tmp_path), **cli_statuses(b, tmp_path)}
    result = run(pytester, "--routeaudit", str(a), "--routeaudit", str(b))
    result.assert_outcomes(**_outcomes(both))


def test_bad_options_are_usage_errors(pytester: pytest.Pytester) -> None:
    target = str(FIX / "planted.npz")
    bad = pytester.runpytest_subprocess("-p", PLUGIN, "--routeaudit", target, "--routeaudit-args=--seeds x")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "--seeds" in bad.stderr.str()
    unknown = pytester.runpytest_subprocess("-p", PLUGIN, "--routeaudit", target,
                                 "--routeaudit-args=--audit nosuchaudit")
    assert unknown.ret == pytest.ExitCode.USAGE_ERROR
    assert "nosuchaudit" in unknown.stderr.str()


def test_invalid_target_is_a_collection_error_naming_it(pytester: pytest.Pytester) -> None:
    missing = pytester.path / "nothere.npz"
    result = run(pytester, "--routeaudit", str(missing))
    assert result.ret == pytest.ExitCode.INTERRUPTED  # pytest: errors during collection
    assert "nothere.npz" in result.stdout.str()
    garbage = pytester.path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    result = run(pytester, "--routeaudit", str(garbage))
    result.assert_outcomes(errors=1)
    assert "garbage.npz" in result.stdout.str()


def test_fixture_helpers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        import pytest
        FROZEN = {str(FIX / "frozen.npz")!r}
        PLANTED = {str(FIX / "planted.npz")!r}
        ARGS = {FAST.split()!r}

        def test_planted(routeaudit):
            result = routeaudit.run(PLANTED, *ARGS)
            assert result.exit_code == 0
            result.assert_passes("stratification")
            assert result.status_of("stratification", summary="r_agg").value == "pass"
            with pytest.raises(AssertionError, match="expected stratification to fail"):
                result.assert_fails("stratification")

        def test_frozen(routeaudit):
            result = routeaudit.run(FROZEN, *ARGS)
            assert result.exit_code == 1 and result.report.summary.fail > 0
            result.assert_fails("stratification")
            with pytest.raises(AssertionError) as err:
                result.assert_passes("stratification")
            assert "content-independent" in str(err.value)
            with pytest.raises(AssertionError, match="no verdict of nosuch"):
                result.assert_passes("nosuch")
    """)
    result = pytester.runpytest_subprocess("-p", PLUGIN, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_digits_block_adapter(pytester: pytest.Pytester, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A model adapter end to end: one item per verdict, statuses as ``routeaudit run``'s."""
    adapter = FIX / "digits" / "block_adapter.py"
    monkeypatch.setenv("ROUTEAUDIT_CACHE_DIR", str(tmp_path / "cache"))  # 2nd run: cache hit
    expected = cli_statuses(adapter, tmp_path, env={"ROUTEAUDIT_CACHE_DIR": str(tmp_path / "cache")})
    assert len(expected) > 10
    junit = tmp_path / "junit.xml"
    result = run(pytester, "--routeaudit", str(adapter), f"--junitxml={junit}")
    result.assert_outcomes(**_outcomes(expected))
    assert_junit_matches(junit, expected)
