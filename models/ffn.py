"""SwiGLU feed-forward: the dense FFN, and the shared experts of an MoE layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """y = W2 (silu(W1 x) * W3 x), no biases (Llama/Mixtral convention)."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)  # down (a residual output projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=out_std)
