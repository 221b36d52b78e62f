"""`routeaudit extract -o DIR` never loses what is already there."""

from __future__ import annotations

from pathlib import Path

from routeaudit.cli import main
from routeaudit.traces import TraceSet

ADAPTER = str(Path(__file__).resolve().parents[1] / "fixtures" / "calibrator_genuine.py")


def test_extract_into_a_folder_with_unrelated_files_leaves_them_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    for extra in ([], ["--force"]):  # --force replaces only a routeaudit trace directory
        assert main(["extract", ADAPTER, "-o", str(out), "-q", *extra]) == 4
        assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
        assert (out / "thesis.tex").read_text() == "three years of work"
        err = capsys.readouterr().err
        assert str(out) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left behind


def test_extract_refuses_to_overwrite_traces_unless_forced(tmp_path):
    out = tmp_path / "traces"
    assert main(["extract", ADAPTER, "-o", str(out), "-q"]) == 0
    first = TraceSet.load(out)
    assert main(["extract", ADAPTER, "-o", str(out), "-q"]) == 4
    assert main(["extract", ADAPTER, "-o", str(out), "-q", "--force"]) == 0
    assert TraceSet.load(out).n_examples == first.n_examples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traces"]
