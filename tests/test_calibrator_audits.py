"""End to end: the calibrator audits on the bundled genuine and capacity-only fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routeaudit.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FAST = ["--bootstrap", "200", "--permutations", "199"]


def run(args, tmp_path):
    out = tmp_path / "report.json"
    code = main(["run", *args, *FAST, "--json", str(out)])
    return code, json.loads(out.read_text())


def verdicts(report, audit):
    return [v for v in report["verdicts"] if v["audit"] == audit]


def test_genuine_routing_calibrator_survives_every_control(tmp_path):
    code, report = run([str(FIXTURES / "calibrator_genuine.py")], tmp_path)
    statuses = {(v["audit"], v["cell"].get("feature") or v["cell"].get("summary")): v["status"]
                for v in report["verdicts"]}
    assert code == 0, statuses
    for audit in ("capacity_control", "shuffled_profile", "baseline_gain"):
        (verdict,) = verdicts(report, audit)
        assert verdict["status"] == "pass"
        assert verdict["effect"] > 0 and verdict["ci"][0] > 0
        seed0 = verdict["per_seed"][0]
        assert set(seed0["metrics"]["candidate"]) >= {"worst_tertile_ece", "ece15", "nll",
                                                      "brier", "mce", "classwise_ece",
                                                      "smooth_ece"}
    (bw,) = verdicts(report, "bandwidth_sensitivity")
    assert bw["status"] == "pass"
    assert {row["setting"] for row in bw["per_seed"]} >= {"bandwidth=cv_nll",
                                                          "bandwidth=ece_oracle",
                                                          "bandwidth=scott×0.25"}
    # the matched audits claim exactly the calibrator's routing feature
    assert {v["cell"]["summary"] for v in verdicts(report, "permutation_null")} == {
        "depth_variance"}


def test_capacity_only_calibrator_is_never_passed_and_is_refuted_at_a_wider_margin(tmp_path):
    """At this N the capacity-only gain (≈ 0) is not shown below the default margin 0.005
    (its 90% interval is about ±0.01): inconclusive, with how much more data would decide.
    The same data refute it against a margin the interval lies below."""
    args = [str(FIXTURES / "calibrator_capacity.py"), "--audit", "capacity_control",
            "--audit", "shuffled_profile", "--audit", "bandwidth_sensitivity"]
    code, report = run(args, tmp_path)
    assert code == 1
    (capacity,) = verdicts(report, "capacity_control")
    (shuffled,) = verdicts(report, "shuffled_profile")
    for verdict in (capacity, shuffled):
        assert verdict["status"] == "inconclusive"
        assert "not decided against" in verdict["reason"]
        assert "× the evaluation data" in verdict["reason"]
        lo, hi = verdict["ci"]
        assert lo < 0 < hi and hi > verdict["threshold"]["margin"] == 0.005
        assert verdict["threshold"]["interval_level"] == pytest.approx(0.9)
        for evidence in verdict["evidence"].values():
            assert evidence["data_needed"]["factor"] > 1
    assert "zeros[profile]" in capacity["reason"] or "derived[profile]" in capacity["reason"]
    assert "shuffled_" in shuffled["reason"]
    # the twins are parameter-identical to the candidate
    params = capacity["per_seed"][0]["n_parameters"]
    assert params["candidate"] == params["zeros:profile"] == params["derived:profile"]
    (bw,) = verdicts(report, "bandwidth_sensitivity")
    assert bw["status"] == "skip" and "sensitivity_grid" in bw["reason"]
    wide = max(hi for v in (capacity, shuffled) for hi in [v["ci"][1]]) + 0.01
    code, report = run([*args[:3], "--gain-margin", f"{wide:.4f}"], tmp_path / "wide")
    (capacity,) = verdicts(report, "capacity_control")
    assert code == 1 and capacity["status"] == "fail"
    assert "gain vanishes against" in capacity["reason"] and "below the margin" in capacity["reason"]


def test_calibrator_flag_with_trace_file_and_unknown_name(tmp_path, capsys):
    planted = str(FIXTURES / "planted.npz")
    code, report = run([planted, "--calibrator", "routeaudit.calibrators:nw_r_agg",
                        "--audit", "baseline_gain"], tmp_path)
    assert code in (0, 1)
    (verdict,) = verdicts(report, "baseline_gain")
    assert verdict["cell"] == {"calibrator": "nw_r_agg", "feature": "r_agg"}
    assert main(["run", planted, "--calibrator", "no_such_calibrator"]) == 4
    assert "no_such_calibrator" in capsys.readouterr().err


def test_calibrator_without_routing_features_is_skipped(tmp_path):
    code, report = run([str(FIXTURES / "planted.npz"), "--calibrator", "nw_confidence",
                        "--audit", "capacity_control"], tmp_path)
    (verdict,) = verdicts(report, "capacity_control")
    assert verdict["status"] == "skip" and "no routing feature" in verdict["reason"]
    assert code == 5  # only skipped rows: nothing was audited


@pytest.mark.parametrize("seeds", ["0,1,2"])
def test_same_seed_gives_bit_identical_calibrator_verdicts(tmp_path, seeds):
    args = [str(FIXTURES / "planted.npz"), "--calibrator", "ar_condcal", "--audit",
            "shuffled_profile", "--seeds", seeds]
    _, a = run(args, tmp_path)
    _, b = run(args, tmp_path)
    assert a["verdicts"] == b["verdicts"]


def test_an_under_powered_genuine_gain_is_inconclusive_with_the_data_that_would_decide(tmp_path):
    """A genuine routing-aware calibrator on too few examples is not "refuted": inconclusive,
    with about how many evaluation examples would decide; with that many it passes."""
    import re

    from routeaudit.fixtures.synthetic import make_traces

    args = ["--calibrator", "routeaudit.calibrators:nw_r_agg", "--audit", "capacity_control"]
    small = tmp_path / "small.npz"
    make_traces("planted", 1200, seed=5, effect=0.5, confound=0.3).save_npz(small)
    code, report = run([str(small), *args], tmp_path / "a")
    (verdict,) = verdicts(report, "capacity_control")
    assert code == 1 and verdict["status"] == "inconclusive"
    assert verdict["effect"] > 0
    needed = int(re.search(r"N_eval ≈ ([\d,]+)", verdict["reason"]).group(1).replace(",", ""))
    assert needed > 600  # more than the 600 evaluation examples it had
    large = tmp_path / "large.npz"
    make_traces("planted", 2 * needed, seed=5, effect=0.5, confound=0.3).save_npz(large)
    code, report = run([str(large), *args], tmp_path / "b")
    (verdict,) = verdicts(report, "capacity_control")
    assert code == 0 and verdict["status"] == "pass"
