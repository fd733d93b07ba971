"""Token-choice top-k router.

Shape legend (suffixes on tensor names):
    T  tokens (batch and sequence flattened)
    D  model dim
    E  routed experts
    K  experts chosen per token (top_k)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    """Routing decisions for T tokens. Float fields are in router precision (>= fp32)."""

    topk_idx_TK: torch.Tensor  # int64 expert ids, best first
    topk_weight_TK: torch.Tensor  # gating weights the experts' outputs are multiplied by
    probs_TE: torch.Tensor  # scores over all experts (softmax), used by the balance loss
    logits_TE: torch.Tensor  # raw router logits, used by the z-loss


SCORE_FUNCS = ("softmax",)  # sigmoid (DeepSeek-V3) slots in here with its own branch


class TopKRouter(nn.Module):
    """logits = x·Wᵀ with W [E, D]; scores = softmax(logits); keep the top-k.

    Args:
        d_model: D.
        num_experts: E.
        top_k: K experts per token.
        renormalize: rescale the k chosen weights to sum to 1 (Mixtral) or keep the raw
            probabilities (Qwen1.5-MoE, OLMoE, DiT-MoE).
        score_func: how logits become scores; only "softmax" for now.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, renormalize: bool = True,
                 score_func: str = "softmax"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r} is not one of {', '.join(SCORE_FUNCS)}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.score_func = score_func
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Turn logits into per-expert scores (the hook for sigmoid scoring)."""
        return torch.softmax(logits_TE, dim=-1)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        # Routing is precision-sensitive (near-ties flip experts, exp overflows in bf16), so the
        # router runs in at least fp32, outside autocast; float64 stays float64 for gradcheck.
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.to(dtype), self.gate.weight.to(dtype))
            probs_TE = self.scores(logits_TE)
            topk_weight_TK, topk_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
            if self.renormalize:
                topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(topk_idx_TK, topk_weight_TK, probs_TE, logits_TE)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}, score_func={self.score_func!r}")
