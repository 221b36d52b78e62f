"""The README's configuration table and CI workflow are real: they parse, and what they name exists."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "routeaudit", *args], cwd=cwd, text=True,
                          capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}, check=False)


def test_readme_config_table_is_accepted_and_a_typo_in_it_is_named(tmp_path: Path) -> None:
    (block,) = re.findall(r"```toml\n(\[tool\.routeaudit\].*?)```", README, flags=re.S)
    (tmp_path / "audits").mkdir()
    (tmp_path / "audits" / "my_audits.py").write_text("", encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(block, encoding="utf-8")
    ok = _cli("audits", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "causal_ablation" in ok.stdout
    (tmp_path / "pyproject.toml").write_text(block.replace("mass_min", "mass_mni"), encoding="utf-8")
    bad = _cli("audits", cwd=tmp_path)
    assert bad.returncode == 4
    assert "mass_mni" in bad.stderr and "pyproject.toml" in bad.stderr


def test_readme_ci_workflow_parses_and_uses_real_options() -> None:
    yaml = pytest.importorskip("yaml")
    (block,) = re.findall(r"```yaml\n(# \.github/workflows/routeaudit\.yml\n.*?)```", README, flags=re.S)
    workflow = yaml.safe_load(block)
    steps = workflow["jobs"]["audit"]["steps"]
    runs = [step["run"] for step in steps if "run" in step and step["run"].startswith("routeaudit run")]
    assert len(runs) == 1
    flags = [arg for arg in shlex.split(runs[0]) if arg.startswith("--")]
    helptext = _cli("run", "--help", cwd=ROOT).stdout
    missing = [flag for flag in flags if flag not in helptext]
    assert flags and not missing, f"the README workflow uses options `run` does not have: {missing}"
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert "report.html" in upload["with"]["path"].split()
