"""The calibrator study's shortcuts give the numbers of the plain computation, bit for bit.

Each shortcut (all seeds' probes fitted in one call, fits and metrics reused across the
bandwidth grid, "raw" left out of the paired bootstrap, Adam as compiled loops) is compared
with the computation it replaces, run independently here.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from routeaudit import metrics
from routeaudit.audit import SeedData
from routeaudit.calibrators import MLPCalibrator, NadarayaWatson, spec_of
from routeaudit.calibrators.kernel import ar_condcal
from routeaudit.fixtures.synthetic import make_traces
from routeaudit.stats import bootstrap_worst_tile_ece, rng_for, stratified_split
from routeaudit.summaries import FeatureCache, default_registry

st = importlib.import_module("routeaudit.calibration.study")
SMALL_MLP = dict(hidden_layer_sizes=(16, 16), max_epochs=4, restarts=2, batch_size=64)
GRID = [("bandwidth", b) for b in NadarayaWatson().sensitivity_grid()["bandwidth"]]


@pytest.fixture(scope="module")
def seeds():
    traces = make_traces("planted", 1200, seed=5, effect=0.5, confound=0.3)
    cache = FeatureCache(traces, default_registry())
    conf, correct = metrics.confidence_and_correct(traces.logits, traces.labels)
    return [SeedData(s, traces, *stratified_split(conf, correct, s), cache) for s in (0, 1)]


def prepared(seeds, spec, setting):
    variants = st.all_variants(("depth_variance",), None)
    return [st._seed_jobs(spec, seed, variants, setting, None) for seed in seeds]


def test_equivalent_params_identify_the_same_estimator():
    scott = NadarayaWatson(bandwidth="scott").equivalent_params()
    assert scott == NadarayaWatson(bandwidth="scott×1").equivalent_params()
    assert scott == NadarayaWatson(bandwidth=1.0).equivalent_params()
    assert scott != NadarayaWatson(bandwidth="scott×2").equivalent_params()
    assert scott != NadarayaWatson(bandwidth="cv_nll").equivalent_params()
    assert scott != NadarayaWatson(bandwidth="scott", random_state=1).equivalent_params()
    assert st.fit_key(MLPCalibrator()) is None  # no equivalence declared: never reused


@pytest.mark.parametrize("mode", ["cv_nll", "ece_oracle"])
def test_a_chosen_bandwidth_predicts_as_the_fixed_one(seeds, mode):
    """What the study's reuse of a CV/oracle fit rests on: once fitted, the estimator is the
    fixed-κ estimator it chose, prediction for prediction."""
    sd = seeds[0]
    X = np.c_[sd.confidence, sd.features["depth_variance"]]
    Xc, Xe = X[sd.cal_index], X[sd.eval_index]
    yc, ye = sd.correct[sd.cal_index], sd.correct[sd.eval_index]
    chosen = NadarayaWatson(bandwidth=mode)
    chosen.fit(Xc, yc, **({"oracle": (Xe, ye)} if mode == "ece_oracle" else {}))
    fixed = NadarayaWatson(bandwidth=f"scott×{chosen.kappa_:g}").fit(Xc, yc)
    assert chosen.equivalent_params() == fixed.equivalent_params()
    np.testing.assert_array_equal(chosen.predict(Xe), fixed.predict(Xe))


def test_fits_reused_across_the_grid_equal_fresh_fits(seeds):
    spec = spec_of(ar_condcal)
    memo = st.ResultMemo()
    for setting in [None, *GRID]:
        jobs = [j for p in prepared(seeds, spec, setting) for j in p.jobs]
        keys = [st.data_key(j) for j in jobs]
        before = len(memo)
        fresh = st.fit_predict([j._replace(calibrator=st.make_calibrator(
            spec, setting, j.calibrator.random_state)) for j in jobs])
        reused = st.fit_predict(jobs, memo, keys)
        for (a, na), (b, nb) in zip(reused, fresh, strict=True):
            np.testing.assert_array_equal(a, b)
            assert na == nb
        if setting == ("bandwidth", "scott×1"):  # the registered calibrator's fits, reused
            assert len(memo) == before
    # fitted once each: 5 fixed κ, CV and the oracle (whose chosen κ reuse a fixed fit), on
    # 6 distinct inputs per seed (the derived twin's input is the predictive-entropy probe's)
    distinct = {st.data_key(j) for p in prepared(seeds, spec, None) for j in p.jobs}
    assert len(distinct) == 6 * len(seeds)
    assert len(memo) == 7 * len(distinct)


def test_all_seeds_in_one_call_equal_one_call_per_seed(seeds):
    spec = spec_of(st_mlp_factory())
    preps = prepared(seeds, spec, None)
    together = st.fit_predict([j for p in preps for j in p.jobs])
    alone = [r for p in prepared(seeds, spec, None) for r in st.fit_predict(p.jobs)]
    for (a, na), (b, nb) in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a, b)
        assert na == nb


def st_mlp_factory():
    from routeaudit.calibrators import calibrator

    @calibrator(["confidence", "depth_variance"], name="mlp_small")
    def mlp_small():
        return MLPCalibrator(**SMALL_MLP)

    return mlp_small


def test_score_equals_the_plain_bootstrap_and_metrics(seeds):
    """Raw out of the bootstrap and metrics reused from a memo: the numbers of bootstrapping
    every probe and computing every metric directly."""
    spec = spec_of(ar_condcal)
    memo: dict = {}
    sizes = []
    for setting in (None, ("bandwidth", "scott×1")):  # the second one hits the memo
        sizes.append(len(memo))
        for p in prepared(seeds, spec, setting):
            fitted = st.fit_predict(p.jobs)
            got = st._score(spec, p, fitted, setting, 200, memo)
            sd = p.seed
            preds = np.stack([p.conf_eval, *[f for f, _ in fitted]])
            tiles = metrics.quantile_tiles(sd.summary(p.summary, "eval"), 3)
            obs, reps = bootstrap_worst_tile_ece(
                preds, p.correct_eval, tiles, n_boot=200,
                rng=rng_for("calibrator-bootstrap", spec.name, repr(setting), sd.seed))
            np.testing.assert_array_equal(got.observed, obs)
            np.testing.assert_array_equal(got.replicates[:, 1:], reps[:, 1:])
            assert np.isnan(got.replicates[:, 0]).all()  # raw: never compared, not resampled
            probs = metrics.softmax(p.logits_eval)
            labels = sd.traces.labels[sd.eval_index]
            for j, key in enumerate(got.order):
                want = st.probe_metrics(preds[j], p.correct_eval, probs, labels, obs[j])
                assert got.metrics[key] == want
    # one entry per distinct vector; the second setting computed nothing new
    assert sizes[1] == len(memo) == len(seeds) * 7  # the derived twin = the entropy probe


def test_a_full_memo_recomputes_instead_of_growing(seeds):
    spec = spec_of(ar_condcal)
    jobs = [j for p in prepared(seeds, spec, None) for j in p.jobs]
    memo = st.ResultMemo(budget=3 * jobs[0].X_eval.shape[0] * 8)  # room for 3 predictions
    first = st.fit_predict(jobs, memo, [st.data_key(j) for j in jobs])
    assert len(memo) == 3 and memo.nbytes <= memo.budget
    again = prepared(seeds, spec, ("bandwidth", "scott×1"))
    jobs2 = [j for p in again for j in p.jobs]
    second = st.fit_predict(jobs2, memo, [st.data_key(j) for j in jobs2])
    for (a, _), (b, _) in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(memo) == 3
