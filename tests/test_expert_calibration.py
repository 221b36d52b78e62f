"""The expert_calibration audit on synthetic MoE traces with known truth
(routeaudit.simulation.experts): the paper's sufficiency and insufficiency results, the
shift claim, a small error-rate study, and its estimators against slow references."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from routeaudit.audit import AuditContext, AuditSettings
from routeaudit.audits.expert_calibration import ExpertCalibrationAudit, estimate_seed, routed
from routeaudit.cli import main
from routeaudit.metrics import confidence_and_correct, ece
from routeaudit.simulation.cases import generate as generate_depth
from routeaudit.simulation.experts import generate_moe, moe_truth
from routeaudit.stats.bootstrap import Resampler, group_units, resampling_counts
from routeaudit.stats.folded import boundary_mean, fold_inverse, fold_mean
from routeaudit.stats.rates import bound, rate_text
from routeaudit.traces import TraceSet
from routeaudit.verdict import Status

AUDIT = ExpertCalibrationAudit()
FAST = AuditSettings(n_bootstrap=200)


def run(traces, *, cells=None, settings=FAST, **fields):
    ctx = AuditContext.for_traces(traces, settings=settings, **fields)
    chosen = AUDIT.cells(ctx) if cells is None else cells
    return {_key(v.cell): v for v in AUDIT.run(ctx, chosen)}


def _key(cell):
    return "-".join(str(v) for v in cell.values())


@pytest.fixture(scope="module")
def cases():
    """The three cases of the issue at 100,000 tokens (50,000 evaluation tokens a seed)."""
    return {kind: run(generate_moe(kind, 100_000, seed=11)) for kind in ("hard", "soft", "shift")}


# --------------------------------------------------------------------------- done-when


def test_hard_routing_with_calibrated_experts_passes_every_claim(cases):
    got = cases["hard"]
    assert {k: v.status for k, v in got.items()} == {
        "experts": Status.PASS, "aggregate": Status.PASS, "shift": Status.PASS}
    for v in got.values():
        assert v.reason.startswith("hard routing")
        assert v.effect > 0 and v.ci[0] > 0


def test_soft_mixture_of_the_same_experts_fails_the_aggregate_claim(cases):
    got = cases["soft"]
    agg = got["aggregate"]
    assert agg.status is Status.FAIL
    assert agg.reason.startswith("soft routing")
    assert "under-confident" in agg.reason and "Wu & Gales" in agg.reason
    assert agg.ci[1] < 0  # the slack tol − ECE is shown negative
    assert got["experts"].status is not Status.FAIL  # the experts themselves are calibrated
    truth = moe_truth(4, 10, "soft", 0.0, 0.0, 1.0, 1.5)["aggregate_ece"]
    lo, hi = agg.evidence["ece_interval"]
    assert lo <= truth <= hi


def test_calibrated_on_p_but_not_under_routing_shift(cases):
    got = cases["shift"]
    assert got["aggregate"].status is Status.PASS
    assert got["shift"].status is Status.FAIL
    assert "reweights the experts' regions by" in got["shift"].reason
    weights = got["shift"].per_seed[0]["worst_cell_weights"]
    # the adversary puts the mass on the over-confident (even) experts
    assert weights[0] + weights[2] > weights[1] + weights[3]


def test_verdicts_record_options_per_expert_numbers_and_routing(cases):
    v = cases["hard"]["experts"]
    t = v.threshold
    assert (t["ece_tol"], t["shift_ratio"], t["shift_kl"], t["min_expert_tokens"]) == \
        (0.02, 5.0, None, 100)
    assert t["bootstrap"] == 200 and t["alpha"] == 0.05
    assert len(v.per_seed) == 3
    experts = v.per_seed[0]["experts"]
    assert [e["expert"] for e in experts] == [0, 1, 2, 3]
    assert sum(e["load"] for e in experts) == pytest.approx(1.0)
    for e in experts:
        assert e["n"] > 10_000 and e["interval"][0] <= e["ece"] <= e["interval"][1]
    agg = cases["hard"]["aggregate"].per_seed[0]
    assert len(agg["expert_load"]) == 4
    # hard routing: a fail-only component pools the experts through a fixed reweighting
    assert any(k.startswith("the experts pooled") for k in v.evidence["experts"])
    assert "pooled_lower" in v.per_seed[0]


# --------------------------------------------------------------------------- error rates


def _rates(kind, n, reps, claims, **kw):
    out = {c: [] for c in claims}
    settings = AuditSettings(n_bootstrap=100)
    for rep in range(reps):
        got = run(generate_moe(kind, n, seed=500 + rep, **kw),
                  cells=[{"claim": c} for c in claims], settings=settings)
        for c in claims:
            out[c].append(got[c].status)
    return out


def test_error_rates_small_study():
    """40 replicates each: false fail of every claim on a calibrated hard-routed model, and
    false pass of the aggregate and shift claims just beyond the tolerance (truth ECE ≈
    0.021 > 0.02): each rate must be within α + 2 SE."""
    reps, limit = 40, bound(0.05, 40)
    calibrated = _rates("hard", 4000, reps, ["experts", "aggregate", "shift"])
    for claim, statuses in calibrated.items():
        fails = [s is Status.FAIL for s in statuses]
        assert np.mean(fails) <= limit, f"false fail of {claim}: {rate_text(fails)}"
    over = _rates("overconfident", 12_000, reps, ["aggregate"], expert_miscalibration=0.027)
    assert moe_truth(4, 10, "hard", 0.027, 0.0, 1.0, 1.5)["aggregate_ece"] > 0.02
    passes = [s is Status.PASS for s in over["aggregate"]]
    assert np.mean(passes) <= limit, f"false pass of aggregate: {rate_text(passes)}"
    hidden = _rates("shift", 12_000, reps, ["shift"], shift_gap=0.027)
    passes = [s is Status.PASS for s in hidden["shift"]]
    assert np.mean(passes) <= limit, f"false pass of shift: {rate_text(passes)}"


# --------------------------------------------------------------------------- estimators


def test_folded_normal_helpers_against_scipy():
    from scipy.stats import foldnorm

    x = np.array([0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 9.0])
    assert np.allclose(fold_mean(x), foldnorm.mean(x), atol=1e-12)
    y = fold_mean(x[1:])
    assert np.allclose(fold_inverse(y), x[1:], atol=1e-9)
    assert np.all(fold_inverse(np.array([0.1, np.sqrt(2 / np.pi)])) == 0.0)


def test_boundary_mean_is_the_least_expected_plugin_at_that_ece():
    """Over random bin configurations with Σ_b p_b|μ_b| = t, the expected plug-in ECE
    Σ_b p_b σ_b f(|μ_b|/σ_b) (scipy's folded-normal mean) is never below the boundary."""
    from scipy.stats import foldnorm

    rng = np.random.default_rng(0)
    for _ in range(200):
        nb = rng.integers(2, 15)
        p = rng.dirichlet(np.ones(nb))
        sigma = rng.uniform(0.01, 0.2, nb)  # per-bin sd of the bin's mean residual
        t = rng.uniform(0.001, 0.1)
        mu = rng.dirichlet(np.ones(nb) * rng.uniform(0.1, 3)) * t / p  # Σ p|μ| = t
        expected = np.sum(p * sigma * foldnorm.mean(mu / sigma))
        assert expected >= boundary_mean(t, np.sum(p * sigma)) - 1e-12


def test_bootstrap_matches_a_slow_loop_over_resamples():
    """The audit's plug-in ECEs and their bootstrap variances equal metrics.ece on each
    resample written out with np.repeat, with whole sequences resampled for token traces."""
    traces = generate_moe("soft", 3000, seed=3, sequence_length=10, truth=False)
    opts = AUDIT.options(AuditContext.for_traces(traces, settings=AuditSettings(n_bootstrap=30)))
    ctx = AuditContext.for_traces(traces, seeds=(0,), settings=AuditSettings(n_bootstrap=30))
    seed = ctx.seeds[0]
    r = routed(traces)
    conf, correct = seed.conf_correct("eval")
    data = SimpleNamespace(seed=seed, routed=r, conf=conf, correct=correct,
                           conf_cal=seed.conf_correct("cal")[0],
                           correct_cal=seed.conf_correct("cal")[1])
    got = estimate_seed(data, ["experts", "aggregate"], opts, np.random.default_rng(5))
    groups = seed.groups("eval")
    assert groups is not None
    unit, n_units = group_units(groups, conf.size)  # the same draws as the audit's
    counts = resampling_counts(Resampler.draw(np.random.default_rng(5), n_units), 0, 30, unit)
    reps = [ece(np.repeat(conf, k), np.repeat(correct, k)) for k in counts]
    agg = got["aggregate"][0][0]
    assert agg.upper == pytest.approx(ece(conf, correct), abs=1e-12)
    assert agg.var_upper == pytest.approx(np.var(reps, ddof=1), rel=1e-9)
    e_conf, e_correct = confidence_and_correct(r.expert_logits[seed.eval_index],
                                               traces.labels[seed.eval_index])
    region = r.region[seed.eval_index]
    for k, est in enumerate(got["experts"][0]):
        sel = region == k
        assert est.upper == pytest.approx(ece(e_conf[sel], e_correct[sel]), abs=1e-12)
        reps_k = [ece(np.repeat(e_conf[sel], c[sel]), np.repeat(e_correct[sel], c[sel]))
                  for c in counts]
        assert est.var_upper == pytest.approx(np.var(reps_k, ddof=1), rel=1e-9)
        # the noise scale: Σ_b sd of the bin's residual sum over i.i.d. sequences, / n
        bins = np.minimum((np.ceil(e_conf[sel] * 15) - 1).clip(0), 14).astype(int)
        _, unit = np.unique(groups[sel], return_inverse=True)
        n_units = np.unique(groups).size
        noise = 0.0
        for b in range(15):
            t = np.bincount(unit[bins == b], (e_conf[sel] - e_correct[sel])[bins == b],
                            minlength=unit.max() + 1)
            noise += np.sqrt(max(np.sum(t ** 2) - t.sum() ** 2 / n_units, 0.0))
        assert est.noise == pytest.approx(noise / sel.sum(), rel=1e-9)


# --------------------------------------------------------------------------- inputs and wiring


def test_depth_routing_traces_are_skipped():
    got = run(generate_depth("logit_linear", 500, effect=0.0, seed=0))
    assert {v.status for v in got.values()} == {Status.SKIP}
    assert "not a mixture of experts" in got["aggregate"].reason


def test_soft_routing_without_expert_logits_cannot_judge_the_experts():
    full = generate_moe("soft", 6000, seed=2, truth=False)
    bare = TraceSet(full.logits, full.labels, full.routing, meta=full.meta)
    got = run(bare, cells=[{"claim": "experts"}, {"claim": "aggregate"}])
    assert got["experts"].status is Status.INCONCLUSIVE
    assert "expert_logits" in got["experts"].reason
    assert got["aggregate"].status is not Status.SKIP


def test_too_few_routed_tokens_is_inconclusive_with_how_many():
    got = run(generate_moe("hard", 1000, seed=4, truth=False), cells=[{"claim": "experts"}],
              options=SimpleNamespace(min_expert_tokens=200))
    v = got["experts"]
    assert v.status is Status.INCONCLUSIVE
    assert "at least 200 are needed" in v.reason and "N ≈" in v.reason


def test_npz_round_trip_and_determinism(tmp_path):
    traces = generate_moe("shift", 5000, seed=6, sequence_length=20)
    path = traces.save_npz(tmp_path / "moe.npz")
    first = run(traces, settings=AuditSettings(n_bootstrap=50))
    again = run(TraceSet.load(path), settings=AuditSettings(n_bootstrap=50))
    for key, v in first.items():
        assert v.model_dump_json() == again[key].model_dump_json()


def test_kl_class_and_options_through_the_command_line(tmp_path):
    path = generate_moe("shift", 8000, seed=8, truth=False).save_npz(tmp_path / "moe.npz")
    out = tmp_path / "r.json"
    code = main(["run", str(path), "-p", "routeaudit.audits.expert_calibration", "--audit",
                 "expert_calibration", "--bootstrap", "100", "--ece-tol", "0.03",
                 "--shift-kl", "0.2", "--min-expert-tokens", "50", "--json", str(out), "-q"])
    report = json.loads(out.read_text())
    verdicts = {v["cell"]["claim"]: v for v in report["verdicts"]}
    assert code in (0, 1) and set(verdicts) == {"experts", "aggregate", "shift"}
    t = verdicts["shift"]["threshold"]
    assert (t["ece_tol"], t["shift_kl"], t["min_expert_tokens"]) == (0.03, 0.2, 50)
    assert "KL ball" in t["shift_class"] and "KL ball ρ = 0.2" in verdicts["shift"]["reason"]


def test_calibrator_output_is_audited_too():
    from routeaudit.calibrators.simple import histogram

    traces = generate_moe("soft", 40_000, seed=9, truth=False)
    got = run(traces, calibrator=histogram)
    assert {"aggregate-histogram", "shift-histogram"} <= set(got)
    assert got["aggregate"].status is Status.FAIL
    # binning on confidence removes the mixture's global under-confidence
    assert got["aggregate-histogram"].status is not Status.FAIL
    assert got["aggregate-histogram"].claim.startswith("The calibrator histogram's output is calibrated")


# --------------------------------------------------------------------------- the generator


def test_generator_contract_and_truth():
    hard = generate_moe("hard", 2000, seed=1, n_layers=2, truth=False)
    soft = generate_moe("soft", 2000, seed=1, n_layers=2, truth=False)
    meta = hard.meta
    assert (meta.source_kind, meta.routing_mode, meta.top_k, meta.expert_layer) == \
        ("experts", "hard", 1, 1)
    assert meta.source_families == {f"expert{j}": [j] for j in range(4)}
    assert meta.layer_types == ["mlp", "mlp"] and meta.layer_depth == [0, 1]
    assert hard.expert_logits.shape == (2000, 4, 10) and hard.routing.shape == (2000, 2, 4)
    region = hard.routing[:, 1].argmax(axis=1)
    assert np.array_equal(hard.logits, hard.expert_logits[np.arange(2000), region])
    # the same draws, mixed softly: log Σ_k π_k softmax(f_k)
    from routeaudit.metrics import softmax

    p = softmax(soft.expert_logits.reshape(-1, 10).astype(np.float64)).reshape(2000, 4, 10)
    mix = np.einsum("ne,nek->nk", soft.routing[:, 1].astype(np.float64), p)
    assert np.allclose(soft.logits, np.log(mix), atol=1e-5)
    assert np.array_equal(soft.labels, hard.labels)
    again = generate_moe("hard", 2000, seed=1, n_layers=2, truth=False)
    assert np.array_equal(again.logits, hard.logits) and np.array_equal(again.labels, hard.labels)
    with pytest.raises(ValueError, match=r"<= 0\.25"):
        generate_moe("shift", 100, seed=0, shift_gap=0.3)
    with pytest.raises(ValueError, match="unknown case"):
        generate_moe("mixed", 100, seed=0)


@pytest.mark.parametrize("kind", ["shift", "soft"])
def test_truth_worst_case_agrees_with_the_exact_solver(kind):
    from routeaudit.simulation.experts import KINDS, population
    from routeaudit.stats.shift import worst_case_ece

    routing, mis, gap, _ = KINDS[kind]
    truth = moe_truth(4, 10, routing, mis, gap, 1.0, 1.5)
    a = population(4, 10, routing, mis, gap, 1.0, 1.5)
    exact = worst_case_ece(a["c_agg"], a["p_agg"], a["routed"], ratio=5.0)
    assert exact.value == pytest.approx(truth["worst_case_ece_ratio5"], abs=1e-12)
    assert exact.base == pytest.approx(truth["aggregate_ece"], abs=1e-12)
    if kind == "shift":  # calibrated on P, far from it under the shift
        assert truth["aggregate_ece"] < 0.002 and truth["worst_case_ece_ratio5"] > 0.05


def test_a_shift_split_gets_its_own_cells():
    """A target's "shift" split (here: the opposite-direction experts, a domain whose routed
    regions are miscalibrated) is audited with the same claims, on its own halves."""
    main_traces = generate_moe("hard", 20_000, seed=12, truth=False)
    shifted = generate_moe("shift", 20_000, seed=13, truth=False)
    ctx = AuditContext.for_traces(main_traces, settings=AuditSettings(n_bootstrap=100))
    ctx.split_traces = lambda name: shifted if name == "shift" else None
    cells = AUDIT.cells(ctx)
    assert {"claim": "experts", "split": "shift"} in cells and len(cells) == 6
    got = {_key(v.cell): v for v in AUDIT.run(ctx, cells)}
    assert got["experts-shift"].status is Status.FAIL
    assert got["experts-shift"].claim.endswith("(on the target's 'shift' split).")
    assert got["experts"].status is not Status.FAIL
