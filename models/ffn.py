"""SwiGLU feed-forward: the dense FFN, and the shared experts of an MoE layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.init import Init, seed_from_global_rng


class FeedForward(nn.Module):
    """y = W2 (silu(W1 x) * W3 x), no biases (Llama/Mixtral convention)."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)  # down (a residual output projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float, init: Init | None = None) -> None:
        """N(0, std) for W1 and W3, N(0, out_std) for W2 (by name, models/init.py; standalone:
        from torch's global generator)."""
        init = init or Init(self, seed_from_global_rng())
        init.normal(self.w1.weight, std)
        init.normal(self.w3.weight, std)
        init.normal(self.w2.weight, out_std)
