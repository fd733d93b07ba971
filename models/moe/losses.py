"""Router auxiliary losses (plain functions of the router outputs).

Shape legend: T tokens, E experts, K experts per token.
"""
from __future__ import annotations

import torch


def load_balancing_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, coeff: float) -> torch.Tensor:
    """Switch/GShard balance loss: coeff · E · Σᵢ fᵢ · Pᵢ.

    fᵢ is the fraction of routed (token, slot) pairs sent to expert i (not differentiable),
    Pᵢ the mean router probability of expert i (carries the gradient). Equals coeff when the
    routing is perfectly uniform.
    """
    T, E = probs_TE.shape
    counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
    f_E = counts_E / topk_idx_TK.numel()
    P_E = probs_TE.mean(dim=0)
    return coeff * E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE z-loss: coeff · mean(logsumexp(logits)²); keeps router logits small."""
    return coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy of the routing distribution (nats)."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(dim=-1).mean()
