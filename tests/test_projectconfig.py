"""[tool.routeaudit] in pyproject.toml: values reach the run, the command line wins, every
mistake is a usage error that names the file, the table and the key."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from routeaudit.cli import main

PLANTED = str(Path(__file__).resolve().parents[1] / "fixtures" / "planted.npz")
FAST = ["--permutations", "99", "--bootstrap", "100"]

PLUGIN = '''
import routeaudit
from routeaudit import optiontypes


@routeaudit.hookimpl
def routeaudit_addoption(parser):
    parser.getgroup("my_plugin").add_argument("--my-level", type=optiontypes.positive_int,
                                               default=1)


@routeaudit.hookimpl
def routeaudit_configure(config):
    config.options.my_plugin_loaded = True
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory as the working directory; ``write(text)`` sets its pyproject.toml."""
    monkeypatch.chdir(tmp_path)

    def write(text: str, name: str = "pyproject.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


def run(args: list[str], out: str = "r.json") -> tuple[int, dict]:
    code = main(["run", PLANTED, *FAST, "-qq", "--json", out, *args])
    return code, json.loads(Path(out).read_text()) if Path(out).exists() else {}


def seeds_of(report: dict) -> set[tuple[int, ...]]:
    return {tuple(p["seed"] for p in v["per_seed"]) for v in report["verdicts"]}


def test_the_table_sets_alpha_seeds_and_audits_and_the_report_says_so(project):
    project("""
        [project]
        name = "demo"

        [tool.routeaudit]
        alpha = 0.01
        seeds = [4, 7]
        audits = ["stratification"]
    """)
    code, report = run([])
    assert code == 0
    config, sources = report["config"], report["config_sources"]
    assert (config["alpha"], config["seeds"], config["audit"]) == (0.01, [4, 7], ["stratification"])
    assert report["seeds"] == [4, 7]
    assert sources["alpha"] == sources["seeds"] == sources["audit"] == "pyproject.toml"
    assert sources["permutations"] == sources["json"] == "command line"
    assert sources["gap_margin"] == "default" and config["gap_margin"] == 0.01
    assert config["config_file"] == "pyproject.toml"
    verdicts = report["verdicts"]
    assert verdicts and {v["audit"] for v in verdicts} == {"stratification"}
    assert seeds_of(report) == {(4, 7)}
    # the audits used the file's alpha: a 1 - 2 alpha interval
    assert {v["threshold"]["alpha"] for v in verdicts} == {0.01}
    assert all(v["threshold"]["interval_level"] == pytest.approx(0.98) for v in verdicts)


def test_the_command_line_overrides_the_file(project):
    project("""
        [tool.routeaudit]
        alpha = 0.01
        seeds = [4, 7]
        audits = ["permutation_null"]
    """)
    code, report = run(["--alpha", "0.02", "--seeds", "3", "--audit", "stratification"])
    assert code == 0
    config, sources = report["config"], report["config_sources"]
    assert (config["alpha"], config["seeds"], config["audit"]) == (0.02, [3], ["stratification"])
    assert sources["alpha"] == sources["seeds"] == sources["audit"] == "command line"
    assert seeds_of(report) == {(3,)}
    assert {v["audit"] for v in report["verdicts"]} == {"stratification"}


def test_nearest_pyproject_from_a_subdirectory_and_the_switches(project, tmp_path, monkeypatch):
    project("""
        [tool.routeaudit]
        seeds = [5]
        audits = ["stratification"]
    """)
    project("[tool.routeaudit]\nseeds = [6]\naudits = ['stratification']\n", "other.toml")
    (tmp_path / "sub" / "inner").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sub")
    code, report = run([])
    assert code == 0 and seeds_of(report) == {(5,)}
    assert report["config_sources"]["seeds"] == "../pyproject.toml"
    code, report = run(["--config", "../other.toml"])
    assert seeds_of(report) == {(6,)} and report["config_sources"]["seeds"] == "../other.toml"
    code, report = run(["--no-config", "--seeds", "2", "--audit", "stratification"])
    assert seeds_of(report) == {(2,)} and report["config"]["alpha"] == 0.05
    assert report["config"]["config_file"] is None
    # the nearest pyproject.toml ends the search even without a [tool.routeaudit] table
    (tmp_path / "sub" / "inner" / "pyproject.toml").write_text("[project]\nname = 'inner'\n")
    monkeypatch.chdir(tmp_path / "sub" / "inner")
    code, report = run(["--audit", "stratification", "--seeds", "1"])
    assert report["config_sources"].get("alpha") == "default"
    assert report["config"]["config_file"] == "pyproject.toml"


@pytest.mark.parametrize(("table", "expected"), [
    ("alpah = 0.01", "pyproject.toml [tool.routeaudit]: unknown key 'alpah' (did you mean 'alpha'?)"),
    ("gap-margin = 0.1", "unknown key 'gap-margin' (did you mean 'gap_margin'?)"),
    ("audit = ['stratification']", "unknown key 'audit' (did you mean 'audits'?)"),
    ("mass_min = 0.2", "unknown key 'mass_min': it belongs in [tool.routeaudit.causal_ablation]"),
    ("[tool.routeaudit.causal_ablaton]\nmass_min = 0.2",
     "pyproject.toml [tool.routeaudit]: unknown table 'causal_ablaton' (did you mean 'causal_ablation'?)"),
])
def test_an_unknown_key_is_a_usage_error_naming_it(project, capsys, table, expected):
    project("[tool.routeaudit]\n" + table + "\n")
    assert main(["run", PLANTED]) == 4
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("key", "value", "cli"), [
    ("alpha", "1.5", ["--alpha", "1.5"]),
    ("permutations", "0", ["--permutations", "0"]),
    ("stability", "'most'", ["--stability", "most"]),
])
def test_a_bad_value_names_the_key_with_the_command_lines_own_message(project, capsys, key, value, cli):
    # the command line's complaint, e.g. "argument --alpha: must lie strictly between 0 and 1: 1.5"
    assert main(["run", PLANTED, "--no-config", *cli]) == 4
    last = capsys.readouterr().err.strip().splitlines()[-1]
    cli_reason = last.split(f"argument {cli[0]}: ", 1)[1]
    project(f"[tool.routeaudit]\n{key} = {value}\n")
    assert main(["run", PLANTED]) == 4
    err = capsys.readouterr().err
    assert f"pyproject.toml [tool.routeaudit]: {key}: " in err
    assert f"pyproject.toml [tool.routeaudit]: {key}: {cli_reason}" in err, (cli_reason, err)


@pytest.mark.parametrize(("value", "reason"), [
    ("[0, 'x']", "seeds: expected integers like 0,1,2, not '0,x'"),
    ("[]", "seeds: needs at least one seed"),
    ("true", "seeds: expected a number or a string, not true"),
])
def test_bad_seeds_name_the_key(project, capsys, value, reason):
    project(f"[tool.routeaudit]\nseeds = {value}\n")
    assert main(["run", PLANTED]) == 4
    assert f"pyproject.toml [tool.routeaudit]: {reason}" in capsys.readouterr().err


def test_every_problem_is_reported_at_once_in_file_order(project, capsys):
    project("""
        [tool.routeaudit]
        bins = 0
        alpah = 0.1
    """)
    assert main(["run", PLANTED]) == 4
    err = capsys.readouterr().err
    assert err.index("bins: must be a positive integer: 0") < err.index("unknown key 'alpah'")


def test_a_per_audit_sub_table_sets_that_audits_options(project):
    project("""
        [tool.routeaudit]
        audits = ["stratification"]
        seeds = [0]

        [tool.routeaudit.causal_ablation]
        mass_min = 0.2
        depth_bands = 3

        [tool.routeaudit.expert_calibration]
        ece_tol = 0.05
    """)
    code, report = run(["--depth-bands", "4"])
    assert code == 0
    config, sources = report["config"], report["config_sources"]
    assert (config["mass_min"], config["depth_bands"], config["ece_tol"]) == (0.2, 4, 0.05)
    assert sources["mass_min"] == sources["ece_tol"] == "pyproject.toml"
    assert sources["depth_bands"] == "command line"


@pytest.mark.parametrize(("table", "expected"), [
    ("mass_mn = 0.2", "pyproject.toml [tool.routeaudit.causal_ablation]: unknown key 'mass_mn' "
                      "(did you mean 'mass_min'?)"),
    ("nll_margin = -1", "pyproject.toml [tool.routeaudit.causal_ablation]: nll_margin: must be a "
                        "non-negative number: -1"),
    ("no_renormalize = 1", "[tool.routeaudit.causal_ablation]: no_renormalize: expected true or false"),
])
def test_a_mistake_in_a_sub_table_is_named(project, capsys, table, expected):
    project("[tool.routeaudit.causal_ablation]\n" + table + "\n")
    assert main(["run", PLANTED]) == 4
    assert expected in capsys.readouterr().err


def test_a_blocked_plugins_sub_table_is_ignored(project):
    project("""
        [tool.routeaudit]
        audits = ["stratification"]
        seeds = [0]
        [tool.routeaudit.causal_ablation]
        mass_min = 0.2
    """)
    code, report = run(["-p", "no:causal_ablation"])
    assert code == 0 and "mass_min" not in report["config"]


def test_plugins_load_plugin_files_relative_to_the_file(project, tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_plugin.py").write_text(PLUGIN)
    project("""
        [tool.routeaudit]
        plugins = ["plugins/my_plugin.py"]
        audits = ["stratification"]
        seeds = [0]

        [tool.routeaudit.my_plugin]
        my_level = 7
    """)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # the path is relative to pyproject.toml, not here
    code, report = run([])
    assert code == 0
    config, sources = report["config"], report["config_sources"]
    assert config["my_plugin_loaded"] is True  # its routeaudit_configure ran
    assert config["my_level"] == 7 and sources["my_level"] == "../pyproject.toml"
    assert [Path(p).name for p in config["plugins"]] == ["my_plugin.py"]
    assert sources["plugins"] == "../pyproject.toml"


def test_a_missing_plugin_file_or_config_file_is_a_usage_error(project, capsys):
    project("[tool.routeaudit]\nplugins = ['nope.py']\n")
    assert main(["run", PLANTED]) == 4
    assert "pyproject.toml [tool.routeaudit]: plugins: no such plugin file 'nope.py'" in \
        capsys.readouterr().err
    assert main(["run", PLANTED, "--config", "missing.toml"]) == 4
    assert "--config missing.toml: no such file" in capsys.readouterr().err
    project("[tool.routeaudit\nalpha = 0.1\n")
    assert main(["run", PLANTED]) == 4
    assert "pyproject.toml: not valid TOML" in capsys.readouterr().err
