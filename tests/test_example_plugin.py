"""The example third-party plugin (examples/routeaudit-multicalibration), installed as a
user would: built from its folder with pip into a private target directory (offline, the
venv untouched), found through its entry point, run from the command line, and its own
tests run against it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "routeaudit-multicalibration"
GROUPINGS = {"r_agg", "r_agg_normalized", "depth_variance", "depth_variance_across", "top_source"}


def _site_packages() -> list[tuple[str, int]]:
    folder = Path(sysconfig.get_paths()["purelib"])
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """pip install --target of a copy of the example (a build writes build/ and
    *.egg-info next to its sources: the copy keeps the repository clean)."""
    work = tmp_path_factory.mktemp("example-plugin")
    source = work / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    target = work / "site"
    venv_before = _site_packages()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--no-cache-dir", "--quiet", "--target", str(target),
         str(source)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_NO_INPUT": "1"})
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    return {"target": target, "source": source, "venv_unchanged": venv_before == _site_packages()}


def _env(target: Path | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    if target is not None:
        env["PYTHONPATH"] = str(target)
    return env


def _routeaudit(*args: str, target: Path | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "routeaudit", *args], capture_output=True,
                          text=True, cwd=ROOT, env=_env(target), timeout=300)


def test_install_goes_to_the_target_only(installed):
    assert installed["venv_unchanged"], "pip install --target changed the venv's site-packages"
    target = installed["target"]
    assert (target / "routeaudit_multicalibration" / "plugin.py").is_file()
    entry_points = next(target.glob("routeaudit_multicalibration-*.dist-info")) / "entry_points.txt"
    assert "[routeaudit]" in entry_points.read_text()
    assert not list(EXAMPLE.glob("*.egg-info")) and not (EXAMPLE / "build").exists()


def test_routeaudit_audits_lists_it_through_the_entry_point(installed):
    listed = _routeaudit("audits", target=installed["target"])
    assert listed.returncode == 0, listed.stderr
    assert "multicalibration  [traces]" in listed.stdout
    bare = _routeaudit("audits", target=None)  # without the install it is not there
    assert bare.returncode == 0 and "multicalibration" not in bare.stdout
    off = _routeaudit("--no-entry-points", "audits", target=installed["target"])
    assert "multicalibration" not in off.stdout


def test_routeaudit_run_gives_its_verdicts(installed, tmp_path):
    report = tmp_path / "report.json"
    done = _routeaudit("run", "fixtures/planted.npz", "--audit", "multicalibration", "--seeds", "0",
                       "--json", str(report), "-qq", target=installed["target"])
    assert done.returncode in (0, 1), done.stderr  # verdicts, not a usage or internal error
    data = json.loads(report.read_text())
    verdicts = data["verdicts"]
    assert {v["audit"] for v in verdicts} == {"multicalibration"}
    assert {v["cell"]["groups"] for v in verdicts} == GROUPINGS
    assert {v["status"] for v in verdicts} <= {"pass", "fail", "inconclusive"}
    assert all(v["threshold"]["multical_tol"] == 0.05 for v in verdicts)  # its defaults
    assert data["config"]["multical_min_size"] == 200
    assert done.returncode == (0 if all(v["status"] == "pass" for v in verdicts) else 1)


def test_the_examples_own_tests_pass(installed):
    """Against the installed copy: ``-o pythonpath=`` drops the example's ``src`` entry."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-o", "pythonpath=", "tests"],
                          capture_output=True, text=True, cwd=installed["source"],
                          env=_env(installed["target"]), timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
