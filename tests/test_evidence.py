"""The pooled evidence and its three outcomes (docs/methods.md §5.2)."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routeaudit.stats.evidence import data_needed, outcome, p_text, pool_seeds, scale_text

Z95 = NormalDist().inv_cdf(0.95)


def test_pooled_standard_error_is_within_plus_between_over_s():
    est, var = [0.02, 0.03, 0.025], [1e-4, 4e-4, 2.5e-4]
    ev = pool_seeds(est, var)
    by_hand = np.sqrt(np.mean(var) + np.var(est, ddof=1) / 3)
    assert ev.estimate == pytest.approx(0.025)
    assert ev.se == pytest.approx(by_hand)
    lo, hi = ev.interval(0.05)
    assert (lo, hi) == pytest.approx((0.025 - Z95 * by_hand, 0.025 + Z95 * by_hand))
    # one seed: within only
    assert pool_seeds([0.1], [0.04]).se == pytest.approx(0.2)


def test_one_sided_p_values_match_scipy():
    from scipy.stats import norm

    ev = pool_seeds([0.012, 0.009], [2e-5, 3e-5])
    assert ev.p_positive() == pytest.approx(norm.sf(ev.estimate / ev.se))
    assert ev.p_below(0.02) == pytest.approx(norm.cdf((ev.estimate - 0.02) / ev.se))


@pytest.mark.parametrize(("estimates", "variances", "want"), [
    ([0.05, 0.06, 0.055], [1e-5] * 3, "pass"),            # far above 0 and the margin
    ([0.05, -0.01, 0.055], [1e-6] * 3, "inconclusive"),   # shown > 0, but the sign flips
    ([0.0, 0.0005, -0.0005], [1e-7] * 3, "fail"),         # shown below the margin 0.005
    ([0.002, 0.003, 0.0025], [1e-8] * 3, "fail"),         # real but below the margin
    ([0.004, 0.0, 0.008], [1e-4] * 3, "inconclusive"),    # too noisy either way
])
def test_outcome(estimates, variances, want):
    assert outcome(pool_seeds(estimates, variances), 0.005, 0.05, "all") == want


def test_majority_rule_tolerates_one_flipped_seed():
    ev = pool_seeds([0.05, -0.001, 0.055], [1e-6] * 3)
    assert outcome(ev, 0.005, 0.05, "majority") == "pass"
    assert outcome(ev, 0.005, 0.05, "all") == "inconclusive"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-0.1, 0.1), min_size=1, max_size=5),
       st.floats(1e-8, 1e-2), st.floats(0.0, 0.05), st.floats(0.001, 0.2))
def test_outcome_is_monotone_in_the_effect(estimates, variance, margin, alpha):
    """Shifting every estimate up never turns a pass into anything else, nor anything
    into a fail; pass and fail never both hold (the margin is ≥ 0)."""
    order = {"fail": 0, "inconclusive": 1, "pass": 2}
    ev = pool_seeds(estimates, [variance] * len(estimates))
    up = pool_seeds([e + 0.05 for e in estimates], [variance] * len(estimates))
    assert order[outcome(up, margin, alpha, "all")] >= order[outcome(ev, margin, alpha, "all")]
    assert not (ev.p_below(margin) <= alpha and ev.p_positive() <= alpha and margin == 0)


def test_error_rates_at_both_boundaries_by_simulation():
    """Correlated seeds (shared evaluation noise plus split noise): a true effect of 0 passes,
    and one at the margin fails, at most alpha + 2 SE of the time."""
    rng = np.random.default_rng(0)
    reps, alpha, margin, sd = 2000, 0.05, 0.01, 0.004
    for truth, bad in ((0.0, "pass"), (margin, "fail")):
        shared = rng.normal(0, sd * 0.8, size=(reps, 1))
        split = rng.normal(0, sd * 0.6, size=(reps, 3))
        estimates = truth + shared + split
        rate = np.mean([outcome(pool_seeds(e, [sd**2] * 3), margin, alpha, "all") == bad
                        for e in estimates])
        assert rate <= alpha + 2 * np.sqrt(alpha * (1 - alpha) / reps), (truth, rate)


def test_data_needed_gives_80_percent_power_at_the_estimate():
    ev = pool_seeds([0.004], [0.004**2])  # estimate one se above 0
    factor, toward = data_needed(ev, 0.005, 0.05)
    assert toward == "pass"
    se_new = ev.se / np.sqrt(factor)
    power = 1 - NormalDist().cdf(Z95 - ev.estimate / se_new)
    assert power == pytest.approx(0.8, abs=1e-9)
    # toward fail: an estimate of 0 with margin 0.01
    factor, toward = data_needed(pool_seeds([0.0], [0.01**2]), 0.01, 0.05)
    assert toward == "fail" and factor == pytest.approx((Z95 + NormalDist().inv_cdf(0.8)) ** 2)


def test_scale_text_names_the_data_and_the_seeds():
    ev = pool_seeds([0.004], [0.004**2])
    text = scale_text(ev, 0.005, 0.05, 1000)
    assert "× the evaluation data (N_eval ≈" in text and "positive" in text
    spread = pool_seeds([0.02, -0.01, 0.005], [1e-6] * 3)
    assert "more seeds" in scale_text(spread, 0.005, 0.05, 1000)
    tie = pool_seeds([0.0], [1e-4])  # on the boundary of a zero margin
    assert "no feasible amount" in scale_text(tie, 0.0, 0.05)


def test_p_text():
    assert p_text(1e-7) == "< 0.0001" and p_text(0.0123) == "0.0123" and p_text(float("nan")) == "n/a"


def test_verdict_from_seeds_has_three_outcomes_for_plugin_audits():
    from routeaudit.audit import AuditContext, AuditSettings, BaseAudit, SeedOutcome
    from routeaudit.fixtures.synthetic import make_traces

    class Claim(BaseAudit):
        name, claim = "claim", "something holds"

    traces = make_traces("null", 400, seed=0)
    for rule, holds, want in (("all", [True] * 3, "pass"), ("all", [False] * 3, "fail"),
                              ("all", [True, False, True], "inconclusive"),
                              ("majority", [True, False, True], "pass"),
                              ("majority", [False, False, True], "fail")):
        ctx = AuditContext.for_traces(traces, settings=AuditSettings(stability=rule))
        outcomes = [SeedOutcome(s, holds=h, effect=float(h)) for s, h in enumerate(holds)]
        verdict = ctx.verdict_from_seeds(Claim(), {"x": 1}, outcomes)
        assert verdict.status.value == want, (rule, holds)
        if want == "inconclusive":
            assert "seeds disagree" in verdict.reason
