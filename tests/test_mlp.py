"""The full-vector MLP: batched training equals one-at-a-time on both trainers (compiled on
CPU, batched torch), the two trainers agree, and it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routeaudit.calibrators import MLPCalibrator, clone, fit_many
from routeaudit.calibrators.mlp_torch import MaskedAdam

SMALL = dict(hidden_layer_sizes=(32, 32), max_epochs=25, restarts=2, batch_size=64)


@pytest.fixture(params=["compiled", "torch"])
def trainer(request, monkeypatch):
    """Run a test on the compiled CPU trainer and on the batched torch trainer."""
    from routeaudit.calibrators import mlp_compiled

    if request.param == "compiled" and not mlp_compiled.enabled():
        pytest.skip("compiled kernels are off")
    if request.param == "torch":
        monkeypatch.setattr("routeaudit.stats._kernels.USE_NUMBA", False)
    return request.param


def xor_data(n, seed, L=4):
    """Correctness depends on an interaction of two profile columns (no linear signal)."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.3, 1.0, n)
    H = rng.normal(size=(n, L))
    logit = 3.0 * np.sign(H[:, 0] * H[:, 1]) * np.minimum(np.abs(H[:, 0] * H[:, 1]), 1.0)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    return np.column_stack([c, H]), y


def nll(p, y):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def assert_same_model(a: MLPCalibrator, b: MLPCalibrator, X, tol=1e-5):
    assert a.selected_restart_ == b.selected_restart_
    assert a.n_epochs_ == b.n_epochs_ and a.best_epoch_ == b.best_epoch_
    for wa, wb in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_, strict=True):
        np.testing.assert_allclose(wa, wb, rtol=0, atol=tol)
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=0, atol=tol)
    np.testing.assert_allclose(a.restart_val_losses_, b.restart_val_losses_, rtol=0, atol=tol)


def test_fit_many_equals_training_each_alone_with_different_sizes(trainer):
    sizes = [300, 517, 129, 300]
    data = [xor_data(n, seed=i) for i, n in enumerate(sizes)]
    seeds = [0, 1, 2, 0]
    batched = fit_many([d[0] for d in data], [d[1] for d in data], seeds, **SMALL)
    assert len(batched) == 4
    for (X, y), seed, model in zip(data, seeds, batched, strict=True):
        alone = MLPCalibrator(**SMALL, random_state=seed).fit(X, y)
        assert model.random_state == seed
        assert_same_model(model, alone, X)


def test_fit_many_control_set_three_seeds_four_variants(trainer):
    """The audit's use: 3 seeds × (full, zeros, within-bin shuffled, global shuffled)."""
    Xs, ys, seeds = [], [], []
    for s in range(3):
        X, y = xor_data(600, seed=10 + s)
        rng = np.random.default_rng(s)
        zeros = X.copy()
        zeros[:, 1:] = 0.0
        shuffled = X.copy()
        shuffled[:, 1:] = X[rng.permutation(600), 1:]
        order = np.argsort(X[:, 0])
        within = X.copy()
        for chunk in np.array_split(order, 10):
            within[chunk, 1:] = X[rng.permutation(chunk), 1:]
        for variant in (X, zeros, within, shuffled):
            Xs.append(variant)
            ys.append(y)
            seeds.append(s)
    models = fit_many(Xs, ys, seeds, **SMALL)
    for k in (0, 5, 11):
        alone = MLPCalibrator(**SMALL, random_state=seeds[k]).fit(Xs[k], ys[k])
        assert_same_model(models[k], alone, Xs[k])
    # the zeros twin sees nothing but confidence: its routing inputs are standardised to 0
    assert not models[1].active_columns_[1:].any() and models[1].active_columns_[0]


def test_mlp_learns_a_nonlinear_problem(trainer):
    from sklearn.linear_model import LogisticRegression

    X, y = xor_data(4000, seed=0)
    Xt, yt = xor_data(4000, seed=1)
    est = MLPCalibrator(max_epochs=60, restarts=1, random_state=0).fit(X, y)
    linear = LogisticRegression(C=np.inf, max_iter=1000).fit(X, y).predict_proba(Xt)[:, 1]
    constant = nll(np.full(len(yt), y.mean()), yt)
    assert nll(est.predict(Xt), yt) < constant - 0.1
    assert nll(est.predict(Xt), yt) < nll(linear, yt) - 0.1
    assert est.best_val_loss_ < constant - 0.1


def test_learned_state_and_early_stopping(trainer):
    X, y = xor_data(500, seed=3)
    est = MLPCalibrator(**{**SMALL, "max_epochs": 200, "patience": 3}, random_state=1).fit(X, y)
    d = X.shape[1]
    assert est.n_parameters_ == d * 32 + 32 + 32 * 32 + 32 + 32 + 1
    assert MLPCalibrator().fit(X, y).n_parameters_ == d * 64 + 64 + 64 * 64 + 64 + 64 + 1
    assert [w.shape for w in est.coefs_] == [(d, 32), (32, 32), (32, 1)]
    assert est.best_val_loss_ == pytest.approx(est.restart_val_losses_.min())
    assert est.selected_restart_ == int(np.argmin(est.restart_val_losses_))
    assert est.best_epoch_ <= est.n_epochs_
    if est.n_epochs_ < 200:  # stopped early: exactly `patience` epochs without improvement
        assert est.n_epochs_ - est.best_epoch_ == 3


def test_zero_variance_columns_become_zero_inputs():
    X, y = xor_data(400, seed=4)
    a = X.copy()
    a[:, 2] = 0.0
    b = X.copy()
    b[:, 2] = 5.0
    ma = MLPCalibrator(**SMALL).fit(a, y)
    mb = MLPCalibrator(**SMALL).fit(b, y)
    assert not ma.active_columns_[2]
    np.testing.assert_array_equal(ma.predict(a), mb.predict(b))
    np.testing.assert_array_equal(
        mb.predict(b), mb.predict(np.column_stack([b[:, :2], np.full(len(b), -3.0), b[:, 3:]]))
    )


def test_determinism_and_seeds(trainer):
    X, y = xor_data(400, seed=5)
    p1 = MLPCalibrator(**SMALL, random_state=7).fit(X, y).predict(X)
    p2 = clone(MLPCalibrator(**SMALL, random_state=7)).fit(X, y).predict(X)
    p3 = MLPCalibrator(**SMALL, random_state=8).fit(X, y).predict(X)
    np.testing.assert_array_equal(p1, p2)
    assert np.max(np.abs(p1 - p3)) > 1e-4


def test_masked_adam_matches_torch_adam():
    rng = np.random.default_rng(0)
    init = rng.normal(size=(3, 7))
    grads = [rng.normal(size=(3, 7)) for _ in range(6)]
    active = [np.array([True, True, True]), np.array([True, False, True])] * 3
    p = torch.tensor(init, dtype=torch.float64)
    opt = MaskedAdam(p.shape, lr=1e-2, weight_decay=1e-2, device="cpu", dtype=torch.float64)
    refs = [torch.nn.Parameter(torch.tensor(init[b], dtype=torch.float64)) for b in range(3)]
    ref_opts = [torch.optim.Adam([r], lr=1e-2, weight_decay=1e-2) for r in refs]
    for g, act in zip(grads, active, strict=True):
        opt.step(p, torch.tensor(g, dtype=torch.float64), act)
        for b in range(3):
            if act[b]:
                refs[b].grad = torch.tensor(g[b], dtype=torch.float64)
                ref_opts[b].step()
    for b in range(3):
        np.testing.assert_allclose(p[b].numpy(), refs[b].detach().numpy(), rtol=1e-12, atol=1e-14)
    assert opt.t.tolist() == [6, 3, 6]


def test_fit_many_rejects_bad_input():
    X, y = xor_data(100, seed=0)
    with pytest.raises(ValueError, match="columns"):
        fit_many([X, X[:, :3]], [y, y], [0, 1], **SMALL)
    with pytest.raises(ValueError, match="differ in length"):
        fit_many([X], [y, y], [0])
    with pytest.raises(TypeError, match="seeds"):
        fit_many([X], [y], [0], random_state=3)
    assert fit_many([], [], []) == []


def test_hand_written_gradient_matches_autograd():
    from routeaudit.calibrators import mlp_torch as tt
    from routeaudit.calibrators import mlp_training as tr

    layers = tr._layer_sizes(5, (7, 6))
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(3, tr._n_parameters(5, (7, 6)), dtype=torch.float64, generator=gen)
    x = torch.randn(3, 11, 5, dtype=torch.float64, generator=gen)
    y = (torch.rand(3, 11, generator=gen) < 0.5).double()
    mask = torch.ones(3, 11, dtype=torch.float64)
    mask[1, 7:] = 0.0
    grad = tt.gradient(flat, x, y, mask / mask.sum(1, keepdim=True), layers)
    leaf = flat.clone().requires_grad_(True)
    loss = tt.masked_bce(tt.forward(leaf, x, layers), y, mask).sum()
    (ref,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-14)


def test_forward_matches_a_plain_numpy_forward_per_network():
    """The batched forward (GEMM layers, multiply-and-sum for the one-output layer) against
    an independent float64 numpy forward of each network's unpacked weights."""
    from routeaudit.calibrators import mlp_torch as tt
    from routeaudit.calibrators import mlp_training as tr

    d, hidden = 5, (7, 6)
    layers = tr._layer_sizes(d, hidden)
    rng = np.random.default_rng(1)
    flat = rng.normal(size=(4, tr._n_parameters(d, hidden)))
    x = rng.normal(size=(4, 13, d))
    got = tt.forward(torch.tensor(flat), torch.tensor(x), layers).numpy()
    for b in range(4):
        h, off = x[b], 0
        for k, (fi, fo) in enumerate(layers):
            W = flat[b, off : off + fi * fo].reshape(fi, fo)
            bias = flat[b, off + fi * fo : off + fi * fo + fo]
            off += fi * fo + fo
            h = h @ W + bias
            if k < len(layers) - 1:
                h = np.maximum(h, 0.0)
        np.testing.assert_allclose(got[b], h[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 8, 9, 10, 17, 36, 37])
def test_passes_cover_all_networks_in_balanced_groups(n):
    from routeaudit.calibrators import mlp_torch as tr

    parts = tr._passes(n)
    covered = [i for part in parts for i in range(n)[part]]
    assert covered == list(range(n))
    sizes = [len(range(n)[part]) for part in parts]
    assert max(sizes) <= tr._NETS_PER_PASS
    assert len(parts) == -(-n // tr._NETS_PER_PASS)  # as few passes as the cap allows
    assert max(sizes) - min(sizes) <= 1


def test_networks_per_pass_does_not_change_the_result(monkeypatch):
    """Each network's arithmetic must not depend on which networks share its kernel pass."""
    from routeaudit.calibrators import mlp_torch as tr

    monkeypatch.setattr("routeaudit.stats._kernels.USE_NUMBA", False)  # the torch trainer

    data = [xor_data(n, seed=20 + i) for i, n in enumerate([300, 240, 300, 190, 300])]
    args = ([d[0] for d in data], [d[1] for d in data], [0, 1, 2, 3, 4])
    small = {**SMALL, "max_epochs": 8}
    ref = fit_many(*args, **small)  # 10 networks: two passes of 5
    monkeypatch.setattr(tr, "_NETS_PER_PASS", 3)  # four passes of 3, 3, 2, 2
    other = fit_many(*args, **small)
    for a, b in zip(ref, other, strict=True):
        for wa, wb in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_, strict=True):
            np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(a.restart_val_losses_, b.restart_val_losses_)


def _trainers(layers, n_nets=4, seed=0):
    """The same networks on both trainers: (compiled, torch, training rows per network)."""
    from routeaudit.calibrators import mlp_training as tr
    from routeaudit.calibrators.mlp_compiled import CompiledNetworks
    from routeaudit.calibrators.mlp_torch import TorchNetworks

    rng = np.random.default_rng(seed)
    d = layers[0][0]
    sizes = [int(n) for n in rng.integers(150, 400, n_nets)]
    Ztr = [rng.normal(size=(n, d)) for n in sizes]
    ytr = [(rng.random(n) < 0.5).astype(float) for n in sizes]
    Zva = [rng.normal(size=(n // 4 + 1, d)) for n in sizes]
    yva = [(rng.random(z.shape[0]) < 0.5).astype(float) for z in Zva]
    init = np.stack([tr._init_flat(rng, layers) for _ in sizes])
    adam = dict(lr=1e-2, weight_decay=1e-3, betas=(0.9, 0.999), eps=1e-8)
    data = (tr._pad_rows(Ztr, (d,)), tr._pad_rows(ytr), tr._pad_rows(Zva, (d,)),
            tr._pad_rows(yva), np.array([z.shape[0] for z in Zva]))
    compiled = CompiledNetworks(*data, init, layers, adam)
    torch_nets = TorchNetworks(*data, init, layers, adam, "cpu")
    return compiled, torch_nets, np.array(sizes)


def test_compiled_trainer_matches_the_torch_trainer_epoch_by_epoch():
    """The compiled epoch (BLAS products, fused loops) against the torch trainer, whose
    gradient is checked against autograd above: the same parameters to float32 rounding
    after each epoch, ragged last batches, a dropped network and a kept best included."""
    from routeaudit.calibrators import mlp_compiled
    from routeaudit.calibrators import mlp_training as tr

    if not mlp_compiled.enabled():
        pytest.skip("compiled kernels are off")
    layers = tr._layer_sizes(3, (16, 8))
    compiled, torch_nets, sizes = _trainers(layers)
    rngs = [np.random.default_rng(i) for i in range(len(sizes))]
    live = np.arange(len(sizes))
    for epoch in range(4):
        idx, counts = tr.minibatch_plan([rngs[b] for b in live], sizes[live], 64)
        compiled.epoch(idx, counts)
        torch_nets.epoch(idx, counts)
        np.testing.assert_allclose(compiled.flat, torch_nets.flat.numpy(), rtol=1e-4, atol=2e-6)
        assert not np.array_equal(compiled.flat, compiled.best())  # training moved them
        np.testing.assert_allclose(compiled.val_losses(), torch_nets.val_losses(), rtol=1e-5)
        if epoch == 1:
            keep = np.array([True, False, True, True])
            compiled.save_best(np.array([1]), np.array([1]))
            torch_nets.save_best(np.array([1]), np.array([1]))
            compiled.keep(keep)
            torch_nets.keep(keep)
            live = live[keep]
    np.testing.assert_allclose(compiled.best(), torch_nets.best(), rtol=1e-4, atol=2e-6)
    np.testing.assert_array_equal(compiled.t, torch_nets.opt.t)


def test_trainers_fit_the_same_models():
    """End to end (early stopping, restarts): the compiled CPU trainer and the torch trainer
    stop at the same epochs and predict the same to float32 rounding."""
    from routeaudit.calibrators import mlp_compiled

    if not mlp_compiled.enabled():
        pytest.skip("compiled kernels are off")
    X, y = xor_data(600, seed=9)
    params = {**SMALL, "max_epochs": 12}
    compiled = fit_many([X, X[:400]], [y, y[:400]], [3, 4], **params)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("routeaudit.stats._kernels.USE_NUMBA", False)
        reference = fit_many([X, X[:400]], [y, y[:400]], [3, 4], **params)
    for a, b in zip(compiled, reference, strict=True):
        assert a.n_epochs_ == b.n_epochs_ and a.best_epoch_ == b.best_epoch_
        np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=0, atol=1e-5)
