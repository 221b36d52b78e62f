"""Tests of the multicalibration audit, written with routeaudit.testing.

Each test states a property the data were built to have (calibrated everywhere, one group
over-confident by a known amount) or recomputes a number independently (the group's ECE15
with numpy), so a wrong audit fails them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import routeaudit
from routeaudit.simulation.experts import generate_moe
from routeaudit.testing import AuditTester, run_audit, synthetic_traces

from routeaudit_multicalibration import plugin
from routeaudit_multicalibration.estimate import FOLD, estimate

ALPHA = 0.05


def entropy_summary(traces: routeaudit.TraceSet) -> np.ndarray:
    """r_agg computed here: mean over layers with >= 2 valid sources of -sum a log a."""
    mask = traces.source_mask
    a = np.where(mask[None], traces.routing.astype(np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(a > 0, a * np.log(a), 0.0).sum(axis=2)
    return h[:, mask.sum(axis=1) >= 2].mean(axis=1)


def ece15(conf: np.ndarray, correct: np.ndarray) -> float:
    """ECE15 with (lo, hi] bins, written out."""
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    return float(sum(abs((conf[bins == b] - correct[bins == b]).sum())
                     for b in range(15)) / conf.size)


def over_confident_group(traces: routeaudit.TraceSet, drop: float, seed: int = 0
                         ) -> routeaudit.TraceSet:
    """The traces with accuracy lowered by ``drop`` (at every confidence) in the top r_agg
    tertile: correct examples there are made wrong with probability drop / c."""
    rng = np.random.default_rng(seed)
    h = entropy_summary(traces)
    group = h > np.quantile(h, 2 / 3)
    probs = np.exp(traces.logits - traces.logits.max(axis=1, keepdims=True))
    conf = probs.max(axis=1) / probs.sum(axis=1)
    predicted = traces.logits.argmax(axis=1)
    correct = predicted == traces.labels
    flip = group & correct & (rng.random(traces.n_examples) < drop / conf)
    labels = np.where(flip, (predicted + 1) % traces.logits.shape[1], traces.labels)
    return routeaudit.TraceSet(traces.logits, labels, traces.routing,
                               source_mask=traces.source_mask, meta=traces.meta)


def test_cells_are_groupings_of_the_routing():
    depth = run_audit(plugin, synthetic_traces(1500, seed=0), "--seeds", "0")
    assert {v.cell["groups"] for v in depth} == {"r_agg", "r_agg_normalized", "depth_variance",
                                                 "depth_variance_across", "top_source"}
    moe = run_audit(plugin, generate_moe("hard", 1500, seed=0, truth=False), "--seeds", "0")
    groupings = {v.cell["groups"] for v in moe}
    assert "top1_expert" in groupings and "top_source" not in groupings
    assert "depth_variance" not in groupings


def test_recorded_group_ece_is_the_groups_own_ece():
    traces = synthetic_traces(3000, seed=1)
    result = run_audit(plugin, traces, "--seeds", "0", "--summary", "r_agg",
                       "--multical-min-size", "50")
    (verdict,) = result
    ctx = routeaudit.AuditContext.for_traces(traces, seeds=[0])  # the split a run draws
    index = ctx.seeds[0].eval_index
    h = entropy_summary(traces)[index]
    cuts = np.quantile(h, [1 / 3, 2 / 3])
    tile = np.searchsorted(cuts, h, side="left")
    conf, correct = ctx.seeds[0].conf_correct("eval")
    rows = {row["group"]: row for row in verdict.evidence["groups"]}
    assert len(rows) == 3
    for t in range(3):
        row = next(r for label, r in rows.items() if f"tertile {t + 1}/3" in label)
        assert row["n"] == int((tile == t).sum())
        assert row["ece_plugin"] == pytest.approx(ece15(conf[tile == t], correct[tile == t]),
                                                  abs=2e-6)
    assert verdict.threshold["multical_tol"] == plugin.TOLERANCE
    assert verdict.threshold["multical_min_size"] == 50


def test_calibrated_data_rarely_fail():
    """False-fail rate within alpha + 2 SE, at a strict tolerance on groups of ~200 where
    the plug-in ECE15 (~0.07) is all noise: a lower bound that ignored the plug-in's
    noise bias fails about half of these replicates."""
    tester = AuditTester(plugin, "--seeds", "0", "--summary", "r_agg",
                         "--multical-min-size", "100", "--multical-tol", "0.01")
    replicates = 40
    fails = sum(tester.run(synthetic_traces(1200, seed=100 + r))[0].status is
                routeaudit.Status.FAIL for r in range(replicates))
    bound = ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / replicates)
    assert fails / replicates <= bound, f"{fails}/{replicates} calibrated replicates failed"


def test_planted_group_miscalibration_is_refuted():
    traces = over_confident_group(synthetic_traces(6000, seed=2), drop=0.15)
    result = run_audit(plugin, traces, "--seeds", "0,1", "--summary", "r_agg")
    result.assert_fails(groups="r_agg")
    (verdict,) = result
    assert "tertile 3/3 (high)" in verdict.reason
    worst = verdict.evidence["groups"][0]
    assert "3/3" in worst["group"] and worst["p_fail_holm"] <= ALPHA
    assert worst["interval"][0] > plugin.TOLERANCE  # the lower bound is above the tolerance
    # the other two tertiles are calibrated: not refuted
    assert all(row["p_fail_holm"] > ALPHA for row in verdict.evidence["groups"][1:])


def test_calibrated_data_pass_with_enough_examples():
    result = run_audit(plugin, synthetic_traces(20000, seed=3), "--seeds", "0",
                       "--summary", "r_agg")
    result.assert_passes(groups="r_agg")
    assert all(row["interval"][1] < plugin.TOLERANCE for row in result[0].evidence["groups"])


def test_too_small_groups_are_inconclusive_and_say_how_much_data():
    traces = synthetic_traces(1200, seed=4)
    result = run_audit(plugin.MulticalibrationAudit(), traces, "--seeds", "0",
                       "--summary", "r_agg", "--multical-min-size", "400")
    result.assert_inconclusive(groups="r_agg")
    reason = result[0].reason
    assert "no group of r_agg has 400 evaluation examples" in reason
    assert "2.0× the data" in reason  # tertiles of 600 evaluation examples hold 200


def test_options_are_checked_and_reach_the_audit():
    with pytest.raises(routeaudit.UsageError, match="--multical-tol"):
        run_audit(plugin, synthetic_traces(500, seed=0), "--multical-tol", "-1")
    tighter = run_audit(plugin, synthetic_traces(1500, seed=0), "--seeds", "0",
                        "--summary", "r_agg", "--multical-tol", "0.2", "--multical-min-size", "50")
    assert tighter[0].threshold["multical_tol"] == 0.2


def test_estimate_se_bounds_the_plug_in_spread():
    """The analytic se is conservative (the plug-in's spread over fresh calibrated draws is
    below it), the noise-subtracted estimate is at most the true ECE (0) on average, and
    resampling units change nothing when every example is its own unit."""
    rng = np.random.default_rng(0)
    uppers, ses, lowers = [], [], []
    for _ in range(200):
        conf = 0.1 + 0.9 * rng.beta(4.0, 1.5, size=400)
        correct = (rng.random(400) < conf).astype(float)
        e = estimate(conf, correct)
        uppers.append(e.upper)
        ses.append(math.sqrt(e.var))
        lowers.append(e.lower)
        assert e.lower == pytest.approx(e.upper - FOLD * e.noise)
    assert np.std(uppers) <= np.mean(ses)
    assert np.mean(lowers) <= 0.005
    same = estimate(conf, correct, units=np.arange(400))
    assert same == estimate(conf, correct)
