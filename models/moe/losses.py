"""Router auxiliary losses (plain functions of the router outputs).

Shape legend: B sequences, S tokens per sequence, T tokens (T = B·S), E experts, K experts per
token. `probs_*E` is a distribution over experts per token (softmax, or the per-token
normalised sigmoid scores); the counts fᵢ come from the router's choice before capacity drops.
Every loss is returned with its coefficient applied.
"""
from __future__ import annotations

import torch

from models.moe.router import count_ids


def load_balancing_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, coeff: float) -> torch.Tensor:
    """Switch/GShard balance loss: coeff · E · Σᵢ fᵢ · Pᵢ.

    fᵢ is the fraction of routed (token, slot) pairs sent to expert i (not differentiable),
    Pᵢ the mean router probability of expert i (carries the gradient). Equals coeff when the
    routing is perfectly uniform.
    """
    T, E = probs_TE.shape
    counts_E = count_ids(topk_idx_TK, E).to(probs_TE.dtype)
    f_E = counts_E / topk_idx_TK.numel()
    P_E = probs_TE.mean(dim=0)
    return coeff * E * torch.sum(f_E * P_E)


def sequence_load_balancing_loss(probs_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor,
                                 coeff: float) -> torch.Tensor:
    """Sequence-level balance loss (DeepSeek-V2/V3): the Switch loss of each sequence, averaged.

    Balances every sequence on its own instead of only the batch as a whole, so one domain
    cannot monopolise experts within a sequence.
    """
    B, S, E = probs_BSE.shape
    idx_BN = topk_idx_BSK.reshape(B, -1)
    counts_BE = torch.zeros(B, E, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, idx_BN, torch.ones_like(idx_BN, dtype=probs_BSE.dtype))
    f_BE = counts_BE / idx_BN.shape[1]
    P_BE = probs_BSE.mean(dim=1)
    return coeff * E * (f_BE * P_BE).sum(dim=-1).mean()


def expert_balance_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, coeff: float) -> torch.Tensor:
    """DiT-MoE / DeepSeekMoE expert-level balance loss: coeff · Σᵢ fᵢ′ · Pᵢ, fᵢ′ = E·countᵢ/(T·K).

    For the same coefficient this equals `load_balancing_loss` (fᵢ′ = E·fᵢ): it has its own
    coefficient and log key so that a recipe can carry the DiT-MoE value (α = 0.01) verbatim.
    Enabling both adds the two coefficients.
    """
    T, E = probs_TE.shape
    K = topk_idx_TK.shape[-1]
    counts_E = count_ids(topk_idx_TK, E).to(probs_TE.dtype)
    f_prime_E = E * counts_E / (T * K)
    return coeff * torch.sum(f_prime_E * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE z-loss: coeff · mean(logsumexp(logits)²); keeps router logits small."""
    return coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy of the routing distribution (nats)."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(dim=-1).mean()
