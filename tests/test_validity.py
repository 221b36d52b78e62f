"""A fast subset of benchmarks/validity.py: error rates must be right, not just the code paths.

Both rates are of the shipped permutation_null audit, on the context `routeaudit run` builds."""

from __future__ import annotations

import numpy as np

from benchmarks.validity import naive_rejects, permutation_rejects, replicate_traces


def test_null_false_positive_rate_near_alpha_and_naive_test_fooled():
    perm, naive = [], []
    for rep in range(100):
        traces = replicate_traces("null", 2000, 0.0, rep)
        perm.append(permutation_rejects(traces, seed=rep, permutations=99))
        naive.append(naive_rejects(traces, seed=rep, alpha=0.05))
    # Binomial(100, 0.05): P(X > 12) < 0.001, so a correct test fails this rarely.
    assert np.sum(perm) <= 12
    assert np.mean(naive) >= 0.9


def test_planted_effect_is_detected():
    hits = [permutation_rejects(replicate_traces("planted", 4000, 0.2, rep), seed=rep,
                                permutations=99) for rep in range(30)]
    assert np.mean(hits) >= 0.8


def test_three_outcomes_error_rates_on_two_generators():
    """The fast subset of benchmarks/validity.py's three-outcome study: both matched audits,
    pooled over two seeds, on the logit-linear and the quadratic (non-monotone) confounder.
    At planted 0 (the confounded null) neither passes more than chance allows; at planted
    0.3 (true excess ≈ 0.09, far above the 0.01 margin) neither is refuted and both pass."""
    from dataclasses import replace

    import routeaudit.session.validate as validate
    from routeaudit.audit import AuditSettings
    from routeaudit.audits.permutation_null import PermutationNullAudit
    from routeaudit.audits.stratification import StratificationAudit
    from routeaudit.simulation.plan import matched_cases
    from routeaudit.summaries import default_registry

    audits = [PermutationNullAudit(), StratificationAudit()]
    settings = AuditSettings(n_permutations=49, n_bootstrap=60)
    reps = 30
    for shape in ("logit_linear", "quadratic"):
        def generate(effect, *, n, seed, n_layers, n_classes, shape=shape):
            from routeaudit.simulation.cases import generate as make
            return make(shape, n, effect=effect, seed=70_000 + seed, n_layers=n_layers,
                        n_classes=n_classes)
        generate.__name__ = f"test_{shape}"
        cases = replace(matched_cases(), generate=generate, effects=(0.0, 0.3))
        studies = [validate.Study(a.name, cases, settings.gap_margin,
                                  [validate.Row(0.0), validate.Row(0.3)]) for a in audits]
        target = {"n": 4000, "n_layers": 4, "n_classes": 5, "seeds": [0, 1]}
        validate.simulate(studies, audits, target, settings, reps,
                          summaries=default_registry(), progress=False)
        for study in studies:
            null, planted = study.rows
            # Binomial(30, 0.05): P(X > 6) < 0.002
            assert null.statuses.count("pass") <= 6, (shape, study.audit, null.statuses)
            assert planted.statuses.count("fail") <= 6, (shape, study.audit, planted.statuses)
            assert planted.rate("pass") >= 0.8, (shape, study.audit, planted.statuses)
            assert planted.truth > 5 * settings.gap_margin
