"""`routeaudit validate`: the simulation study behind the verdicts, for a user's own setting."""

from __future__ import annotations

import textwrap

import pytest

import routeaudit.session.validate as validate
from routeaudit.cli import QUICK_REPLICATES, main
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.stats.rates import bound, proportion_ci, rate_text

FAST = ["--permutations", "49", "--bootstrap", "50", "--seeds", "0,1"]


def test_wilson_interval_matches_statsmodels():
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    for k, n in ((0, 20), (3, 20), (19, 20), (250, 500)):
        lo, hi = proportion.proportion_confint(k, n, alpha=0.05, method="wilson")
        assert proportion_ci(k, n) == pytest.approx((lo, hi), abs=1e-12)
    assert bound(0.05, 100) == pytest.approx(0.05 + 2 * (0.05 * 0.95 / 100) ** 0.5)
    assert rate_text([True, False, False, False]).endswith("(1/4)")


def test_quick_constant_is_the_one_the_driver_uses():
    assert validate.QUICK["replicates"] == QUICK_REPLICATES


def test_validate_prints_the_three_figures_for_the_matched_audits(tmp_path, capsys):
    path = tmp_path / "t.npz"
    make_traces("planted", 4000, seed=1, n_layers=3, n_classes=4).save_npz(path)
    code = main(["validate", str(path), "--quick", "--replicates", "6", *FAST,
                 "--audit", "stratification", "--audit", "permutation_null", "--audit",
                 "content_dependence"])
    out = capsys.readouterr().out
    assert code in (0, 1)
    # the target's shape is read from it
    assert "N = 4000 examples (N_eval = 2000), 3 routing layers, 4 classes, seeds 0,1" in out
    for audit in ("stratification", "permutation_null"):
        assert f"\n{audit}[" in out
    assert out.count("false pass (planted 0)") == 2
    assert out.count("minimal detectable effect at 80% power") == 2
    assert "content_dependence: not simulated" in out
    # one row per planted size, each with three rates that add up to 1
    rows = [line.split() for line in out.splitlines()
            if line.strip() and line.split()[0] in {"0", "0.05", "0.075", "0.1", "0.2", "0.3"}]
    assert len(rows) == 12
    for row in rows:
        rates = [float(row[i]) for i in (2, 4, 6)]
        assert sum(rates) == pytest.approx(1.0, abs=0.02)
    # the planted null is never passed (6 replicates: any pass would be a red flag)
    null_rows = [r for r in rows if r[0] == "0"]
    assert all(float(r[2]) == 0.0 for r in null_rows)


PLUGIN = textwrap.dedent('''
    import routeaudit
    from routeaudit.fixtures.synthetic import make_traces


    class Accuracy(routeaudit.BaseAudit):
        name = "accuracy_floor"
        claim = "accuracy is at least one half"

        def cells(self, ctx):
            return [{"metric": "accuracy"}]

        def run(self, ctx, cells):
            outcomes = [routeaudit.SeedOutcome(s.seed, holds=float(s.conf_correct()[1].mean()) > 0.5,
                                               effect=float(s.conf_correct()[1].mean()) - 0.5)
                        for s in ctx.seeds]
            return [ctx.verdict_from_seeds(self, cells[0], outcomes)]


    class Opaque(routeaudit.BaseAudit):
        name = "opaque"
        claim = "something"

        def cells(self, ctx):
            return [{}]

        def run(self, ctx, cells):
            return []


    @routeaudit.hookimpl
    def routeaudit_collect_audits(config):
        return [Accuracy(), Opaque()]


    @routeaudit.hookimpl
    def routeaudit_planted_cases(audit, config):
        if audit.name == "opaque":
            return "needs a model the simulation cannot build"
        if audit.name != "accuracy_floor":
            return None
        def generate(effect, *, n, seed, n_layers, n_classes):
            return make_traces("null", n, seed=seed, n_layers=n_layers, n_classes=n_classes)
        return routeaudit.PlantedCases(generate, (0.0, 0.1), "synthetic accuracy")
''')


def test_plugin_audits_take_part_through_the_hook_or_say_why_not(tmp_path, capsys):
    plugin = tmp_path / "my_audits.py"
    plugin.write_text(PLUGIN)
    path = tmp_path / "t.npz"
    make_traces("null", 1000, seed=2).save_npz(path)
    code = main(["validate", str(path), "-p", str(plugin), "--replicates", "3", *FAST,
                 "--audit", "accuracy_floor", "--audit", "opaque"])
    out = capsys.readouterr().out
    assert "opaque: not simulated: needs a model the simulation cannot build" in out
    assert "accuracy_floor[accuracy]: synthetic accuracy" in out
    assert code in (0, 1)


def test_validate_without_a_target_or_simulable_audit_is_a_clear_usage_result(tmp_path, capsys):
    path = tmp_path / "t.npz"
    make_traces("null", 1000, seed=2).save_npz(path)
    assert main(["validate", str(path), "--audit", "content_dependence", *FAST]) == 5
    assert "no selected audit can be simulated" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "missing.npz")]) == 4
