"""``routeaudit summaries``: every routing summary with its definition, like pytest --markers."""

from __future__ import annotations

import re
import textwrap

import pytest

from routeaudit.cli import main
from routeaudit.summaries import default_registry

PLUGIN = '''
import numpy as np
import routeaudit


@routeaudit.hookimpl
def routeaudit_register_summaries(registry):
    registry.register("my_spread", lambda ts: np.zeros(ts.n_examples),
                      "spread of the routing as my lab defines it", applies_to="experts")
'''


def listing(out: str) -> dict[str, tuple[str, str]]:
    """name -> (bracketed traits line, definition): the blocks of the listing."""
    blocks: dict[str, tuple[str, str]] = {}
    name = None
    for line in out.splitlines():
        head = re.match(r"^(\S.*?)  \[(.*?)\](.*)$", line)
        if head:
            name = head.group(1)
            blocks[name] = (head.group(2) + head.group(3), "")
        elif line.startswith("    ") and name is not None:
            traits, text = blocks[name]
            blocks[name] = (traits, (text + " " + line.strip()).strip())
    return blocks


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pyproject.toml above a pytest tmp dir
    return tmp_path


def test_every_built_in_summary_is_listed_with_a_definition(in_tmp, capsys):
    assert main(["summaries"]) == 0
    blocks = listing(capsys.readouterr().out)
    names = [s.name for s in default_registry()]
    assert len(names) >= 12
    for name in names:
        assert name in blocks, name
        assert len(blocks[name][1].split()) >= 4, (name, blocks[name])  # a definition, not a word
    assert "H<l>, H<l>_norm" in blocks
    # what each is, from the definitions in docs/methods.md §2.1 and §4
    assert blocks["r_agg"][0] == "routing scalar, any sources, default claim"
    assert blocks["depth_variance"][0] == "routing scalar, depth sources only, default claim"
    assert blocks["top1_expert"][0] == "routing label, experts only"
    assert blocks["profile"][0].startswith("routing profile")
    assert "default claim" not in blocks["profile"][0]
    assert blocks["confidence"][0] == "output scalar, any sources"
    assert "top-2" in blocks["top1_margin"][1] and "log n_l" in blocks["r_agg_normalized"][1]


def test_a_plugin_registered_summary_is_listed(in_tmp, capsys):
    (in_tmp / "my_summaries.py").write_text(PLUGIN)
    assert main(["summaries", "-p", "my_summaries.py"]) == 0
    blocks = listing(capsys.readouterr().out)
    assert blocks["my_spread"] == ("routing scalar, experts only, default claim  (plugin)",
                                   "spread of the routing as my lab defines it")
    assert "(plugin)" not in blocks["r_agg"][0]


def test_plugins_from_pyproject_count_and_a_raising_plugin_is_an_error_row(in_tmp, capsys):
    (in_tmp / "my_summaries.py").write_text(PLUGIN)
    (in_tmp / "pyproject.toml").write_text('[tool.routeaudit]\nplugins = ["my_summaries.py"]\n')
    assert main(["summaries"]) == 0
    assert "my_spread" in listing(capsys.readouterr().out)
    (in_tmp / "bad_summaries.py").write_text(textwrap.dedent('''
        import routeaudit

        @routeaudit.hookimpl
        def routeaudit_register_summaries(registry):
            raise RuntimeError("cannot register")
    '''))
    assert main(["summaries", "--no-config", "-p", "bad_summaries.py"]) == 1
    out = capsys.readouterr().out
    assert "bad_summaries  [error]" in out and "cannot register" in out
    assert "r_agg" in listing(out)
