"""routeaudit.metrics against independent references, slow obvious loops and properties.

References: netcal 1.4.0, torchmetrics 1.9.0, relplot 1.0.3, uncertainty-calibration 0.1.4
(``calibration``) and scikit-learn, on the data generator of reference-values.md's appendix.
Closure mapping: netcal / relplot / torchmetrics bin [lo, hi) (our ``closed="left"``);
uncertainty-calibration bins (lo, hi] (our default ``closed="right"``). relplot and
torchmetrics give conf == 1.0 its own bin, so they are only compared on data without it.
"""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routeaudit import metrics
from routeaudit.metrics import (
    bin_indices,
    binary_brier,
    binary_nll,
    brier,
    classwise_ece,
    confidence_and_correct,
    ece,
    equal_mass_edges,
    mce,
    nll,
    quantile_tiles,
    smooth_ece,
    tile_ece,
    worst_tile_ece,
)

calibration = pytest.importorskip("calibration")  # uncertainty-calibration
relplot = pytest.importorskip("relplot")
netcal_metrics = pytest.importorskip("netcal.metrics")
tm_cls = pytest.importorskip("torchmetrics.functional.classification")

TOL = 1e-9
HSET = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------- data and loops


def make_data(n=10_000, k=10, seed=0, alpha=0.5, temp=1.5):
    """reference-values.md appendix: over-confident Dirichlet model, tempered labels."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, alpha), size=n)
    logp = np.log(np.maximum(probs, 1e-300))
    q = np.exp((logp - logp.max(1, keepdims=True)) / temp)
    q /= q.sum(1, keepdims=True)
    u = rng.random(n)
    labels = np.minimum((q.cumsum(1) < u[:, None]).sum(1), k - 1).astype(np.int64)
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    route = np.clip(0.5 * conf + 0.5 * rng.random(n), 0, 1)
    return probs, labels, conf, correct, route


def saturate(probs):
    """The saturated float32 variant: logits = 10 log p, softmax in float32 (torch)."""
    logits = (10 * np.log(np.maximum(probs, 1e-300))).astype(np.float32)
    return torch.softmax(torch.from_numpy(logits), 1).numpy()


def slow_bin(c, n_bins, closed):
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    if closed == "right":  # smallest m with c <= e[m+1]; c == 0 -> bin 0
        for m in range(n_bins):
            if c <= edges[m + 1]:
                return m
        return n_bins - 1
    for m in range(n_bins - 1, -1, -1):  # largest m with c >= e[m]; 1.0 -> last bin
        if c >= edges[m]:
            return m
    return 0


def slow_bins(conf, n_bins, closed):
    return np.array([slow_bin(float(c), n_bins, closed) for c in conf], dtype=np.int64)


def slow_ece(conf, correct, n_bins=15, closed="right", norm="l1", min_count=1):
    """Per-example Python loop: sums per bin, then the formula, nothing vectorised."""
    cnt, sc, sy = [0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
    for c, y in zip(conf, correct, strict=True):
        b = slow_bin(float(c), n_bins, closed)
        cnt[b] += 1
        sc[b] += float(c)
        sy[b] += float(y)
    n = len(conf)
    gaps = [(cnt[b], abs(sy[b] / cnt[b] - sc[b] / cnt[b])) for b in range(n_bins) if cnt[b]]
    if norm == "l1":
        return sum(nb / n * g for nb, g in gaps)
    if norm == "l2":
        return math.sqrt(sum(nb / n * g * g for nb, g in gaps))
    kept = [g for nb, g in gaps if nb >= min_count]
    return max(kept) if kept else float("nan")


def slow_classwise(probs, labels, n_bins=15, closed="right"):
    k = probs.shape[1]
    return sum(slow_ece(probs[:, j], labels == j, n_bins, closed) for j in range(k)) / k


@pytest.fixture(scope="module")
def main_data():
    probs, labels, conf, correct, route = make_data()
    return probs, labels, conf, correct, route


@pytest.fixture(scope="module")
def sat_data(main_data):
    probs, labels = main_data[:2]
    p32 = saturate(probs)
    conf, correct = confidence_and_correct(p32, labels, from_logits=False)
    return p32, labels, conf, correct


def _datasets(main_data, sat_data):
    """(name, probs, labels, conf, correct) for the main, saturated and two extra sets."""
    out = [("main", *main_data[:4]), ("saturated", *sat_data)]
    for seed, n, k, alpha in [(1, 3000, 3, 1.0), (2, 5000, 100, 0.1)]:
        out.append((f"seed{seed}", *make_data(n, k, seed, alpha)[:4]))
    return out


# --------------------------------------------------------------------------- hard-coded values


def test_reference_values_main(main_data):
    """reference-values.md §2 table, main data, to the printed precision (10 decimals)."""
    probs, labels, conf, correct, _ = main_data
    assert not (conf == 1.0).any()
    close = dict(abs=6e-11, rel=0)
    assert ece(conf, correct) == pytest.approx(0.0904229741, **close)
    assert ece(conf, correct, closed="left") == pytest.approx(0.0904229741, **close)
    assert mce(conf, correct, min_count=1, closed="left") == pytest.approx(0.2014891504, **close)
    assert mce(conf, correct) == pytest.approx(0.2014891504, **close)  # max bin has n >= 5
    assert ece(conf, correct, norm="l2") == pytest.approx(0.0982426343, **close)
    em = ece(conf, correct, strategy="equal_mass", closed="left")
    assert em == pytest.approx(0.0903348386, **close)
    assert classwise_ece(probs, labels) == pytest.approx(0.0238445745, **close)
    value, sigma = smooth_ece(conf, correct, return_sigma=True)
    assert value == pytest.approx(0.0903264834, **close)
    assert sigma == 0.0908203125
    assert smooth_ece(conf, correct, sigma=0.05) == pytest.approx(0.0903413683, **close)
    assert smooth_ece(conf, correct, sigma=0.1) == pytest.approx(0.0903219802, **close)


def test_reference_values_saturated(sat_data):
    """Saturated float32 data: the same table, to 5e-7.

    torch's float32 softmax is not bit-identical across builds/CPUs: this build saturates
    291 rows to exactly 1.0 where the reference machine had 289, which moves the values
    by ~2e-9 (ECE) to ~1e-7 (smECE). The library cross-checks below use the data as
    generated here and agree to 1e-9 or better.
    """
    p32, labels, conf, correct = sat_data
    assert 280 <= int((conf == 1.0).sum()) <= 300
    close = dict(abs=5e-7, rel=0)
    assert ece(conf, correct) == pytest.approx(0.6138431007, **close)
    assert ece(conf, correct, closed="left") == pytest.approx(0.6138431007, **close)
    assert mce(conf, correct, min_count=1) == pytest.approx(0.6730948764, **close)
    assert ece(conf, correct, norm="l2") == pytest.approx(0.6237908254, **close)
    assert classwise_ece(p32, labels) == pytest.approx(0.1267529032, **close)
    assert smooth_ece(conf, correct) == pytest.approx(0.6124209040, **close)
    assert smooth_ece(conf, correct, sigma=0.05) == pytest.approx(0.6140121337, **close)


def test_reference_value_scale_1e6():
    """reference-values.md §2 scale check: float64 reference 0.092124660659 at N = 1e6."""
    _, _, conf, correct, _ = make_data(n=1_000_000)
    assert ece(conf, correct) == pytest.approx(0.092124660659, abs=1e-12, rel=0)
    assert ece(conf, correct, closed="left") == pytest.approx(0.092124660659, abs=1e-12, rel=0)


# --------------------------------------------------------------------------- edge cases A, B


def test_edge_case_a_closure():
    """100 × conf = 1/3 (the edge 5/15) all correct + 100 × 0.39 all wrong."""
    conf = np.r_[np.full(100, 1 / 3), np.full(100, 0.39)]
    correct = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    assert ece(conf, correct, closed="left") == pytest.approx(0.1383333333, abs=1e-9)
    assert ece(conf, correct, closed="right") == pytest.approx(0.5283333333, abs=1e-9)
    assert ece(conf, correct) == ece(conf, correct, closed="right")  # the default
    # the libraries on each side of the disagreement
    y = correct.astype(float)
    assert relplot.metrics.binnedECE(conf, y, 15) == pytest.approx(0.1383333333, abs=1e-9)
    assert netcal_metrics.ECE(15).measure(conf, correct.astype(int)) == pytest.approx(
        0.1383333333, abs=1e-9
    )
    assert calibration.get_ece(conf, correct.astype(int)) == pytest.approx(0.5283333333, abs=1e-9)


@pytest.mark.parametrize("closed", ["right", "left"])
def test_edge_case_b_one_in_last_bin(closed):
    """100 × conf = 1.0 all wrong + 100 × 0.95 all correct: 1.0 shares the last bin."""
    conf = np.r_[np.ones(100), np.full(100, 0.95)]
    correct = np.r_[np.zeros(100), np.ones(100)]
    assert ece(conf, correct, closed=closed) == pytest.approx(0.475, abs=1e-12)
    assert mce(conf, correct, closed=closed) == pytest.approx(0.475, abs=1e-12)
    assert ece(conf, correct, closed=closed, norm="max") == pytest.approx(0.475, abs=1e-12)
    assert bin_indices(np.array([1.0]), 15, closed)[0] == 14
    assert netcal_metrics.ECE(15).measure(conf, correct.astype(int)) == pytest.approx(0.475)
    assert netcal_metrics.MCE(15).measure(conf, correct.astype(int)) == pytest.approx(0.475)


def test_zero_confidence_is_kept_in_first_bin():
    conf = np.array([0.0, 0.0, 0.05])
    correct = np.array([0.0, 1.0, 0.0])
    for closed in ("right", "left"):
        assert bin_indices(conf, 15, closed).tolist() == [0, 0, 0]
        assert ece(conf, correct, closed=closed) == pytest.approx(abs(1 / 3 - 0.05 / 3))


# --------------------------------------------------------------------------- cross-checks


def test_ece_vs_libraries(main_data, sat_data):
    for name, probs, labels, conf, correct in _datasets(main_data, sat_data):
        y_int = correct.astype(int)
        y_f = correct.astype(float)
        left = ece(conf, correct, closed="left")
        right = ece(conf, correct, closed="right")
        assert left == pytest.approx(netcal_metrics.ECE(15).measure(conf, y_int), abs=TOL), name
        assert right == pytest.approx(calibration.get_ece(conf, y_int), abs=TOL), name
        assert left == pytest.approx(slow_ece(conf, correct, closed="left"), abs=1e-12), name
        assert right == pytest.approx(slow_ece(conf, correct, closed="right"), abs=1e-12), name
        # float32 input is binned on its exact float64 value
        c32 = conf.astype(np.float32)
        assert ece(c32, correct) == ece(c32.astype(np.float64), correct), name
        if (conf == 1.0).any():  # relplot and torchmetrics give 1.0 a bin of its own
            continue
        assert left == pytest.approx(relplot.metrics.binnedECE(conf, y_f, 15), abs=TOL), name
        tm = tm_cls.binary_calibration_error(torch.from_numpy(conf), torch.from_numpy(y_int), 15)
        assert left == pytest.approx(float(tm), rel=2e-5), name
        tm_mc = tm_cls.multiclass_calibration_error(
            torch.from_numpy(probs), torch.from_numpy(labels), probs.shape[1], 15
        )
        assert left == pytest.approx(float(tm_mc), rel=2e-5), name


def test_mce_and_l2_vs_references(main_data, sat_data):
    for name, _, _, conf, correct in _datasets(main_data, sat_data):
        y_int = correct.astype(int)
        nc = netcal_metrics.MCE(15).measure(conf, y_int)
        assert mce(conf, correct, min_count=1, closed="left") == pytest.approx(nc, abs=TOL), name
        assert ece(conf, correct, closed="left", norm="max") == pytest.approx(nc, abs=TOL), name
        for closed in ("right", "left"):
            for m in (1, 5, 50):
                want = slow_ece(conf, correct, closed=closed, norm="max", min_count=m)
                got = mce(conf, correct, min_count=m, closed=closed)
                assert got == pytest.approx(want, abs=1e-12), (name, closed, m)
        l2 = ece(conf, correct, norm="l2")
        ucal = calibration.lower_bound_scaling_ce(
            conf, y_int, p=2, debias=False, num_bins=15,
            binning_scheme=calibration.get_equal_prob_bins, mode="top-label",
        )  # fmt: skip
        assert l2 == pytest.approx(ucal, abs=TOL), name
        assert l2 == pytest.approx(slow_ece(conf, correct, norm="l2"), abs=1e-12), name
        if not (conf == 1.0).any():
            tm = tm_cls.binary_calibration_error(
                torch.from_numpy(conf), torch.from_numpy(y_int), 15, norm="l2"
            )
            assert ece(conf, correct, closed="left", norm="l2") == pytest.approx(
                float(tm), rel=2e-5
            ), name


def test_equal_mass_vs_netcal(main_data, sat_data):
    for name, _, _, conf, correct in _datasets(main_data, sat_data):
        y_int = correct.astype(int)
        nc = netcal_metrics.ECE(15, equal_intervals=False).measure(conf, y_int)
        got = ece(conf, correct, strategy="equal_mass", closed="left")
        assert got == pytest.approx(nc, abs=TOL), name
        edges = equal_mass_edges(conf, 15)
        assert edges[0] == 0.0 and edges[-1] == 1.0 and np.all(np.diff(edges) >= 0)
    # netcal agrees with uncertainty-calibration's get_ece_em when there are no ties
    conf, correct = main_data[2], main_data[3]
    em = calibration.get_ece_em(conf, correct.astype(int))
    assert ece(conf, correct, strategy="equal_mass") == pytest.approx(em, abs=TOL)


def test_equal_mass_with_ties_respects_closure():
    """Tied confidences put data exactly on the quantile edges, where the closure matters."""
    rng = np.random.default_rng(4)
    conf = rng.choice(np.linspace(0.05, 0.95, 40), 2000)
    correct = rng.random(2000) < 0.6
    edges = equal_mass_edges(conf, 10)
    assert np.isin(edges[1:-1], conf).any()
    for closed in ("right", "left"):
        want_bins = [
            next(m for m in range(10) if c <= edges[m + 1] or m == 9)
            if closed == "right"
            else next(m for m in range(9, -1, -1) if c >= edges[m] or m == 0)
            for c in conf
        ]
        r = conf - correct
        want = np.abs(np.bincount(want_bins, r, 10)).sum() / conf.size
        got = ece(conf, correct, 10, strategy="equal_mass", closed=closed)
        assert got == pytest.approx(want, abs=1e-12), closed
    nc = netcal_metrics.ECE(10, equal_intervals=False).measure(conf, correct.astype(int))
    assert ece(conf, correct, 10, strategy="equal_mass", closed="left") == pytest.approx(
        nc, abs=TOL
    )
    assert ece(conf, correct, 10, strategy="equal_mass", closed="right") != pytest.approx(nc)


def test_classwise_vs_references(main_data, sat_data):
    for name, probs, labels, _, _ in _datasets(main_data, sat_data):
        got = classwise_ece(probs, labels)
        ucal = calibration.get_ece(probs, labels, mode="marginal")
        assert got == pytest.approx(ucal, abs=TOL), name
        if probs.shape[1] <= 10:  # the slow loop is per example and per class
            assert got == pytest.approx(slow_classwise(probs, labels), abs=1e-12), name
        # netcal clips to [eps, 1 - eps] of the input dtype (1.2e-7 for float32): give it float64
        p64 = probs.astype(np.float64)
        per_class = [
            netcal_metrics.ECE(15).measure(p64[:, j], (labels == j).astype(int))
            for j in range(probs.shape[1])
        ]
        left = classwise_ece(probs, labels, closed="left")
        assert left == pytest.approx(np.mean(per_class), abs=TOL), name


def test_smooth_ece_vs_relplot(main_data, sat_data):
    """Our reimplementation of relplot 1.0.3's binned estimator (including its grid)."""
    for name, _, _, conf, correct in _datasets(main_data, sat_data):
        f, y = conf.astype(np.float64), correct.astype(np.float64)
        value, sigma = smooth_ece(conf, correct, return_sigma=True)
        ref_value, ref_sigma = relplot.smECE(f, y, return_width=True)
        assert sigma == ref_sigma, name
        assert value == pytest.approx(ref_value, abs=1e-9), name
        # odd and even grid sizes (0.0049 -> 2042 points) and the evaluation-mesh switch
        for s in (0.5, 0.1, 0.05, 0.02, 0.0049, 0.003):
            want = relplot.smECE_sigma(f, y, s)
            assert smooth_ece(conf, correct, sigma=s) == pytest.approx(want, abs=1e-9), (name, s)


def test_reflected_smooth_is_fftconvolve_bit_for_bit():
    """The cached-spectrum smoothing performs ``scipy.signal.fftconvolve``'s steps: the same
    numbers, not merely close (odd and even grid sizes)."""
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(3)
    for n_grid in (1001, 1000, 2042, 7):
        grid = rng.normal(size=(2, n_grid))
        spectrum, n_fft = metrics._reflected_spectrum(grid)
        for sigma in (0.5, 0.05, 0.0049):
            t = np.linspace(0.0, 1.0, n_grid)
            kernel = (np.exp(-((t - 0.5) ** 2) / (2.0 * sigma * sigma))
                      / (math.sqrt(2 * math.pi) * sigma))
            ext = np.pad(grid, ((0, 0), (n_grid - 1, n_grid - 1)), mode="reflect")
            full = fftconvolve(ext, kernel[None, :], mode="valid", axes=1)
            want = full[:, n_grid // 2 : n_grid // 2 + n_grid]
            got = metrics._reflected_smooth(spectrum, n_fft, n_grid, sigma)
            np.testing.assert_array_equal(got, want)


def test_smooth_ece_small_sigma_vs_relplot():
    """Well calibrated data push σ* below 0.01, where relplot's grid grows with 1/σ."""
    rng = np.random.default_rng(5)
    c = rng.random(20_000)
    y = (rng.random(20_000) < c).astype(float)
    value, sigma = smooth_ece(c, y, return_sigma=True)
    ref_value, ref_sigma = relplot.smECE(c, y, return_width=True)
    assert sigma == ref_sigma < 0.02
    assert value == pytest.approx(ref_value, abs=1e-9)


def test_confidence_and_correct_vs_relplot(main_data):
    probs, labels = main_data[:2]
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(500, 7))
    lab = rng.integers(0, 7, 500)
    conf, correct = confidence_and_correct(logits, lab)
    ref_conf, ref_correct = relplot.multiclass_logits_to_confidences(logits, lab)
    np.testing.assert_allclose(conf, ref_conf, rtol=1e-14)
    np.testing.assert_array_equal(correct, ref_correct)
    assert conf.dtype == np.float64 and correct.dtype == np.float64
    conf_p, correct_p = confidence_and_correct(probs, labels, from_logits=False)
    np.testing.assert_array_equal(conf_p, main_data[2])
    np.testing.assert_array_equal(correct_p, main_data[3].astype(float))


def test_confidence_and_correct_ties_and_overflow():
    logits = np.array([[2.0, 2.0, 1.0], [0.0, 5.0, 5.0], [1000.0, -1000.0, 999.0]])
    conf, correct = confidence_and_correct(logits, np.array([0, 2, 0]))
    assert correct.tolist() == [1.0, 0.0, 1.0]  # ties go to the lowest index
    assert np.isfinite(conf).all()
    assert conf[2] == pytest.approx(1 / (1 + math.exp(-1)))
    probs = np.array([[0.4, 0.4, 0.2]])
    assert confidence_and_correct(probs, np.array([1]), from_logits=False)[1][0] == 0.0


def test_proper_scores_vs_references(main_data):
    probs, labels, conf, correct, _ = main_data
    logits = torch.from_numpy(np.log(probs))
    want_nll = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)))
    assert nll(probs, labels) == pytest.approx(want_nll, rel=1e-12)
    onehot = np.eye(probs.shape[1])[labels]
    assert brier(probs, labels) == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), rel=1e-12)
    y = correct.astype(float)
    want_bnll = -np.mean(y * np.log(conf) + (1 - y) * np.log(1 - conf))
    assert binary_nll(conf, correct) == pytest.approx(want_bnll, rel=1e-12)
    assert binary_brier(conf, correct) == pytest.approx(np.mean((conf - y) ** 2), rel=1e-12)
    sk = pytest.importorskip("sklearn.metrics")
    assert binary_brier(conf, correct) == pytest.approx(sk.brier_score_loss(y, conf), rel=1e-12)
    assert nll(probs, labels) == pytest.approx(sk.log_loss(labels, probs), rel=1e-9)


def test_nll_guards():
    assert nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))
    assert binary_nll(np.array([1.0]), np.array([0])) == pytest.approx(-math.log(1e-6), rel=1e-9)
    assert binary_nll(np.array([0.0]), np.array([0])) == pytest.approx(1e-6, rel=1e-3)


# --------------------------------------------------------------------------- tiles


def test_tile_ece_vs_loop(main_data):
    _, _, conf, correct, route = main_data
    tiles = quantile_tiles(route, 3)
    cuts = np.quantile(route, [1 / 3, 2 / 3])
    want_tiles = np.array([0 if r <= cuts[0] else 1 if r <= cuts[1] else 2 for r in route])
    np.testing.assert_array_equal(tiles, want_tiles)
    per = tile_ece(conf, correct, route)
    for t in range(3):
        sel = tiles == t
        assert per[t] == pytest.approx(slow_ece(conf[sel], correct[sel]), abs=1e-12)
        assert per[t] == pytest.approx(ece(conf[sel], correct[sel]), abs=1e-12)
    assert worst_tile_ece(conf, correct, route) == per.max()
    per5 = tile_ece(conf, correct, route, k=5, closed="left")
    t5 = quantile_tiles(route, 5)
    for t in range(5):
        sel = t5 == t
        assert per5[t] == pytest.approx(ece(conf[sel], correct[sel], closed="left"), abs=1e-12)


def test_quantile_tiles_ties_go_down_and_empty_tiles_are_nan():
    summary = np.array([0.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    tiles = quantile_tiles(summary, 3)
    assert tiles.tolist() == [0, 0, 0, 0, 0, 2]  # both cuts are 1.0: tile 1 is empty
    conf = np.full(6, 0.7)
    correct = np.array([1, 0, 1, 1, 0, 1])
    per = tile_ece(conf, correct, summary)
    assert np.isnan(per[1]) and not np.isnan(per[[0, 2]]).any()
    assert worst_tile_ece(conf, correct, summary) == np.nanmax(per)
    assert quantile_tiles(np.array([1.0, 2.0, 3.0]), 1).tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- exact binning


@pytest.mark.parametrize("n_bins", [1, 2, 3, 7, 10, 15, 20, 33, 100, 1000, 4097])
@pytest.mark.parametrize("closed", ["right", "left"])
def test_bin_indices_exact_at_every_edge(n_bins, closed):
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    some = np.r_[edges[:: max(1, n_bins // 97)], edges[-3:]]  # keep the slow loop cheap
    vals = np.concatenate([some, np.nextafter(some, -1.0), np.nextafter(some, 2.0)])
    vals = np.clip(vals, 0.0, 1.0)
    got = bin_indices(vals, n_bins, closed)
    np.testing.assert_array_equal(got, slow_bins(vals, n_bins, closed))
    m = np.arange(1, n_bins)
    inner = bin_indices(edges[1:-1], n_bins, closed)
    np.testing.assert_array_equal(inner, m - 1 if closed == "right" else m)


@HSET
@given(
    n_bins=st.integers(1, 300),
    picks=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([-1, 0, 0, 1])), min_size=1),
    closed=st.sampled_from(["right", "left"]),
)
def test_bin_edge_ties_property(n_bins, picks, closed):
    """Values on (or one ulp off) the edges: lower bin under "right", upper under "left"."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    vals = []
    for i, off in picks:
        e = edges[i % (n_bins + 1)]
        v = e if off == 0 else np.nextafter(e, 2.0 if off > 0 else -1.0)
        vals.append(min(max(v, 0.0), 1.0))
    vals = np.array(vals)
    np.testing.assert_array_equal(
        bin_indices(vals, n_bins, closed), slow_bins(vals, n_bins, closed)
    )
    correct = np.arange(vals.size) % 2
    got = ece(vals, correct, n_bins, closed=closed)
    assert got == pytest.approx(slow_ece(vals, correct, n_bins, closed), abs=1e-12)


def test_bin_indices_long_input_crosses_chunks():
    rng = np.random.default_rng(7)
    edges = np.linspace(0.0, 1.0, 16)
    c = np.concatenate([rng.random(100_000), rng.choice(edges, 5_000)])
    rng.shuffle(c)
    for closed in ("right", "left"):
        side = "left" if closed == "right" else "right"
        want = np.minimum(np.searchsorted(edges[1:-1], c, side=side), 14)
        np.testing.assert_array_equal(bin_indices(c, 15, closed), want)
        y = rng.random(c.size) < c
        assert ece(c, y, closed=closed) == pytest.approx(
            np.abs(np.bincount(want, c - y, 15)).sum() / c.size, abs=1e-12
        )


# --------------------------------------------------------------------------- properties

unit = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)


@st.composite
def conf_correct(draw, max_size=300):
    n = draw(st.integers(1, max_size))
    conf = np.array(draw(st.lists(unit, min_size=n, max_size=n)))
    correct = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return conf, correct


@HSET
@given(
    data=conf_correct(), seed=st.integers(0, 2**32 - 1), closed=st.sampled_from(["right", "left"])
)
def test_permutation_invariance(data, seed, closed):
    conf, correct = data
    perm = np.random.default_rng(seed).permutation(conf.size)
    for fn in (
        lambda c, y: ece(c, y, closed=closed),
        lambda c, y: ece(c, y, closed=closed, norm="l2"),
        lambda c, y: mce(c, y, min_count=1, closed=closed),
        lambda c, y: smooth_ece(c, y, sigma=0.1),
    ):
        assert fn(conf[perm], correct[perm]) == pytest.approx(fn(conf, correct), abs=1e-12)


@HSET
@given(data=conf_correct(), closed=st.sampled_from(["right", "left"]))
def test_bounds(data, closed):
    conf, correct = data
    e1 = ece(conf, correct, closed=closed)
    e2 = ece(conf, correct, closed=closed, norm="l2")
    mx = mce(conf, correct, min_count=1, closed=closed)
    assert 0.0 <= e1 <= e2 + 1e-12 <= mx + 2e-12 <= 1.0 + 2e-12
    assert mx == ece(conf, correct, closed=closed, norm="max")
    assert e1 == pytest.approx(slow_ece(conf, correct, closed=closed), abs=1e-12)
    s = smooth_ece(conf, correct)
    assert 0.0 <= s <= 1.0


@HSET
@given(c=unit, correct=st.lists(st.booleans(), min_size=1, max_size=200))
def test_constant_confidence(c, correct):
    y = np.array(correct)
    conf = np.full(y.size, c)
    want = abs(y.mean() - c)
    for closed in ("right", "left"):
        assert ece(conf, y, closed=closed) == pytest.approx(want, abs=1e-12)
        assert mce(conf, y, min_count=1, closed=closed) == pytest.approx(want, abs=1e-12)


@HSET
@given(data=conf_correct(), k=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_worst_tile_is_max_of_tiles(data, k, seed):
    conf, correct = data
    rng = np.random.default_rng(seed)
    summary = rng.integers(0, 4, conf.size).astype(float)  # many ties -> empty tiles
    per = tile_ece(conf, correct, summary, k)
    worst = worst_tile_ece(conf, correct, summary, k)
    assert per.shape == (k,)
    assert not np.isnan(per).all()
    for v in per[~np.isnan(per)]:
        assert worst >= v
    assert worst in per
    tiles = quantile_tiles(summary, k)
    assert np.isnan(per).tolist() == (np.bincount(tiles, minlength=k) == 0).tolist()


def test_perfectly_calibrated_data_gives_small_ece():
    rng = np.random.default_rng(0)
    c = rng.random(20_000)
    y = rng.random(20_000) < c
    assert ece(c, y) < 0.02
    assert ece(c, y, closed="left") < 0.02
    assert smooth_ece(c, y) < 0.02
    probs = rng.dirichlet(np.ones(4), 20_000)
    labels = (probs.cumsum(1) < rng.random(20_000)[:, None]).sum(1)
    assert classwise_ece(probs, labels) < 0.02


def test_miscalibrated_data_gives_large_ece():
    """The metrics must be able to fail: a model that is 0.2 over-confident everywhere."""
    rng = np.random.default_rng(1)
    c = rng.uniform(0.5, 1.0, 20_000)
    y = rng.random(20_000) < c - 0.2
    assert ece(c, y) == pytest.approx(0.2, abs=0.02)
    assert smooth_ece(c, y) == pytest.approx(0.2, abs=0.03)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("conf", "match"),
    [
        ([0.5, np.nan, 0.2], r"conf\[1\] = nan is not finite"),
        ([0.5, 0.2, np.inf], r"conf\[2\] = inf is not finite"),
        ([0.5, 1.5], r"conf\[1\] = 1.5 is outside \[0, 1\]"),
        ([-0.1, 0.5], r"conf\[0\] = -0\.1\d* is outside \[0, 1\]"),
    ],
)
def test_bad_confidences_raise(conf, match):
    c = np.array(conf)
    y = np.ones(c.size, bool)
    for fn in (
        lambda: ece(c, y),
        lambda: ece(c, y, strategy="equal_mass"),
        lambda: mce(c, y),
        lambda: bin_indices(c),
        lambda: smooth_ece(c, y),
        lambda: tile_ece(c, y, np.arange(c.size, dtype=float)),
        lambda: ece(c.astype(np.float32), y),
    ):
        with pytest.raises(ValueError, match=match):
            fn()


def test_bad_value_far_into_a_long_array_is_located():
    c = np.full(200_000, 0.5)
    c[150_001] = 1.0000001
    with pytest.raises(ValueError, match=r"conf\[150001\]"):
        ece(c, np.ones(c.size, bool))


def test_other_input_errors():
    c, y = np.array([0.2, 0.9]), np.array([0, 1])
    with pytest.raises(ValueError, match="same length"):
        ece(c, np.array([1]))
    with pytest.raises(ValueError, match="1-D"):
        ece(c[None, :], y[None, :])
    with pytest.raises(ValueError, match=r"correct\[0\] = 2.0"):
        ece(c, np.array([2.0, 1.0]))
    with pytest.raises(ValueError, match="closed"):
        ece(c, y, closed="both")
    with pytest.raises(ValueError, match="norm"):
        ece(c, y, norm="l3")
    with pytest.raises(ValueError, match="strategy"):
        ece(c, y, strategy="quantile")
    with pytest.raises(ValueError, match="n_bins"):
        ece(c, y, n_bins=0)
    with pytest.raises(ValueError, match="min_count"):
        mce(c, y, min_count=0)
    with pytest.raises(ValueError, match="same length"):
        tile_ece(c, y, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="not finite"):
        quantile_tiles(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="sigma"):
        smooth_ece(c, y, sigma=0.0)
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    with pytest.raises(ValueError, match=r"probs\[1, 0\] = nan is not finite"):
        classwise_ece(np.array([[0.2, 0.8], [np.nan, 0.4]]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels\[1\] = 2"):
        classwise_ece(probs, np.array([0, 2]))
    with pytest.raises(ValueError, match="labels must be 1-D"):
        nll(probs, np.array([0]))
    with pytest.raises(ValueError, match="2-D"):
        brier(probs[0], np.array([0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        confidence_and_correct(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="integers"):
        confidence_and_correct(probs, np.array([0.5, 1.0]))


def test_empty_input_is_nan():
    e = np.array([])
    assert math.isnan(ece(e, e))
    assert math.isnan(mce(e, e))
    assert math.isnan(smooth_ece(e, e))
    assert bin_indices(e).shape == (0,)


def test_docstring_examples():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
