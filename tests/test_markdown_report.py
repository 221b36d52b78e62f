"""The markdown summary: what it says, that user text cannot break its tables or inject
HTML, that $GITHUB_STEP_SUMMARY is appended to (never truncated), and that a bad path is a
usage error before the run."""

from __future__ import annotations

import pytest

from routeaudit.cli import main
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.report.markdown import MARKER, to_markdown
from routeaudit.verdict import Report, Status, Summary, Verdict

FAST = ["--permutations", "99", "--bootstrap", "100", "--seeds", "0", "--audit",
        "permutation_null", "-qq"]
NASTY = "a|b `tick` <script>alert(1)</script>\nsecond line *bold* [link](http://x)"


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("markdown") / "planted.npz"
    make_traces("planted", 2000, seed=5).save_npz(path)
    return str(path)


@pytest.fixture(autouse=True)
def no_step_summary(monkeypatch):
    """CI sets $GITHUB_STEP_SUMMARY; these tests decide for themselves."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def cells(row: str) -> list[str]:
    """Split a GitHub table row the way GitHub does: a backslash takes the next character
    with it, so only a bare pipe separates cells (written here independently of the code)."""
    out, cell, i = [], "", 0
    body = row.strip()
    assert body.startswith("|") and body.endswith("|"), row
    body = body[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            cell += body[i:i + 2]
            i += 2
            continue
        if body[i] == "|":
            out.append(cell.strip())
            cell = ""
        else:
            cell += body[i]
        i += 1
    out.append(cell.strip())
    return out


def verdict(audit: str, status: Status, *, reason: str = "why", cell: str = "c",
            effect: float | None = 0.123456789, target: str = "t.npz") -> Verdict:
    return Verdict(audit=audit, claim="claim", cell={"summary": cell}, status=status,
                   effect=effect, ci=(0.0123456, 0.2345678) if effect is not None else None,
                   reason=reason, target=target)


def make_report(verdicts: list[Verdict], exit_code: int = 1, *,
                sources: dict[str, str] | None = None) -> Report:
    config = {"alpha": 0.05, "keyword": "a|b`c", "seeds": [0, 1]}
    return Report(routeaudit_version="0.0", exit_code=exit_code, targets=["t.npz"],
                  seeds=[0, 1], config=config, config_sources=sources or {},
                  verdicts=verdicts, summary=Summary.of(verdicts), duration_s=1.5)


def section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def test_summary_has_result_counts_failing_table_and_folded_passes():
    rows = [verdict("stratification", Status.FAIL, cell="r_agg"),
            verdict("stratification", Status.ERROR, cell="H1", effect=None),
            verdict("permutation_null", Status.INCONCLUSIVE, cell="r_agg"),
            verdict("permutation_null", Status.PASS, cell="H1"),
            verdict("permutation_null", Status.PASS, cell="H2"),
            verdict("causal_ablation", Status.SKIP, cell="x", effect=None)]
    text = to_markdown(make_report(rows, exit_code=1))
    lines = text.splitlines()
    assert lines[0] == MARKER
    assert lines[1].startswith("## ") and "failed" in lines[1] and "exit 1" in lines[1]
    header = next(i for i, line in enumerate(lines) if "fail" in line and "skip" in line
                  and line.startswith("|"))
    names = [c.split()[-1] for c in cells(lines[header])]
    counts = dict(zip(names, (int(c) for c in cells(lines[header + 2])), strict=True))
    assert counts == {"fail": 1, "error": 1, "inconclusive": 1, "pass": 2, "skip": 1}
    failing = section(text, "### Claims that did not pass", "<details>")
    body = [cells(line) for line in failing.splitlines() if line.startswith("| `")]
    assert [row[1].split()[-1] for row in body] == ["fail", "error", "inconclusive"]
    assert body[0][0] == "`t.npz::stratification[r_agg]`"
    assert body[0][3] == "0.1235 [0.01235, 0.2346]"  # 4 significant digits
    assert body[1][3] == ""  # an error has no effect
    passes = section(text, "<summary>2 passed</summary>", "</details>")
    assert "permutation_null[H1]" in passes and "permutation_null[H2]" in passes
    assert "permutation_null[H1]" not in failing
    assert text.count("permutation_null[H1]") == 1


def test_overall_result_follows_the_exit_code():
    passing = to_markdown(make_report([verdict("a", Status.PASS)], exit_code=0))
    assert "passed" in passing.splitlines()[1] and "Claims that did not pass" not in passing
    nothing = to_markdown(make_report([verdict("a", Status.SKIP)], exit_code=5))
    assert "nothing audited" in nothing.splitlines()[1]


def test_user_text_cannot_break_a_table_or_inject_html():
    bad = verdict("stratification", Status.FAIL, reason=NASTY, target="we|ird`t.npz")
    text = to_markdown(make_report([bad]))
    assert "<script" not in text and "</script" not in text
    rows = [line for line in text.splitlines() if "stratification" in line]
    assert len(rows) == 1  # the newline in the reason did not end the row
    row = cells(rows[0])
    assert len(row) == 4  # the pipes in the target and the reason split nothing
    node, _, reason, _ = row
    assert node.startswith("``") and node.endswith("``")  # a fence longer than the backtick
    assert "second line" in reason and "\n" not in reason
    unescaped = [ch for i, ch in enumerate(reason)
                 if ch in "`*[" and (i == 0 or reason[i - 1] != "\\")]
    assert unescaped == []
    assert "&lt;script&gt;" in reason


def test_configuration_with_sources_is_folded_and_escaped():
    sources = {"alpha": "command line", "keyword": "pyproject.toml", "seeds": "default"}
    text = to_markdown(make_report([verdict("a", Status.PASS)], 0, sources=sources))
    config = section(text, "<summary>Configuration (3 options)</summary>", "</details>")
    rows = {cells(line)[0]: cells(line)[1:] for line in config.splitlines()
            if line.startswith("| `")}
    assert rows["`alpha`"] == ["`0.05`", "command line"]
    # a pipe and a backtick in a value: escaped pipe, longer fence, still three cells
    assert rows["`keyword`"] == ["``a\\|b`c``", "pyproject.toml"]
    assert rows["`seeds`"] == ["`0, 1`", "default"]
    no_sources = to_markdown(make_report([verdict("a", Status.PASS)], 0))
    header = next(line for line in no_sources.splitlines() if line.startswith("| option"))
    assert cells(header) == ["option", "value"]


def test_step_summary_is_appended_to_and_never_truncated(npz, tmp_path, monkeypatch):
    summary = tmp_path / "step_summary.md"
    summary.write_text("# Build\n\nearlier step's summary\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert main(["run", npz, *FAST]) in (0, 1)  # no --markdown: the summary is still written
    after_one = summary.read_text()
    assert after_one.startswith("# Build\n\nearlier step's summary\n")
    assert after_one.count(MARKER) == 1 and "permutation_null" in after_one
    out = tmp_path / "pr.md"
    assert main(["run", npz, *FAST, "--markdown", str(out)]) in (0, 1)
    after_two = summary.read_text()
    assert after_two.startswith(after_one) and after_two.count(MARKER) == 2
    assert after_two.endswith(out.read_text())  # the same summary in both places


def test_markdown_file_is_written_and_replaced_on_a_second_run(npz, tmp_path):
    out = tmp_path / "pr.md"
    code = main(["run", npz, *FAST, "--markdown", str(out)])
    first = out.read_text()
    assert first.startswith(MARKER)
    assert {0: "passed", 1: "failed"}[code] in first.splitlines()[1] and f"exit {code}" in first
    assert main(["run", npz, *FAST, "--markdown", str(out), "--seeds", "1"]) in (0, 1)
    assert out.read_text().count(MARKER) == 1  # replaced, not appended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pr.md"]


def test_a_directory_or_a_users_file_is_a_usage_error_before_the_run(npz, tmp_path, capsys):
    assert main(["run", npz, *FAST, "--markdown", str(tmp_path)]) == 4
    err = capsys.readouterr().err
    assert "--markdown" in err and "is a directory" in err and "Traceback" not in err
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    assert main(["run", npz, *FAST, "--markdown", str(notes)]) == 4
    assert notes.read_text() == "my notes"
    assert "not a routeaudit" in capsys.readouterr().err


def test_step_summary_that_is_a_directory_is_a_usage_error(npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path))
    assert main(["run", npz, *FAST]) == 4
    assert "GITHUB_STEP_SUMMARY" in capsys.readouterr().err
