"""The batched torch trainer behind :class:`~routeaudit.calibrators.mlp.MLPCalibrator`.

Why a module of its own: it is the only part of the MLP calibrator that needs torch, and
importing torch costs seconds. :mod:`routeaudit.calibrators.mlp` (the estimator, its
``predict`` and the registered factory) imports this module only when a model is fitted, so
``import routeaudit.calibrators`` stays cheap.

:func:`fit_templates` (the engine of :func:`~routeaudit.calibrators.mlp.fit_many`) trains
many models — e.g. 3 seeds × 4 control variants × 3 restarts — as one batched model: every
parameter has a leading model dimension, layers are ``torch.baddbmm`` (the one-output layer a
multiply-and-sum: batched GEMM with one output column is a slow path on CPU), and each model keeps
its own data, minibatch order, Adam state and early-stopping state (a mask switches a
model's Adam step off when it has no minibatch left in an epoch; a model that stops is
dropped from the batch). Training is float32 with a hand-written backward pass (checked
against autograd) and no autograd graph. Minibatches and validation sets are padded to
multiples of 64 rows (masked), and only plain element-wise kernels are used, so every
element goes through the same vectorised code whatever the batch composition: a model
trained in a batch gets bit-for-bit the weights it gets trained alone (``tests/test_mlp.py``
asserts ≤ 1e-5). The architecture and training defaults are listed in
:mod:`routeaudit.calibrators.mlp`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

import routeaudit.calibrators._compiled as _compiled
from routeaudit.calibrators.base import as_correctness, as_feature_matrix

if TYPE_CHECKING:
    from routeaudit.calibrators.mlp import MLPCalibrator

_ALIGN = 64  #: rows of every minibatch / validation block are padded to a multiple of this
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8
_NETS_PER_PASS = 9  #: most networks per kernel pass (keeps a pass's activations in L2 cache)


def _passes(n: int) -> list[slice]:
    """``n`` networks in near-equal groups of at most ``_NETS_PER_PASS`` (balanced: no small
    leftover group, which would run the kernels at a worse size)."""
    k = -(-n // _NETS_PER_PASS)
    bounds = [i * (n // k) + min(i, n % k) for i in range(k + 1)]  # as np.array_split
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _round_up(n: int, k: int = _ALIGN) -> int:
    return max(k, -(-n // k) * k)


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


def _init_flat(rng: np.random.Generator, layers: list[tuple[int, int]]) -> np.ndarray:
    parts = []
    for fi, fo in layers:
        bound = 1.0 / math.sqrt(fi)
        parts.append(rng.uniform(-bound, bound, size=fi * fo))  # W stored [in, out]
        parts.append(rng.uniform(-bound, bound, size=fo))
    return np.concatenate(parts)


def _unpack(flat: torch.Tensor, layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views (W [B, in, out], b [B, 1, out]) of each layer inside ``flat`` [B, P]."""
    B = flat.shape[0]
    out, off = [], 0
    for fi, fo in layers:
        W = flat[:, off : off + fi * fo].reshape(B, fi, fo)
        off += fi * fo
        b = flat[:, off : off + fo].reshape(B, 1, fo)
        off += fo
        out.append((W, b))
    return out


def _forward(flat: torch.Tensor, x: torch.Tensor, layers, keep: bool = False, params=None):
    """Logits [B, m] of B models on x [B, m, d]; with ``keep`` also every layer's input.
    ``params``: ``_unpack(flat, layers)`` when the caller has it (views, reused per step)."""
    h = x
    inputs = []
    params = _unpack(flat, layers) if params is None else params
    for k, (W, b) in enumerate(params):
        inputs.append(h)
        if W.shape[-1] == 1:
            # a one-output layer is a dot product per row: multiply-and-sum is ~4x faster than
            # batched GEMM with one output column (a slow path on CPU)
            h = (h * W.transpose(1, 2)).sum(dim=-1, keepdim=True).add_(b)
        else:
            h = torch.baddbmm(b, h, W)
        if k < len(params) - 1:
            h = torch.relu_(h)
    logits = h.squeeze(-1)
    return (logits, inputs, params) if keep else logits


def _gradient(
    flat: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    layers,
    out: torch.Tensor | None = None,
    params=None,
) -> torch.Tensor:
    """Gradient [B, P] of Σ_b Σ_i weight_bi · BCE(logit_bi, y_bi), by hand-written backprop.

    ``weight`` is the row mask divided by each model's row count, so model b's part is the
    gradient of its own mean loss. d BCE / d logit = sigmoid(logit) − y; ReLU passes the
    gradient where its output is positive.
    """
    logits, inputs, params = _forward(flat, x, layers, keep=True, params=params)
    delta = ((torch.sigmoid(logits) - y) * weight).unsqueeze(-1)  # [B, m, 1]
    grads = []
    for k in range(len(params) - 1, -1, -1):
        W, _ = params[k]
        a = inputs[k]
        grads.append(delta.sum(dim=1))  # bias: [B, out]
        if delta.shape[-1] == 1:  # weight of a one-output layer: a row-weighted column sum
            grads.append((a * delta).sum(dim=1))  # [B, in], ~6x faster than bmm with N = 1
        else:
            grads.append(torch.bmm(a.transpose(1, 2), delta).flatten(1))  # weight: [B, in·out]
        if k > 0:
            # Below a one-output layer the product is an outer product: one rounding per element
            # either way, so the broadcast multiply is bit-identical to bmm and ~10x faster
            # (batched GEMM with an inner dimension of 1 is a slow path on CPU).
            outer = delta.shape[-1] == 1
            delta = delta * W.transpose(1, 2) if outer else torch.bmm(delta, W.transpose(1, 2))
            # ReLU backward (a = the ReLU output of the layer below): one fused pass
            delta = torch.ops.aten.threshold_backward(delta, a, 0.0)
    if out is None:
        return torch.cat(grads[::-1], dim=1)
    return torch.cat(grads[::-1], dim=1, out=out)


def _masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-model mean BCE over the unmasked rows: [B]."""
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _pad_rows(arrays: list[np.ndarray], width: int, fill_shape: tuple) -> np.ndarray:
    out = np.zeros((len(arrays), width, *fill_shape), dtype=np.float32)
    for b, a in enumerate(arrays):
        out[b, : a.shape[0]] = a
    return out


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
    result = _train(
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


class _MaskedAdam:
    """Adam with a leading model dimension; only rows in ``active`` are updated.

    Plain element-wise operations only (no fused ``alpha``/``addcdiv`` kernels), so a row's
    update does not depend on where it sits in the batch. On CPU the update is two compiled
    passes around torch's √v (:mod:`routeaudit.calibrators._compiled`: the same operations
    in the same order, so the same numbers as the torch kernels, which other devices run;
    torch's float32 sqrt is not always correctly rounded, so it stays torch's).
    """

    def __init__(self, shape, lr: float, weight_decay: float, device, dtype):
        self.lr = float(lr)
        self.wd = float(weight_decay)
        self.m = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.t = np.zeros(shape[0], dtype=np.int64)

    def keep(self, sel: torch.Tensor, keep: np.ndarray) -> None:
        """Drop the rows not in ``sel`` (networks that stopped)."""
        self.m = self.m.index_select(0, sel)
        self.v = self.v.index_select(0, sel)
        self.t = self.t[keep]

    @staticmethod
    def _use_kernels(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> bool:
        return (p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)
                and all(t.is_contiguous() and t.dtype == p.dtype and not t.requires_grad
                        for t in (p, g, m, v))
                and _compiled.enabled())

    def step(
        self, p: torch.Tensor, g: torch.Tensor, active: np.ndarray, part: slice = slice(None)
    ) -> None:
        """Update rows ``part`` of ``p`` (all by default) with their gradient ``g``."""
        rows = np.flatnonzero(active)
        if rows.size == 0:
            return
        p, m, v, tt = p[part], self.m[part], self.v[part], self.t[part]  # views
        tt[rows] += 1
        t = tt[rows].astype(np.float64)
        if self._use_kernels(p, g, m, v):
            # the same operations as below: moments compiled, √v by torch (on the same rows
            # as below), the update compiled
            dt = np.float32 if p.dtype == torch.float32 else np.float64
            pn, mn = p.numpy(), m.numpy()
            _compiled.kernel("adam_moments")(pn, g.numpy(), mn, v.numpy(), rows, dt(self.wd),
                                             dt(_BETA1), dt(1.0 - _BETA1), dt(_BETA2),
                                             dt(1.0 - _BETA2))
            every = rows.size == p.shape[0]
            root = (v if every else v.index_select(0, torch.as_tensor(rows))).sqrt()
            _compiled.kernel("adam_update")(pn, mn, root.numpy(), rows,
                                            (self.lr / (1.0 - _BETA1**t)).astype(dt),
                                            np.sqrt(1.0 - _BETA2**t).astype(dt), dt(_EPS))
            return
        every = rows.size == p.shape[0]
        sel = None if every else torch.as_tensor(rows, device=p.device)
        # in place on the state (or on row copies), ``g`` is consumed
        pa = p if every else p.index_select(0, sel)
        ga = g if every else g.index_select(0, sel)
        ma = m if every else m.index_select(0, sel)
        va = v if every else v.index_select(0, sel)
        step = torch.as_tensor(self.lr / (1.0 - _BETA1**t), dtype=p.dtype, device=p.device)
        bc2s = torch.as_tensor(np.sqrt(1.0 - _BETA2**t), dtype=p.dtype, device=p.device)
        if self.wd:
            ga.add_(pa * self.wd)
        ma.mul_(_BETA1).add_(ga * (1.0 - _BETA1))
        va.mul_(_BETA2).add_(ga.mul_(ga).mul_(1.0 - _BETA2))
        denom = va.sqrt().div_(bc2s[:, None]).add_(_EPS)
        pa.sub_(ma.div(denom).mul_(step[:, None]))
        if not every:
            p.index_copy_(0, sel, pa)
            m.index_copy_(0, sel, ma)
            v.index_copy_(0, sel, va)


@torch.no_grad()
def _train(Ztr, ytr, Zva, yva, init, rngs, layers, cfg):
    """Train B networks; returns best flat params [B, P], best val loss, best epoch, epochs.

    Networks that stop early are dropped from the batch (their best weights are already
    saved), so the work tracks the networks still training.
    """
    device = torch.device(cfg.device)
    dtype = torch.float32
    B = len(Ztr)
    d = Ztr[0].shape[1]
    bs = int(cfg.batch_size)
    bs_pad = _round_up(bs)
    patience = int(cfg.patience)
    ntr_all = np.array([z.shape[0] for z in Ztr])
    nva = np.array([z.shape[0] for z in Zva])
    Xtr = torch.from_numpy(_pad_rows(Ztr, int(ntr_all.max()), (d,))).to(device)
    Ytr = torch.from_numpy(_pad_rows(ytr, int(ntr_all.max()), ())).to(device)
    width_va = _round_up(int(nva.max()))
    Xva = torch.from_numpy(_pad_rows(Zva, width_va, (d,))).to(device)
    Yva = torch.from_numpy(_pad_rows(yva, width_va, ())).to(device)
    Mva = torch.from_numpy(_pad_rows([np.ones(k) for k in nva], width_va, ())).to(device)
    flat = torch.tensor(init, dtype=dtype, device=device)
    opt = _MaskedAdam(flat.shape, cfg.lr, cfg.weight_decay, device, dtype)
    best_flat = flat.clone()
    best_loss = np.full(B, np.inf)
    best_epoch = np.zeros(B, dtype=np.int64)
    n_epochs = np.zeros(B, dtype=np.int64)
    wait = np.zeros(B, dtype=np.int64)
    live = np.arange(B)  # global ids of the networks in the (compacted) batch

    for epoch in range(1, int(cfg.max_epochs) + 1):
        L = live.size
        ntr = ntr_all[live]
        n_batches = -(-ntr // bs)
        steps = int(n_batches.max())
        idx = np.zeros((L, steps, bs_pad), dtype=np.int64)
        mask = np.zeros((L, steps, bs_pad), dtype=np.float32)
        for k, b in enumerate(live):
            nb = int(n_batches[k])
            full = np.zeros(nb * bs, dtype=np.int64)
            full[: ntr[k]] = rngs[b].permutation(ntr[k])
            idx[k, :nb, :bs] = full.reshape(nb, bs)
            m = np.zeros(nb * bs, dtype=np.float32)
            m[: ntr[k]] = 1.0
            mask[k, :nb, :bs] = m.reshape(nb, bs)
        # this epoch's minibatches, gathered once as [steps, L, bs_pad, ...] (contiguous per
        # step): one index_select of rows of the flattened training data (a plain copy)
        flat_idx = idx + (np.arange(L) * Xtr.shape[1])[:, None, None]
        flat_idx = torch.from_numpy(np.ascontiguousarray(flat_idx.transpose(1, 0, 2)).reshape(-1))
        flat_idx = flat_idx.to(device)
        xe = Xtr.reshape(-1, d).index_select(0, flat_idx).reshape(steps, L, bs_pad, d)
        ye = Ytr.reshape(-1).index_select(0, flat_idx).reshape(steps, L, bs_pad)
        me = torch.from_numpy(np.ascontiguousarray(mask.transpose(1, 0, 2))).to(device)
        we = me / me.sum(dim=2, keepdim=True).clamp(min=1.0)
        grad = torch.empty_like(flat)
        passes = _passes(L)
        # views of each pass's parameters: ``flat`` is updated in place until the epoch ends
        views = [(part, flat[part], _unpack(flat[part], layers), grad[part]) for part in passes]
        for s in range(steps):
            for part, fp, params, gp in views:  # cache-sized groups of networks
                _gradient(fp, xe[s, part], ye[s, part], we[s, part], layers, out=gp,
                          params=params)
            opt.step(flat, grad, n_batches > s)  # element-wise: one pass for all networks
        vl = np.concatenate(
            [
                _masked_bce(_forward(fp, Xva[part], layers, params=params), Yva[part], Mva[part])
                .double()
                .cpu()
                .numpy()
                for part, fp, params, _ in views
            ]
        )
        n_epochs[live] = epoch
        improved = vl < best_loss[live]
        if improved.any():
            rows = torch.as_tensor(np.flatnonzero(improved), device=device)
            gids = torch.as_tensor(live[improved], device=device)
            best_flat.index_copy_(0, gids, flat.index_select(0, rows))
            best_loss[live[improved]] = vl[improved]
            best_epoch[live[improved]] = epoch
        wait[live[improved]] = 0
        wait[live[~improved]] += 1
        keep = wait[live] < patience
        if not keep.any():
            break
        if not keep.all():
            sel = torch.as_tensor(np.flatnonzero(keep), device=device)
            live = live[keep]
            flat = flat.index_select(0, sel)
            opt.keep(sel, keep)
            Xtr, Ytr = Xtr.index_select(0, sel), Ytr.index_select(0, sel)
            Xva, Yva, Mva = (
                Xva.index_select(0, sel),
                Yva.index_select(0, sel),
                Mva.index_select(0, sel),
            )
    return best_flat.cpu().numpy(), best_loss, best_epoch, n_epochs
