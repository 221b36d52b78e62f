"""Training of the MLP calibrator: data preparation, minibatch orders, early stopping and
restarts, for many networks at once, on one of two trainers.

Why a module of its own: it holds what both trainers share, so a network sees the same data,
split, initialisation and minibatch order whichever trainer runs it. The trainers:
:class:`~routeaudit.calibrators.mlp_compiled.CompiledNetworks` (numba, one call per epoch;
the CPU default) and :class:`~routeaudit.calibrators.mlp_torch.TorchNetworks` (batched torch;
GPUs, and CPU when compiled kernels are off). Each is imported only when a model is fitted,
so ``import routeaudit.calibrators`` stays cheap, and torch is not imported to train on CPU.

:func:`fit_templates` (the engine of :func:`~routeaudit.calibrators.mlp.fit_many`) trains
many models — e.g. 3 seeds × 4 control variants × 3 restarts — together: each network keeps
its own data, minibatch order, Adam state and early-stopping state, and a network that
stops is dropped from the batch. A model trained together with others gets bit-for-bit the
weights it gets trained alone (``tests/test_mlp.py``). The architecture and training
defaults are listed in :mod:`routeaudit.calibrators.mlp`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from routeaudit.calibrators.base import as_correctness, as_feature_matrix

if TYPE_CHECKING:
    from routeaudit.calibrators.mlp import MLPCalibrator

_BETAS, _EPS = (0.9, 0.999), 1e-8  #: Adam's (torch.optim.Adam defaults)


def _layer_sizes(d: int, hidden: Sequence[int]) -> list[tuple[int, int]]:
    sizes = [d, *[int(h) for h in hidden], 1]
    return list(itertools.pairwise(sizes))


def _n_parameters(d: int, hidden: Sequence[int]) -> int:
    return sum(fi * fo + fo for fi, fo in _layer_sizes(d, hidden))


def _seed_rng(seed: int | None, stream: int) -> np.random.Generator:
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([int(seed), int(stream)])


def _standardization(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = X.mean(axis=0)
    sd = X.std(axis=0)
    active = np.isfinite(sd) & (sd > 1e-12 * np.maximum(1.0, np.abs(mean)))
    scale = np.where(active, sd, 1.0)
    return mean, scale, active


def _pad_rows(arrays: Sequence[np.ndarray], trailing: tuple = ()) -> np.ndarray:
    """The networks' arrays (different row counts) as one zero-padded float32 array
    [B, most rows, *trailing]: the layout both trainers take their data in."""
    out = np.zeros((len(arrays), max(a.shape[0] for a in arrays), *trailing), dtype=np.float32)
    for b, a in enumerate(arrays):
        out[b, : a.shape[0]] = a
    return out


def _init_flat(rng: np.random.Generator, layers: list[tuple[int, int]]) -> np.ndarray:
    parts = []
    for fi, fo in layers:
        bound = 1.0 / math.sqrt(fi)
        parts.append(rng.uniform(-bound, bound, size=fi * fo))  # W stored [in, out]
        parts.append(rng.uniform(-bound, bound, size=fo))
    return np.concatenate(parts)


def fit_templates(
    templates: Sequence[MLPCalibrator], Xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]
) -> list[MLPCalibrator]:
    """The body of :func:`routeaudit.calibrators.mlp.fit_many`: fit the unfitted ``templates``
    (equal parameters but ``random_state``, the seed of each) on ``Xs[i], ys[i]`` in place as
    one batched network, and return them.

    It takes the instances rather than making them so that this module does not import
    :mod:`routeaudit.calibrators.mlp` (which imports this one, lazily, to train).
    """
    if not templates:
        return []
    seeds = [t.random_state for t in templates]
    cfg = templates[0]
    hidden = tuple(int(h) for h in cfg.hidden_layer_sizes)
    restarts = int(cfg.restarts)
    bs = int(cfg.batch_size)
    if restarts < 1 or bs < 1 or int(cfg.max_epochs) < 1 or int(cfg.patience) < 1:
        raise ValueError("restarts, batch_size, max_epochs and patience must be >= 1")
    if not 0.0 < float(cfg.val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {cfg.val_fraction!r}")

    data = []
    d = None
    for i, (X, y) in enumerate(zip(Xs, ys, strict=True)):
        Xa = as_feature_matrix(X, name=f"Xs[{i}]")
        ya = as_correctness(y, Xa.shape[0])
        if d is None:
            d = Xa.shape[1]
        elif Xa.shape[1] != d:
            raise ValueError(f"Xs[{i}] has {Xa.shape[1]} columns; Xs[0] has {d}")
        n = Xa.shape[0]
        n_val = round(float(cfg.val_fraction) * n)
        n_val = min(max(n_val, 1), n - 1)
        if n - n_val < 1:
            raise ValueError(f"Xs[{i}]: need at least 2 rows, got {n}")
        mean, scale, active = _standardization(Xa)
        Z = (Xa - mean) / scale
        Z[:, ~active] = 0.0
        perm = _seed_rng(seeds[i], 0).permutation(n)
        val, tr = perm[:n_val], perm[n_val:]
        data.append((Z[tr], ya[tr], Z[val], ya[val], mean, scale, active))
    layers = _layer_sizes(d, hidden)

    # one network per (model, restart)
    nets = [(i, r) for i in range(len(data)) for r in range(restarts)]
    rngs = [_seed_rng(seeds[i], 1 + r) for i, r in nets]
    init = np.stack([_init_flat(rng, layers) for rng in rngs])
    result = train(
        [data[i][0] for i, _ in nets],
        [data[i][1] for i, _ in nets],
        [data[i][2] for i, _ in nets],
        [data[i][3] for i, _ in nets],
        init,
        rngs,
        layers,
        cfg,
    )
    best_flat, best_loss, best_epoch, n_epochs = result

    out = []
    for i, tmpl in enumerate(templates):
        rows = [k for k, (j, _) in enumerate(nets) if j == i]
        losses = best_loss[rows]
        pick = rows[int(np.argmin(losses))]
        flat = best_flat[pick]
        coefs, intercepts, off = [], [], 0
        for fi, fo in layers:
            coefs.append(flat[off : off + fi * fo].reshape(fi, fo).copy())
            off += fi * fo
            intercepts.append(flat[off : off + fo].copy())
            off += fo
        _, _, _, _, mean, scale, active = data[i]
        tmpl.n_features_in_ = d
        tmpl.mean_, tmpl.scale_, tmpl.active_columns_ = mean, scale, active
        tmpl.coefs_, tmpl.intercepts_ = coefs, intercepts
        tmpl.best_val_loss_ = float(best_loss[pick])
        tmpl.best_epoch_ = int(best_epoch[pick])
        tmpl.n_epochs_ = int(n_epochs[pick])
        tmpl.restart_val_losses_ = losses.astype(np.float64)
        tmpl.restart_n_epochs_ = n_epochs[rows].astype(np.int64)
        tmpl.selected_restart_ = int(np.argmin(losses))
        tmpl.n_parameters_ = _n_parameters(d, hidden)
        out.append(tmpl)
    return out


def minibatch_plan(rngs: Sequence[np.random.Generator], n_rows: np.ndarray, batch_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's minibatches of each network: a fresh random order of its training rows
    (one ``permutation`` of its generator), cut into batches of ``batch_size``.

    Returns ``idx`` [B, steps, batch_size] (row numbers; 0 past the end) and ``counts``
    [B, steps] (real rows per batch: ``batch_size`` but for each network's last batch, 0
    after it), ``steps`` being the most batches any network has.
    """
    bs = int(batch_size)
    n_batches = -(-n_rows // bs)
    steps = int(n_batches.max())
    idx = np.zeros((len(rngs), steps * bs), dtype=np.int64)
    for k, rng in enumerate(rngs):
        idx[k, : n_rows[k]] = rng.permutation(n_rows[k])
    counts = np.clip(n_rows[:, None] - np.arange(steps)[None, :] * bs, 0, bs)
    return idx.reshape(len(rngs), steps, bs), counts.astype(np.int64)


def _networks(Ztr, ytr, Zva, yva, init, layers, cfg):
    """The trainer for ``cfg.device``: compiled on CPU (unless compiled kernels are off),
    batched torch otherwise."""
    adam = dict(lr=float(cfg.lr), weight_decay=float(cfg.weight_decay), betas=_BETAS, eps=_EPS)
    d = Ztr[0].shape[1]
    data = (_pad_rows(Ztr, (d,)), _pad_rows(ytr), _pad_rows(Zva, (d,)), _pad_rows(yva),
            np.array([z.shape[0] for z in Zva], dtype=np.int64))
    if str(cfg.device) == "cpu":
        from routeaudit.calibrators.mlp_compiled import CompiledNetworks, enabled

        if enabled():
            return CompiledNetworks(*data, init, layers, adam)
    from routeaudit.calibrators.mlp_torch import TorchNetworks

    return TorchNetworks(*data, init, layers, adam, str(cfg.device))


def train(Ztr, ytr, Zva, yva, init, rngs, layers, cfg):
    """Train B networks; returns best flat params [B, P], best val loss, best epoch, epochs.

    Each epoch: every live network steps through its minibatches
    (:func:`minibatch_plan`), then its validation BCE is compared with its best; a network
    ``patience`` epochs without a strict improvement stops and is dropped from the batch
    (its best weights are already saved), so the work tracks the networks still training.
    """
    B = len(Ztr)
    nets = _networks(Ztr, ytr, Zva, yva, init, layers, cfg)
    patience = int(cfg.patience)
    ntr_all = np.array([z.shape[0] for z in Ztr])
    best_loss = np.full(B, np.inf)
    best_epoch = np.zeros(B, dtype=np.int64)
    n_epochs = np.zeros(B, dtype=np.int64)
    wait = np.zeros(B, dtype=np.int64)
    live = np.arange(B)  # global ids of the networks in the (compacted) batch
    for epoch in range(1, int(cfg.max_epochs) + 1):
        idx, counts = minibatch_plan([rngs[b] for b in live], ntr_all[live], cfg.batch_size)
        nets.epoch(idx, counts)
        vl = nets.val_losses()
        n_epochs[live] = epoch
        improved = vl < best_loss[live]
        if improved.any():
            nets.save_best(np.flatnonzero(improved), live[improved])
            best_loss[live[improved]] = vl[improved]
            best_epoch[live[improved]] = epoch
        wait[live[improved]] = 0
        wait[live[~improved]] += 1
        keep = wait[live] < patience
        if not keep.any():
            break
        if not keep.all():
            live = live[keep]
            nets.keep(keep)
    return nets.best(), best_loss, best_epoch, n_epochs
