"""Transformer sublayers ``f_l``, each with its own pre-norm (docs/methods.md §1.1).

Because every ``f_l`` starts with an RMSNorm, it is (up to ε) invariant to the scale of its
input. That is why zeroing routing weights without renormalising changes little in these
models, and why a zero-valued constant source carries mass without causal effect.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain, for pre-norms and the final norm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention; ``causal`` for language models."""

    def __init__(self, dim: int, n_heads: int, *, causal: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.causal = causal
        self.norm = RMSNorm(dim, eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """Pre-norm two-layer GELU MLP."""

    def __init__(self, dim: int, hidden: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))


def transformer_sublayers(n_layers: int, dim: int, n_heads: int, *, mlp_ratio: int = 4,
                          causal: bool = False, eps: float = 1e-6) -> nn.ModuleList:
    """``[attn_0, mlp_0, attn_1, mlp_1, ...]``: 2 × ``n_layers`` paper-layers."""
    modules: list[nn.Module] = []
    for _ in range(n_layers):
        modules.append(SelfAttention(dim, n_heads, causal=causal, eps=eps))
        modules.append(FeedForward(dim, mlp_ratio * dim, eps=eps))
    return nn.ModuleList(modules)
