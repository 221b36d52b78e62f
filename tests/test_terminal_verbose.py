"""``-v`` is readable (no 17-digit floats, tables, cut lists), and a ``-k`` that selects
nothing says so (exit 5, as for any run with nothing audited)."""

from __future__ import annotations

import json
import re

import pytest

from routeaudit.cli import main
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.report.terminal import detail_lines
from routeaudit.verdict import ExitCode

FAST = ["--permutations", "99", "--bootstrap", "100", "--seeds", "0,1"]
#: Every number with a decimal point or an exponent, as printed.
FLOAT = re.compile(r"(?<![\w.])-?(\d+\.\d*|\.\d+|\d+)(e[+-]?\d+)?(?![\w.])", re.IGNORECASE)


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("verbose") / "planted.npz"
    make_traces("planted", 2000, seed=5).save_npz(path)
    return str(path)


def significant_digits(mantissa: str) -> int:
    """Significant digits of a printed decimal (leading zeros do not count)."""
    digits = mantissa.replace("-", "").replace(".", "").lstrip("0")
    return len(digits)


def test_verbose_prints_no_float_with_more_than_6_significant_digits(npz, capsys):
    main(["run", npz, *FAST, "--audit", "stratification", "--audit", "content_dependence",
          "-v"])
    out = capsys.readouterr().out
    assert "per_seed:" in out and "evidence:" in out and "threshold:" in out
    floats = [m.group(0) for m in FLOAT.finditer(out) if "." in m.group(1) or m.group(2)]
    assert len(floats) > 50  # the detail is there, not dropped
    too_long = [f for f in floats if significant_digits(FLOAT.match(f).group(1)) > 6]
    assert too_long == []


def test_verbose_per_seed_records_are_a_table(npz, capsys):
    main(["run", npz, *FAST, "--audit", "stratification", "-k", "r_agg and not normalized",
          "-v"])
    out = capsys.readouterr().out
    lines = out[out.index("per_seed:"):].splitlines()
    header = lines[1].split()
    assert header[:3] == ["seed", "weighted_gap", "max_gap"] and "ci" in header
    assert set(lines[2].replace(" ", "")) == {"-"}  # tabulate's rule under the header
    assert [line.split()[0] for line in lines[3:5]] == ["0", "1"]


def test_detail_lines_indent_round_and_cut():
    value = {"estimate": 0.1050193366, "interval": [0.078125186, 0.1319134863],
             "data_needed": {"factor": 1.0, "toward": "pass"},
             "grid": list(range(20)),
             "rows": [{"layer": f"L{i}", "tv": 1 / 3} for i in range(15)]}
    lines = detail_lines(value)
    assert "estimate: 0.105" in lines
    assert "interval: [0.07813, 0.1319]" in lines
    assert lines[lines.index("data_needed:") + 1] == "  factor: 1"
    assert "grid: [0, 1, 2, 3, 4, 5, 6, 7, … (12 more)]" in lines
    start = lines.index("rows:")
    assert lines[start + 1].split() == ["layer", "tv"]
    assert lines[start + 3].split() == ["L0", "0.3333"]
    assert lines[-1].strip() == "… (3 more)"  # 15 rows, 12 shown


def test_keyword_that_matches_nothing_says_so_and_exits_5(npz, tmp_path, capsys):
    out = tmp_path / "all.json"
    main(["run", npz, *FAST, "--json", str(out), "-qq"])
    n_nodes = len(json.loads(out.read_text())["verdicts"])  # one node id per verdict row
    capsys.readouterr()
    code = main(["run", npz, *FAST, "-k", "no_such_thing"])
    assert code == ExitCode.NO_AUDITS == 5
    err = capsys.readouterr().err
    assert f"-k 'no_such_thing' matched none of the {n_nodes} cells" in err
    assert "node ids look like TARGET::audit[cell]" in err
    assert f"{npz}::" in err  # a real id to copy from


def test_keyword_within_audit_names_the_audit(npz, tmp_path, capsys):
    out = tmp_path / "one.json"
    main(["run", npz, *FAST, "--audit", "permutation_null", "--json", str(out), "-qq"])
    n_cells = len(json.loads(out.read_text())["verdicts"])
    capsys.readouterr()
    code = main(["run", npz, *FAST, "--audit", "permutation_null", "-k", "nope", "-q"])
    assert code == 5
    err = capsys.readouterr().err
    assert f"matched none of the {n_cells} cells of --audit permutation_null" in err


def test_a_keyword_that_matches_says_nothing(npz, capsys):
    main(["run", npz, *FAST, "--audit", "permutation_null", "-k", "r_agg", "-q"])
    assert "matched none" not in capsys.readouterr().err
