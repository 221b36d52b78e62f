"""The batched torch trainer of the MLP calibrator: every network of a fit as one model.

Why a module of its own: it is the only part of the MLP calibrator that needs torch, and
importing torch costs seconds. It runs on GPUs and, when the compiled trainer
(:mod:`routeaudit.calibrators.mlp_compiled`) is off, on CPU;
:mod:`routeaudit.calibrators.mlp_training` picks the trainer and runs the epochs.

Every parameter has a leading network dimension; layers are ``torch.baddbmm`` (the
one-output layer a multiply-and-sum: batched GEMM with one output column is a slow path on
CPU), and each network keeps its own data, minibatch order and Adam state (a mask switches
a network's Adam step off when it has no minibatch left in an epoch; a network that stops is
dropped from the batch). Training is float32 with a hand-written backward pass (checked
against autograd) and no autograd graph. Minibatches and validation sets are padded to
multiples of 64 rows (masked), and only plain element-wise kernels are used, so every
element goes through the same vectorised code whatever the batch composition: a network
trained in a batch gets bit-for-bit the weights it gets trained alone
(``tests/test_mlp.py``).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

_ALIGN = 64  #: rows of every minibatch / validation block are padded to a multiple of this
_NETS_PER_PASS = 9  #: most networks per kernel pass (keeps a pass's activations in L2 cache)


def _passes(n: int) -> list[slice]:
    """``n`` networks in near-equal groups of at most ``_NETS_PER_PASS`` (balanced: no small
    leftover group, which would run the kernels at a worse size)."""
    k = -(-n // _NETS_PER_PASS)
    bounds = [i * (n // k) + min(i, n % k) for i in range(k + 1)]  # as np.array_split
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _round_up(n: int, k: int = _ALIGN) -> int:
    return max(k, -(-n // k) * k)


def _widen(a: np.ndarray, width: int) -> np.ndarray:
    """``a`` [B, rows, ...] zero-padded to ``width`` rows."""
    return np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2))


def unpack(flat: torch.Tensor, layers) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


def forward(flat: torch.Tensor, x: torch.Tensor, layers, keep: bool = False, params=None):
    """Logits [B, m] of B models on x [B, m, d]; with ``keep`` also every layer's input.
    ``params``: ``unpack(flat, layers)`` when the caller has it (views, reused per step)."""
    h = x
    inputs = []
    params = unpack(flat, layers) if params is None else params
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


def gradient(
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
    logits, inputs, params = forward(flat, x, layers, keep=True, params=params)
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


def masked_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-model mean BCE over the unmasked rows: [B]."""
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class MaskedAdam:
    """Adam with a leading model dimension; only rows in ``active`` are updated.

    Plain element-wise operations only (no fused ``alpha``/``addcdiv`` kernels), so a row's
    update does not depend on where it sits in the batch.
    """

    def __init__(self, shape, lr: float, weight_decay: float, device, dtype,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr = float(lr)
        self.wd = float(weight_decay)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.m = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.t = np.zeros(shape[0], dtype=np.int64)

    def keep(self, sel: torch.Tensor, keep: np.ndarray) -> None:
        """Drop the rows not in ``sel`` (networks that stopped)."""
        self.m = self.m.index_select(0, sel)
        self.v = self.v.index_select(0, sel)
        self.t = self.t[keep]

    def step(self, p: torch.Tensor, g: torch.Tensor, active: np.ndarray) -> None:
        """Update the rows of ``p`` marked ``active`` with their gradient ``g`` (consumed)."""
        rows = np.flatnonzero(active)
        if rows.size == 0:
            return
        m, v = self.m, self.v
        self.t[rows] += 1
        t = self.t[rows].astype(np.float64)
        every = rows.size == p.shape[0]
        sel = None if every else torch.as_tensor(rows, device=p.device)
        # in place on the state (or on row copies)
        pa = p if every else p.index_select(0, sel)
        ga = g if every else g.index_select(0, sel)
        ma = m if every else m.index_select(0, sel)
        va = v if every else v.index_select(0, sel)
        step = torch.as_tensor(self.lr / (1.0 - self.beta1**t), dtype=p.dtype, device=p.device)
        bc2s = torch.as_tensor(np.sqrt(1.0 - self.beta2**t), dtype=p.dtype, device=p.device)
        if self.wd:
            ga.add_(pa * self.wd)
        ma.mul_(self.beta1).add_(ga * (1.0 - self.beta1))
        va.mul_(self.beta2).add_(ga.mul_(ga).mul_(1.0 - self.beta2))
        denom = va.sqrt().div_(bc2s[:, None]).add_(self.eps)
        pa.sub_(ma.div(denom).mul_(step[:, None]))
        if not every:
            p.index_copy_(0, sel, pa)
            m.index_copy_(0, sel, ma)
            v.index_copy_(0, sel, va)


class TorchNetworks:
    """B networks being trained, as batched torch tensors on ``device`` (the trainer
    interface of :func:`routeaudit.calibrators.mlp_training.train`; data as
    :class:`~routeaudit.calibrators.mlp_compiled.CompiledNetworks` takes them). Validation
    sets are padded further to a multiple of 64 rows and masked."""

    def __init__(self, Xtr: np.ndarray, Ytr: np.ndarray, Xva: np.ndarray, Yva: np.ndarray,
                 n_val: np.ndarray, init: np.ndarray, layers, adam: dict, device: str):
        self.device = torch.device(device)
        self.layers = layers
        self.d = Xtr.shape[2]
        width_va = _round_up(Xva.shape[1])
        mask = (np.arange(width_va)[None, :] < np.asarray(n_val)[:, None]).astype(np.float32)
        dev = self.device
        self.Xtr = torch.from_numpy(Xtr).to(dev)
        self.Ytr = torch.from_numpy(Ytr).to(dev)
        self.Xva = torch.from_numpy(_widen(Xva, width_va)).to(dev)
        self.Yva = torch.from_numpy(_widen(Yva, width_va)).to(dev)
        self.Mva = torch.from_numpy(mask).to(dev)
        self.flat = torch.tensor(init, dtype=torch.float32, device=dev)
        self.opt = MaskedAdam(self.flat.shape, device=dev, dtype=torch.float32, **adam)
        self.best_flat = self.flat.clone()

    @torch.no_grad()
    def epoch(self, idx: np.ndarray, counts: np.ndarray) -> None:
        """One epoch: network k steps on rows ``idx[k, s, :counts[k, s]]`` at step s."""
        L, steps, bs = idx.shape
        bs_pad = _round_up(bs)
        d, dev, flat = self.d, self.device, self.flat
        padded = np.zeros((L, steps, bs_pad), dtype=np.int64)
        padded[:, :, :bs] = idx
        mask = (np.arange(bs_pad) < counts[:, :, None]).astype(np.float32)
        # this epoch's minibatches, gathered once as [steps, L, bs_pad, ...] (contiguous per
        # step): one index_select of rows of the flattened training data (a plain copy)
        flat_idx = padded + (np.arange(L) * self.Xtr.shape[1])[:, None, None]
        flat_idx = torch.from_numpy(np.ascontiguousarray(flat_idx.transpose(1, 0, 2)).reshape(-1))
        flat_idx = flat_idx.to(dev)
        xe = self.Xtr.reshape(-1, d).index_select(0, flat_idx).reshape(steps, L, bs_pad, d)
        ye = self.Ytr.reshape(-1).index_select(0, flat_idx).reshape(steps, L, bs_pad)
        me = torch.from_numpy(np.ascontiguousarray(mask.transpose(1, 0, 2))).to(dev)
        we = me / me.sum(dim=2, keepdim=True).clamp(min=1.0)
        grad = torch.empty_like(flat)
        # views of each pass's parameters: ``flat`` is updated in place until the epoch ends
        self._views = [(part, flat[part], unpack(flat[part], self.layers), grad[part])
                       for part in _passes(L)]
        for s in range(steps):
            for part, fp, params, gp in self._views:  # cache-sized groups of networks
                gradient(fp, xe[s, part], ye[s, part], we[s, part], self.layers, out=gp,
                         params=params)
            self.opt.step(flat, grad, counts[:, s] > 0)  # element-wise: all networks at once

    @torch.no_grad()
    def val_losses(self) -> np.ndarray:
        """Each network's mean validation BCE, float64 [L]."""
        return np.concatenate([
            masked_bce(forward(fp, self.Xva[part], self.layers, params=params),
                       self.Yva[part], self.Mva[part]).double().cpu().numpy()
            for part, fp, params, _ in self._views
        ])

    def save_best(self, rows: np.ndarray, ids: np.ndarray) -> None:
        """Networks ``rows`` of the batch are the best so far of networks ``ids``."""
        dev = self.device
        self.best_flat.index_copy_(0, torch.as_tensor(ids, device=dev),
                                   self.flat.index_select(0, torch.as_tensor(rows, device=dev)))

    def keep(self, keep: np.ndarray) -> None:
        """Drop the networks not marked ``keep`` (stopped: their best weights are saved)."""
        sel = torch.as_tensor(np.flatnonzero(keep), device=self.device)
        self.flat = self.flat.index_select(0, sel)
        self.opt.keep(sel, keep)
        self.Xtr, self.Ytr = self.Xtr.index_select(0, sel), self.Ytr.index_select(0, sel)
        self.Xva, self.Yva, self.Mva = (self.Xva.index_select(0, sel),
                                        self.Yva.index_select(0, sel),
                                        self.Mva.index_select(0, sel))

    def best(self) -> np.ndarray:
        """The best weights of every network, [B, P] float32."""
        return self.best_flat.cpu().numpy()
