"""Reports never overwrite what routeaudit did not write, and appear atomically."""

from __future__ import annotations

import os
import stat

import pytest

from routeaudit.cli import main
from routeaudit.errors import UsageError
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.report.files import check_target, write_atomic

FAST = ["--permutations", "99", "--bootstrap", "100", "--seeds", "0", "--audit",
        "permutation_null", "-q"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("reports") / "planted.npz"
    make_traces("planted", 2000, seed=5).save_npz(path)
    return str(path)


@pytest.mark.parametrize("option", ["--json", "--junitxml", "--html"])
def test_a_users_file_is_refused_before_the_run_and_left_untouched(npz, tmp_path, option,
                                                                   capsys):
    precious = tmp_path / "notes.txt"
    precious.write_text("my notes")
    assert main(["run", npz, *FAST, option, str(precious)]) == 4
    assert precious.read_text() == "my notes"
    err = capsys.readouterr().err
    assert "notes.txt" in err and "not a routeaudit" in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--json", "--junitxml", "--html"])
def test_a_previous_report_is_replaced_and_no_temporary_file_is_left(npz, tmp_path, option):
    out = tmp_path / "report.out"
    assert main(["run", npz, *FAST, option, str(out)]) in (0, 1)
    first = out.read_bytes()
    assert main(["run", npz, *FAST, option, str(out), "--seeds", "1"]) in (0, 1)
    assert out.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.out"]


def test_a_report_is_readable_like_any_file_the_user_writes(tmp_path):
    target = write_atomic(tmp_path / "r.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_a_directory_is_not_a_report_path(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        check_target(tmp_path, "json", "--json")


def test_interrupted_write_keeps_the_old_report(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    write_atomic(target, '{"routeaudit_version": "old"}')

    def broken(fd):
        raise OSError("disk full")

    monkeypatch.setattr("routeaudit.report.files.os.fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, '{"routeaudit_version": "new"}')
    assert target.read_text() == '{"routeaudit_version": "old"}'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
