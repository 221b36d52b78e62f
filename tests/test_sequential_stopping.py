"""Besag–Clifford sequential stopping, on by default (``--sequential-h 20``), stays valid for
both audits that share the permutation test: the p-value of ``permutation_null`` and the
null mean (an unbiased estimate, with its Monte Carlo variance) behind the excess gap of
``stratification`` (docs/methods.md §2.4, §2.5). Simulations are seeded and cheap."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

import routeaudit.stats.permutation as permutation
from routeaudit.audit import AuditSettings
from routeaudit.cli import main
from routeaudit.stats.excess import excess_interval, excess_row, matched_excess
from routeaudit.stats.partitions import MatchedPartition
from routeaudit.stats.permutation import within_bin_permutation_test
from routeaudit.testing import run_report

ROOT = Path(__file__).resolve().parents[1]
NULL_NPZ = str(ROOT / "fixtures" / "confounded_null.npz")
KW = dict(n_bins=3, n_strata=3)
H_SMALL = 5


def null_cells(seed: int, n: int = 300, effect: float = 0.0):
    """Three confidence bins with one confidence each, random routing strata, y ~ Bernoulli:
    residuals are exchangeable inside a bin, so the within-bin null holds exactly
    (``effect`` > 0 lowers accuracy in stratum 2 and breaks it)."""
    gen = np.random.default_rng(seed)
    bins = gen.integers(0, 3, n)
    strata = gen.integers(0, 3, n)
    c = np.array([0.55, 0.7, 0.85])[bins]
    y = (gen.random(n) < c - effect * (strata == 2)).astype(float)
    return bins, strata, y - c


def draws_in_mean(r) -> int:
    """m of docs/methods.md §2.5, from the recorded counts: the draws before the h-th
    exceedance when it was reached, else all of them."""
    return r.n_permutations - 1 if r.exceedances >= H_SMALL else r.n_permutations


def test_the_null_mean_is_unbiased_under_stopping_and_the_plain_mean_is_not():
    cells = null_cells(11)
    ref = within_bin_permutation_test(*cells, **KW, n_permutations=100_000, rng=2024)
    assert 0.15 < ref.p_value < 0.75  # stopping happens early: the bias has room to show
    runs = [within_bin_permutation_test(*cells, **KW, n_permutations=199, rng=seed,
                                        sequential_h=H_SMALL) for seed in range(2000)]
    lengths = np.array([r.n_permutations for r in runs])
    assert np.mean([r.stopped_early for r in runs]) > 0.95 and lengths.mean() < 40
    new = np.array([r.null_mean for r in runs])
    naive = np.array([r.null.mean() for r in runs])  # every drawn T*, the last one a hit

    def z(values: np.ndarray) -> float:
        se = np.hypot(values.std(ddof=1) / np.sqrt(values.size), ref.null_sd / np.sqrt(100_000))
        return float((values.mean() - ref.null_mean) / se)

    assert abs(z(new)) < 4
    assert z(naive) > 6  # the plain mean of the L draws is biased upward, visibly here
    # the recorded Monte Carlo variance is the spread the estimate really has, run to run
    assert 0.8 < new.var(ddof=1) / np.mean([r.null_mean_var for r in runs]) < 1.25
    for r in runs[:50]:  # and it is the mean of the m draws before the h-th exceedance
        m = draws_in_mean(r)
        assert r.null_mean == pytest.approx(np.mean(r.null[:m]), rel=1e-12)
        assert r.null_mean_var == pytest.approx(np.var(r.null[:m], ddof=1) / m, rel=1e-12)


def test_sequential_p_values_are_valid_under_the_null():
    ps = np.array([within_bin_permutation_test(*null_cells(5000 + rep), **KW, n_permutations=199,
                                               rng=rep, sequential_h=20).p_value
                   for rep in range(400)])
    for alpha in (0.05, 0.1, 0.25):
        assert np.mean(ps <= alpha) <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / ps.size)
    assert np.mean(ps <= 0.5) > 0.35  # valid, not merely p = 1


def test_a_planted_effect_is_still_detected_without_an_early_stop():
    r = within_bin_permutation_test(*null_cells(3, n=1500, effect=0.3), **KW, n_permutations=199,
                                    rng=0, sequential_h=20)
    assert r.p_value == 1 / 200 and r.exceedances == 0
    assert not r.stopped_early and r.n_permutations == 199 == r.null.size
    assert r.null_mean == pytest.approx(r.null.mean(), rel=1e-12)  # all B: nothing dropped
    assert r.null_mean_var == pytest.approx(r.null.var(ddof=1) / 199, rel=1e-12)


def test_results_do_not_depend_on_the_chunk_size_with_stopping_on():
    cells = null_cells(7)
    base = within_bin_permutation_test(*cells, **KW, n_permutations=999, rng=4, sequential_h=20)
    assert base.stopped_early
    for chunk in (1, 3, 64, 999):
        other = within_bin_permutation_test(*cells, **KW, n_permutations=999, rng=4,
                                            sequential_h=20, chunk_size=chunk)
        assert (other.p_value, other.n_permutations, other.null_mean, other.null_mean_var) == \
            (base.p_value, base.n_permutations, base.null_mean, base.null_mean_var)
    off = within_bin_permutation_test(*cells, **KW, n_permutations=999, rng=4, sequential_h=0)
    assert off.n_permutations == 999 and not off.stopped_early  # 0 means no early stop
    assert np.array_equal(off.null[: base.n_permutations], base.null)


def dumps(report) -> list[dict]:
    return [v.model_dump(mode="json") for v in report.verdicts]


def test_verdicts_are_deterministic_and_chunk_free_with_the_default(monkeypatch):
    args = [NULL_NPZ, "--audit", "permutation_null", "--audit", "stratification",
            "--seeds", "0,1", "--bootstrap", "100", "--summary", "r_agg"]
    first = run_report(args)
    rows = [e for v in first.verdicts for e in v.per_seed]
    assert rows and all(e["stopped_early"] and e["n_permutations"] < 999 for e in rows)
    assert all(e["null_mean_sd"] > 0 for e in rows)
    assert dumps(run_report(args)) == dumps(first)
    monkeypatch.setattr(permutation, "_COMPILED_CHUNK", 1 << 8)  # a handful of rows per chunk
    monkeypatch.setattr(permutation, "_NUMPY_CHUNK", 2)
    assert dumps(run_report(args)) == dumps(first)


def test_the_default_is_20_and_0_turns_it_off_on_the_command_line_and_in_the_file(tmp_path,
                                                                                  monkeypatch):
    assert AuditSettings().sequential_h == 20
    monkeypatch.chdir(tmp_path)
    args = ["run", NULL_NPZ, "--audit", "permutation_null", "--seeds", "0", "--bootstrap", "100",
            "--permutations", "199", "--summary", "r_agg", "-qq"]

    def per_seed(extra: list[str], out: str) -> tuple[dict, dict]:
        main([*args, "--json", out, *extra])
        report = json.loads(Path(out).read_text())
        return report["config"], report["verdicts"][0]["per_seed"][0]

    config, row = per_seed([], "default.json")
    assert config["sequential_h"] == 20 and row["stopped_early"]
    config, row = per_seed(["--sequential-h", "0"], "off.json")
    assert config["sequential_h"] == 0 and row["n_permutations"] == 199 and not row["stopped_early"]
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.routeaudit]
        sequential_h = 0
    """))
    config, row = per_seed([], "file.json")
    assert config["sequential_h"] == 0 and row["n_permutations"] == 199
    assert main([*args, "--sequential-h", "-1"]) == 4  # a usage error, as for other counts
    assert main([*args, "--sequential-h", "1"]) == 4  # a stop at draw 1 leaves no null mean


@pytest.mark.parametrize("h", [H_SMALL, None])
def test_the_excess_variance_counts_the_monte_carlo_error_of_the_null_mean(h):
    bins, strata, res = null_cells(21, n=400)
    part = MatchedPartition(bins, strata, res, 3, 3, None)
    row = matched_excess(part, n_permutations=299, n_boot=200, min_count=5, sequential_h=h,
                         rng_null=np.random.default_rng(1), rng_boot=np.random.default_rng(2))
    test = row.test
    assert test.stopped_early == (h is not None)
    m = test.n_permutations - 1 if h is not None else 299
    kept = test.null[:m]
    mc = np.var(kept, ddof=1) / m
    boot = np.var(row.replicates[np.isfinite(row.replicates)], ddof=1)
    assert row.excess == pytest.approx(row.weighted_gap - kept.mean(), rel=1e-12)
    assert row.variance == pytest.approx(boot + mc, rel=1e-12)
    # the interval widens by the same factor: the centred replicates, scaled
    lo, hi = excess_interval(row.excess, row.replicates, 0.9, test.null_mean_var)
    lo0, hi0 = excess_interval(row.excess, row.replicates, 0.9)
    assert (hi - lo) / (hi0 - lo0) == pytest.approx(np.sqrt((boot + mc) / boot), rel=1e-9)
    assert lo < lo0 and hi > hi0
    entry = excess_row(row, alpha=0.05)
    assert entry["null_mean_sd"] == pytest.approx(np.sqrt(mc), rel=1e-12)
    assert entry["bootstrap_sd"] == pytest.approx(np.sqrt(boot), rel=1e-12)
    assert entry["ci"] == pytest.approx([lo, hi], rel=1e-12)
    assert (entry["n_permutations"], entry["stopped_early"]) == (test.n_permutations, h is not None)
