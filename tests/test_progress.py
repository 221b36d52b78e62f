"""Progress bars (tqdm) appear on a terminal only, never under -q, and never change a result."""

from __future__ import annotations

import io
import json
import sys

import pytest

from routeaudit.cli import main
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.model.extract import Progress

SEEDS = [0, 1]
FAST = ["--permutations", "99", "--bootstrap", "100", "--seeds", ",".join(map(str, SEEDS)),
        "--audit", "permutation_null"]


class Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("progress") / "planted.npz"
    make_traces("planted", 2000, seed=5).save_npz(path)
    return str(path)


def run(npz, tmp_path, monkeypatch, *, stderr, stdout=None, extra=()):
    monkeypatch.setattr(sys, "stderr", stderr)
    if stdout is not None:
        monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / "r.json"
    code = main(["run", npz, *FAST, "--json", str(out), *extra])
    monkeypatch.undo()
    return code, json.loads(out.read_text())


def test_extraction_progress_draws_on_a_terminal_only():
    def drive(stream, **kw):
        bar = Progress("extracting toy", total=3, stream=stream, **kw)
        for _ in range(3):
            bar.update(5)
        bar.close()
        return stream.getvalue()

    assert drive(io.StringIO()) == ""  # auto, not a terminal
    assert drive(Tty(), mode=False) == ""  # -q passes progress=False
    text = drive(Tty())
    assert text.startswith("\rextracting toy: batch 1/3, 5 examples")
    assert "batch 3/3, 15 examples" in text and "examples/s" in text and text.endswith("\n")
    forced = drive(io.StringIO(), mode="always")  # logs: drawn anywhere when asked
    assert "batch 3/3, 15 examples" in forced


def test_audit_grid_bar_on_a_terminal_counts_cells_times_seeds(npz, tmp_path, monkeypatch):
    err = Tty()
    _, report = run(npz, tmp_path, monkeypatch, stderr=err)
    cells = len([v for v in report["verdicts"] if v["audit"] == "permutation_null"])
    text = err.getvalue()
    assert "auditing" in text and f"0/{cells * len(SEEDS)} cell-seeds" in text
    # the phase inside the audit (AuditContext.step): which summary and seed is being permuted
    phases = [line for line in text.split("\r") if "permutation_null: permutations and bootstrap: " in line]
    assert {seed for seed in SEEDS if any(f", seed {seed}" in line for line in phases)} == set(SEEDS)
    assert text.endswith("\r")  # the bar clears its line before the report is printed


def test_no_bar_off_a_terminal_or_under_quiet(npz, tmp_path, monkeypatch):
    piped = io.StringIO()
    run(npz, tmp_path, monkeypatch, stderr=piped)
    assert piped.getvalue() == ""
    quiet = Tty()
    run(npz, tmp_path, monkeypatch, stderr=quiet, extra=["-q"])
    assert quiet.getvalue() == ""


def test_the_bar_changes_no_result(npz, tmp_path, monkeypatch):
    code_bar, with_bar = run(npz, tmp_path, monkeypatch, stderr=Tty())
    code_plain, plain = run(npz, tmp_path, monkeypatch, stderr=io.StringIO())
    assert code_bar == code_plain
    assert with_bar["verdicts"] == plain["verdicts"]


def test_verdict_marks_give_way_to_the_bar_on_one_terminal(npz, tmp_path, monkeypatch):
    marks = {"pass": ".", "fail": "F", "inconclusive": "I", "error": "E", "skip": "s"}
    shared, marks_only = Tty(), Tty()
    run(npz, tmp_path, monkeypatch, stderr=Tty(), stdout=shared)
    _, report = run(npz, tmp_path, monkeypatch, stderr=io.StringIO(), stdout=marks_only)
    expected = "".join(marks[v["status"]] for v in report["verdicts"])
    assert marks_only.getvalue().splitlines()[0] == expected  # no bar: marks as before
    assert not shared.getvalue().startswith(expected)  # a bar on the same terminal: none
