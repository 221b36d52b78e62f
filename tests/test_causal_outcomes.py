"""causal_ablation's three outcomes (decide_slices) on constructed per-example ΔNLL vectors:
pass only when shown, fail only when a contradiction is shown, inconclusive otherwise, and the
paired-difference interval against a slow bootstrap loop and the normal-theory paired t."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from routeaudit.audits.causal_ablation import MASS_TIE, NLL_MARGIN, decide_slices
from routeaudit.verdict import Status

ALPHA = 0.05


def centred(rng: np.random.Generator, n: int, mean: float, sd: float) -> np.ndarray:
    """n normal draws shifted and scaled to exactly this mean and sd."""
    x = rng.standard_normal(n)
    return (x - x.mean()) / x.std(ddof=1) * sd + mean


def decide(masses, deltas, **kw):
    kw.setdefault("mass_min", 0.10)
    kw.setdefault("nll_margin", NLL_MARGIN)
    kw.setdefault("alpha", ALPHA)
    kw.setdefault("n_boot", 1000)
    kw.setdefault("rng", 0)
    names = [f"attn/early/f{k}" for k in range(len(masses))]
    return decide_slices(names, masses, deltas, **kw)


def test_clear_pass():
    rng = np.random.default_rng(0)
    n = 2000
    deltas = [centred(rng, n, 1.0, 0.5), centred(rng, n, 0.5, 0.5), centred(rng, n, 0.3, 0.5)]
    out = decide([0.5, 0.3, 0.2], deltas)
    assert out.status is Status.PASS, out.reason
    assert "has the largest effect" in out.reason and "attn/early/f0" in out.reason
    assert out.effect == pytest.approx(0.5, abs=1e-9)  # closest competitor: f1
    assert out.ci[0] > 0 and out.p_value <= ALPHA
    assert out.evidence["compared"] == "attn/early/f0 − attn/early/f1"
    rows = {r["slice"]: r for r in out.rows}
    assert rows["attn/early/f0"]["top_mass"] and rows["attn/early/f0"]["paired_difference"] is None
    assert rows["attn/early/f2"]["paired_difference"] == pytest.approx(0.7, abs=1e-9)
    assert rows["attn/early/f2"]["paired_interval"][0] > 0


def test_clear_contradiction_fails():
    rng = np.random.default_rng(1)
    n = 2000
    deltas = [centred(rng, n, 0.5, 0.5), centred(rng, n, 1.0, 0.5), centred(rng, n, 0.3, 0.5)]
    out = decide([0.5, 0.3, 0.2], deltas)
    assert out.status is Status.FAIL, out.reason
    assert "slice attn/early/f1 has a larger effect" in out.reason
    assert "paired difference -0.5000" in out.reason
    assert "shown below the margin" not in out.reason  # every ΔNLL is far above the margin
    assert out.effect == pytest.approx(-0.5, abs=1e-9) and out.ci[1] < 0
    assert out.p_value_corrected <= ALPHA


def test_near_tie_from_the_report_is_inconclusive():
    """Top-mass slice 0.369 with ΔNLL 2.16 vs a 0.356 slice with ΔNLL 2.22: not separated."""
    rng = np.random.default_rng(2)
    n = 450
    deltas = [centred(rng, n, 2.16, 1.5), centred(rng, n, 2.22, 1.5), centred(rng, n, 0.4, 1.5)]
    out = decide([0.369, 0.356, 0.05], deltas)
    assert out.status is Status.INCONCLUSIVE, out.reason
    assert "the top-mass slice attn/early/f0 (mass 0.369) and slice attn/early/f1 (mass 0.356) " \
           "have ΔNLL +2.1600 and +2.2200, paired difference -0.0600, 90% interval [" in out.reason
    assert "not separated" in out.reason
    assert "×" in out.reason and "evaluation data" in out.reason
    assert "N_eval ≈" in out.reason
    lo, hi = out.ci
    assert lo < -0.06 < hi and lo < 0 < hi


def test_appreciable_mass_without_effect_at_large_n_fails():
    rng = np.random.default_rng(3)
    n = 5000
    deltas = [centred(rng, n, 1.0, 0.5), centred(rng, n, 0.0, 0.1), centred(rng, n, 0.5, 0.5)]
    out = decide([0.5, 0.3, 0.2], deltas)
    assert out.status is Status.FAIL, out.reason
    assert "attn/early/f1 holds mass 0.300 ≥ 0.1 but its ΔNLL +0.0000" in out.reason
    assert "is shown below the margin 0.01 nats" in out.reason
    assert "has a larger effect" not in out.reason
    rows = {r["slice"]: r for r in out.rows}
    assert rows["attn/early/f1"]["p_below_margin_holm"] <= ALPHA
    assert rows["attn/early/f1"]["ci"][1] < NLL_MARGIN


def test_appreciable_mass_without_effect_at_tiny_n_is_inconclusive():
    rng = np.random.default_rng(4)
    n = 20
    deltas = [centred(rng, n, 1.0, 0.5), centred(rng, n, 0.0, 0.1), centred(rng, n, 0.5, 0.5)]
    out = decide([0.5, 0.3, 0.2], deltas)
    assert out.status is Status.INCONCLUSIVE, out.reason
    assert "attn/early/f1 holds mass 0.300 ≥ 0.1 but its ΔNLL +0.0000" in out.reason
    assert "shown neither > 0" in out.reason
    assert "ΔNLL of attn/early/f1:" in out.reason and "evaluation data" in out.reason


def test_an_exactly_zero_effect_is_shown_below_the_margin():
    """Masking a source that contributes nothing (zeroed weights): d = 0 for every example."""
    rng = np.random.default_rng(5)
    n = 50
    out = decide([0.5, 0.3], [centred(rng, n, 1.0, 0.5), np.zeros(n)])
    assert out.status is Status.FAIL and "shown below the margin" in out.reason


def test_a_small_mass_slice_needs_no_effect():
    rng = np.random.default_rng(6)
    n = 2000
    deltas = [centred(rng, n, 1.0, 0.5), centred(rng, n, 0.0, 0.5)]
    assert decide([0.95, 0.05], deltas).status is Status.PASS


def test_a_real_effect_below_the_margin_fails_even_though_positive():
    rng = np.random.default_rng(7)
    n = 20_000
    deltas = [centred(rng, n, 1.0, 0.5), centred(rng, n, 0.003, 0.05)]
    out = decide([0.5, 0.3], deltas)
    rows = {r["slice"]: r for r in out.rows}
    assert rows["attn/early/f1"]["p_positive"] <= ALPHA  # an effect, but below the margin
    assert out.status is Status.FAIL and "shown below the margin 0.01" in out.reason


def test_tied_top_masses_are_each_compared_with_the_rest():
    rng = np.random.default_rng(8)
    n = 2000
    shared = centred(rng, n, 0.8, 0.5)
    deltas = [shared, shared.copy(), centred(rng, n, 0.1, 0.5)]
    out = decide([0.4, 0.4 - MASS_TIE / 2, 0.2], deltas)
    assert out.status is Status.PASS, out.reason  # equal effects of the tied slices are fine
    assert "equal to 3 decimals" in out.reason
    assert out.evidence["top_mass_slices"] == ["attn/early/f0", "attn/early/f1"]
    assert set(out.evidence["paired"]) == {"attn/early/f0 − attn/early/f2",
                                           "attn/early/f1 − attn/early/f2"}
    # a tied top-mass slice beaten by a slice outside the tie is a contradiction
    deltas = [shared, centred(rng, n, 0.0, 0.5), centred(rng, n, 0.4, 0.5)]
    out = decide([0.4, 0.4, 0.2], deltas, mass_min=0.5)
    assert out.status is Status.FAIL, out.reason
    assert "slice attn/early/f2 has a larger effect: the top-mass slice attn/early/f1" in out.reason
    # masses that do not rank anything cannot pass
    out = decide([0.3, 0.3], [shared, centred(rng, n, 0.1, 0.5)], mass_min=0.5)
    assert out.status is Status.INCONCLUSIVE and "do not rank" in out.reason


def test_paired_interval_matches_a_slow_bootstrap_and_the_paired_t():
    rng = np.random.default_rng(9)
    n = 400
    common = rng.standard_normal(n)  # the slices share per-example difficulty: pairing matters
    d_top = 1.0 + common + 0.3 * rng.standard_normal(n)
    d_other = 0.9 + common + 0.3 * rng.standard_normal(n)
    out = decide([0.6, 0.4], [d_top, d_other], n_boot=4000)
    diff = d_top - d_other
    row = out.rows[1]
    assert row["paired_difference"] == pytest.approx(diff.mean(), abs=1e-12)
    # normal theory: paired t, one-sided at alpha each side (the 1 - 2 alpha interval)
    se_t = diff.std(ddof=1) / np.sqrt(n)
    t = stats.t.ppf(1 - ALPHA, n - 1)
    lo, hi = row["paired_interval"]
    half = (hi - lo) / 2
    assert half == pytest.approx(t * se_t, rel=0.06)
    assert (lo + hi) / 2 == pytest.approx(diff.mean(), abs=1e-12)
    # the obvious bootstrap loop, resampling examples
    gen = np.random.default_rng(123)
    slow = np.array([diff[gen.integers(0, n, n)].mean() for _ in range(4000)])
    assert row["paired_se"] == pytest.approx(slow.std(ddof=1), rel=0.05)
    # pairing: far narrower than the unpaired interval of two independent means
    unpaired = np.sqrt(d_top.var(ddof=1) / n + d_other.var(ddof=1) / n)
    assert row["paired_se"] < unpaired / 2
    assert row["paired_p_positive"] == pytest.approx(stats.norm.sf(diff.mean() / row["paired_se"]))


def test_grouped_bootstrap_resamples_whole_sequences():
    """Per-token traces: tokens of a sequence share an effect, so the se must come from
    resampling sequences (a slow loop over groups), not tokens."""
    rng = np.random.default_rng(10)
    n_seq, per = 60, 20
    groups = np.repeat(np.arange(n_seq), per)
    seq_effect = np.repeat(rng.standard_normal(n_seq), per)
    d_top = 0.3 + seq_effect + 0.2 * rng.standard_normal(n_seq * per)
    d_other = 0.1 + 0.2 * rng.standard_normal(n_seq * per)
    diff = d_top - d_other
    grouped = decide([0.6, 0.4], [d_top, d_other], n_boot=3000, groups=groups).rows[1]
    flat = decide([0.6, 0.4], [d_top, d_other], n_boot=3000).rows[1]
    gen = np.random.default_rng(321)
    by_seq = [diff[groups == g] for g in range(n_seq)]
    slow = np.array([np.concatenate([by_seq[g] for g in gen.integers(0, n_seq, n_seq)]).mean()
                     for _ in range(3000)])
    assert grouped["paired_se"] == pytest.approx(slow.std(ddof=1), rel=0.06)
    assert grouped["paired_se"] > 2.5 * flat["paired_se"]


def test_same_inputs_same_decision_and_bad_inputs_raise():
    rng = np.random.default_rng(11)
    deltas = [centred(rng, 300, 0.5, 1.0), centred(rng, 300, 0.4, 1.0)]
    a, b = decide([0.6, 0.4], deltas, rng=7), decide([0.6, 0.4], deltas, rng=7)
    assert a.reason == b.reason and a.evidence == b.evidence
    with pytest.raises(ValueError, match="same examples"):
        decide([0.6, 0.4], [deltas[0], deltas[1][:-1]])
    with pytest.raises(ValueError, match=">= 2 slices"):
        decide([0.6], deltas[:1])
