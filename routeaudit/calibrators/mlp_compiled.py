"""Compiled (numba) training of the MLP calibrator on CPU: one call per epoch for all networks.

Why: the batched torch trainer (:mod:`routeaudit.calibrators.mlp_torch`) runs ~25 small torch
operations per minibatch step, each a dispatch and a pass over memory; on one CPU core the
element-wise work and the dispatches cost as much as the matrix products. Here each network
is trained whole by one loop: matrix products go to BLAS (``np.dot``, scipy's OpenBLAS),
everything element-wise (bias, ReLU and its backward, the sigmoid's gradient, bias
gradients, Adam) is fused into loops over data that stay in cache, and one call covers an
epoch of every network. The arithmetic is the torch trainer's (same formulas, float32, same
minibatches and initialisations), but matrix products are summed in BLAS's order, so the
two trainers agree to float rounding, not bit for bit (``tests/test_mlp.py``). A network
is computed whole, alone and in order, so its weights do not depend on the batch it is
trained in.

Imported (with numba) only when an MLP is fitted on CPU, so ``import routeaudit.calibrators``
stays light. :func:`enabled` is False when numba is missing, JIT is disabled or
``ROUTEAUDIT_NUMBA=0`` (the switch of the statistics kernels): the torch trainer then runs.
"""

from __future__ import annotations

import functools

import numpy as np

from routeaudit.stats._kernels import _jit as _jit_python_errors
from routeaudit.stats._kernels import available

#: numba.njit(cache=True) with numpy's error model: no zero-division branches, so the
#: element-wise loops vectorise (Adam's 4.5k-element update: 11 µs scalar, ~2 µs vector)
_jit = functools.partial(_jit_python_errors, error_model="numpy")


def enabled() -> bool:
    """Whether the compiled trainer runs (numba importable, JIT on, ``ROUTEAUDIT_NUMBA`` not 0)."""
    return available()


@_jit
def mlp_forward(p, w_off, b_off, fan_in, fan_out, ws, act_off, r):
    """Forward pass of one network (flat parameters ``p``) on the ``r`` rows already in
    layer 0's block of the workspace ``ws``: layer l's input is ``ws[act_off[l]:]`` viewed
    as [r, fan_in[l]] (C order); the logits go to the block after the last layer's input.
    Each product is written by BLAS straight into the next block, then bias and ReLU are
    applied there in place."""
    n_layers = fan_in.size
    zero = np.float32(0.0)
    for layer in range(n_layers):
        fi, fo = fan_in[layer], fan_out[layer]
        a = ws[act_off[layer] : act_off[layer] + r * fi].reshape((r, fi))
        W = p[w_off[layer] : w_off[layer] + fi * fo].reshape((fi, fo))
        b = p[b_off[layer] : b_off[layer] + fo]
        out = ws[act_off[layer + 1] : act_off[layer + 1] + r * fo].reshape((r, fo))
        np.dot(a, W, out)
        if layer == n_layers - 1:
            for i in range(r):
                for j in range(fo):
                    out[i, j] = out[i, j] + b[j]
        else:  # ReLU
            for i in range(r):
                for j in range(fo):
                    h = out[i, j] + b[j]
                    out[i, j] = h if h > zero else zero


@_jit
def mlp_epoch(flat, m, v, t, X, Y, idx, counts, w_off, b_off, fan_in, fan_out, lr, wd,
              b1, omb1, b2, omb2, eps):
    """One epoch of minibatch Adam for each of B independent networks, in place.

    ``flat``/``m``/``v`` [B, P] float32 (parameters, Adam moments), ``t`` [B] Adam steps;
    network k trains on rows ``idx[k, s, :counts[k, s]]`` of ``X[k]`` / ``Y[k]`` at step s
    (no step where the count is 0). Per step: forward, hand-written backward of the mean
    BCE (as :func:`~routeaudit.calibrators.mlp_torch.gradient`), and
    ``MaskedAdam.step``'s update (L2 weight decay added to the gradient). Matrix products
    go to BLAS (``np.dot``, written into preallocated blocks); everything element-wise is
    fused into loops. A network is computed whole, alone, in order, so its result does not
    depend on the batch.
    """
    B, P = flat.shape
    n_layers = fan_in.size
    bs = idx.shape[2]
    act_off = np.zeros(n_layers + 2, np.int64)
    widest = 1
    for layer in range(n_layers):
        act_off[layer + 1] = act_off[layer] + bs * fan_in[layer]
        widest = max(widest, fan_in[layer], fan_out[layer])
    act_off[n_layers + 1] = act_off[n_layers] + bs * fan_out[n_layers - 1]
    ws = np.zeros(act_off[n_layers + 1], np.float32)
    deltas = np.zeros((2, bs * widest), np.float32)  # this layer's δ, the one below
    grad = np.empty(P, np.float32)
    d = X.shape[2]
    one, zero = np.float32(1.0), np.float32(0.0)
    for k in range(B):
        p = flat[k]
        for s in range(idx.shape[1]):
            r = counts[k, s]
            if r == 0:
                continue
            a0 = ws[: r * d].reshape((r, d))
            for i in range(r):  # element by element: a row slice per example costs ~40 ns
                row = idx[k, s, i]
                for c in range(d):
                    a0[i, c] = X[k, row, c]
            mlp_forward(p, w_off, b_off, fan_in, fan_out, ws, act_off, r)
            # d mean-BCE / d logit = (sigmoid(logit) - y) / r
            last = n_layers - 1
            fo = fan_out[last]
            logits = ws[act_off[n_layers] : act_off[n_layers] + r * fo].reshape((r, fo))
            inv = one / np.float32(r)
            cur = 0
            delta = deltas[cur, : r * fo].reshape((r, fo))
            for i in range(r):
                y = Y[k, idx[k, s, i]]
                for j in range(fo):
                    delta[i, j] = (one / (one + np.exp(-logits[i, j])) - y) * inv
            for layer in range(last, -1, -1):
                fi, fo = fan_in[layer], fan_out[layer]
                delta = deltas[cur, : r * fo].reshape((r, fo))
                a = ws[act_off[layer] : act_off[layer] + r * fi].reshape((r, fi))
                np.dot(a.T, delta, grad[w_off[layer] : w_off[layer] + fi * fo].reshape((fi, fo)))
                gb = grad[b_off[layer] : b_off[layer] + fo]
                gb[:] = zero
                for i in range(r):  # row order, vectorised over outputs
                    for j in range(fo):
                        gb[j] += delta[i, j]
                if layer > 0:
                    W = p[w_off[layer] : w_off[layer] + fi * fo].reshape((fi, fo))
                    below = deltas[1 - cur, : r * fi].reshape((r, fi))
                    np.dot(delta, W.T, below)
                    for i in range(r):  # ReLU backward: a is the ReLU output below
                        for q in range(fi):
                            below[i, q] = below[i, q] if a[i, q] > zero else zero
                    cur = 1 - cur
            # Adam (torch.optim.Adam semantics, the expressions of MaskedAdam.step)
            t[k] += 1
            step = np.float32(lr / (1.0 - b1 ** t[k]))
            bc2s = np.float32(np.sqrt(1.0 - b2 ** t[k]))
            mk, vk = m[k], v[k]
            for j in range(P):
                g = grad[j] + p[j] * wd
                mk[j] = mk[j] * np.float32(b1) + g * omb1
                vk[j] = vk[j] * np.float32(b2) + (g * g) * omb2
                p[j] = p[j] - (mk[j] / (np.sqrt(vk[j]) / bc2s + eps)) * step


@_jit
def mlp_val_loss(flat, X, Y, n_rows, w_off, b_off, fan_in, fan_out, block):
    """Mean BCE (float64) of each network's logits on its first ``n_rows[k]`` rows of
    ``X[k]`` / ``Y[k]``, forwarded ``block`` rows at a time."""
    B = flat.shape[0]
    n_layers = fan_in.size
    act_off = np.zeros(n_layers + 2, np.int64)
    for layer in range(n_layers):
        act_off[layer + 1] = act_off[layer] + block * fan_in[layer]
    act_off[n_layers + 1] = act_off[n_layers] + block * fan_out[n_layers - 1]
    ws = np.zeros(act_off[n_layers + 1], np.float32)
    d = X.shape[2]
    out = np.empty(B)
    for k in range(B):
        total = 0.0
        for start in range(0, n_rows[k], block):
            r = min(block, n_rows[k] - start)
            a0 = ws[: r * d].reshape((r, d))
            a0[:, :] = X[k, start : start + r]
            mlp_forward(flat[k], w_off, b_off, fan_in, fan_out, ws, act_off, r)
            logits = ws[act_off[n_layers] : act_off[n_layers] + r]
            for i in range(r):  # BCE with logits, stable form
                x = np.float64(logits[i])
                total += max(x, 0.0) - x * Y[k, start + i] + np.log1p(np.exp(-abs(x)))
        out[k] = total / max(n_rows[k], 1)
    return out


def _layout(layers) -> tuple[np.ndarray, ...]:
    """Offsets of each layer's weights and bias in a flat parameter row, and the fan-ins and
    fan-outs, as int64 arrays (the kernels' description of the architecture)."""
    w_off, b_off, off = [], [], 0
    for fi, fo in layers:
        w_off.append(off)
        off += fi * fo
        b_off.append(off)
        off += fo
    fan_in = [fi for fi, _ in layers]
    fan_out = [fo for _, fo in layers]
    return tuple(np.asarray(a, dtype=np.int64) for a in (w_off, b_off, fan_in, fan_out))


class CompiledNetworks:
    """B networks being trained on CPU by the compiled kernels (the trainer interface of
    :func:`routeaudit.calibrators.mlp_training.train`), as float32 numpy arrays.

    Data come zero-padded: ``Xtr`` [B, rows, d], ``Ytr`` [B, rows], ``Xva``/``Yva`` likewise,
    ``n_val`` [B] the real validation rows of each network."""

    VAL_BLOCK = 256  #: validation rows forwarded at a time (activations stay in cache)

    def __init__(self, Xtr: np.ndarray, Ytr: np.ndarray, Xva: np.ndarray, Yva: np.ndarray,
                 n_val: np.ndarray, init: np.ndarray, layers, adam: dict) -> None:
        self.Xtr, self.Ytr, self.Xva = Xtr, Ytr, Xva
        self.Yva = Yva.astype(np.float64)
        self.nva = np.asarray(n_val, dtype=np.int64)
        self.flat = np.ascontiguousarray(init, dtype=np.float32)
        self.m = np.zeros_like(self.flat)
        self.v = np.zeros_like(self.flat)
        self.t = np.zeros(self.flat.shape[0], dtype=np.int64)
        self.best_flat = self.flat.copy()
        self.layout = _layout(layers)
        b1, b2 = float(adam["betas"][0]), float(adam["betas"][1])
        f32 = np.float32
        # scalars as the torch trainer's float32 tensors see them (β, 1 − β rounded once);
        # the bias corrections stay float64 until cast per step, as there
        self.hyper = (float(adam["lr"]), f32(adam["weight_decay"]), b1, f32(1.0 - b1), b2,
                      f32(1.0 - b2), f32(adam["eps"]))

    def epoch(self, idx: np.ndarray, counts: np.ndarray) -> None:
        """One epoch: network k steps on rows ``idx[k, s, :counts[k, s]]`` at step s."""
        lr, wd, b1, omb1, b2, omb2, eps = self.hyper
        mlp_epoch(self.flat, self.m, self.v, self.t, self.Xtr, self.Ytr,
                  np.ascontiguousarray(idx, dtype=np.int64),
                  np.ascontiguousarray(counts, dtype=np.int64), *self.layout,
                  lr, wd, b1, omb1, b2, omb2, eps)

    def val_losses(self) -> np.ndarray:
        """Each network's mean validation BCE, float64 [L]."""
        return mlp_val_loss(self.flat, self.Xva, self.Yva, self.nva, *self.layout,
                            self.VAL_BLOCK)

    def save_best(self, rows: np.ndarray, ids: np.ndarray) -> None:
        """Networks ``rows`` of the batch are the best so far of networks ``ids``."""
        self.best_flat[ids] = self.flat[rows]

    def keep(self, keep: np.ndarray) -> None:
        """Drop the networks not marked ``keep`` (stopped: their best weights are saved)."""
        for name in ("flat", "m", "v", "t", "Xtr", "Ytr", "Xva", "Yva", "nva"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name)[keep]))

    def best(self) -> np.ndarray:
        """The best weights of every network, [B, P] float32."""
        return self.best_flat
