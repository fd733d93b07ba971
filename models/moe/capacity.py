"""Expert capacity for token-choice routing: which (token, slot) assignments an expert keeps.

Shape legend (suffixes on tensor names):
    T  tokens        K  experts per token        E  experts
    N  flat (token, slot) assignments before dropping, N = T·K, token-major (t·K + k)

Capacity C = ceil(T·K·capacity_factor / E) rows per expert (capacity_factor 0: dropless). An
expert over capacity keeps C of its assignments and drops the rest; a dropped assignment adds
nothing to the token's output (the shared experts and the residual still carry the token).
Gate weights are not renormalised after dropping, so a kept assignment contributes exactly what
it would have without capacity (as in GShard and Megatron).
"""
from __future__ import annotations

import math

import torch

from models.config import DROP_POLICIES



def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float, max_rows: int) -> int:
    """C = ceil(num_assignments · capacity_factor / E), at most `max_rows`; 0 when dropless."""
    if capacity_factor <= 0:
        return 0
    return min(max_rows, math.ceil(num_assignments * capacity_factor / num_experts))


def keep_within_capacity(topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, capacity: int,
                         policy: str) -> torch.Tensor:
    """bool [T, K]: True for the assignments their expert keeps.

    Policies (per expert, independently):
        probability  keep the C assignments with the highest gate weight (ties: earlier token)
        position     keep the C earliest tokens (a token picks an expert at most once, so this
                     is well defined without a slot order)
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop policy {policy!r} is not one of {', '.join(DROP_POLICIES)}")
    T, K = topk_idx_TK.shape
    expert_N = topk_idx_TK.reshape(-1)
    if policy == "probability":
        priority_N = torch.argsort(topk_weight_TK.detach().reshape(-1), descending=True, stable=True)
    else:  # the flat order is token-major already: earliest token first
        priority_N = torch.arange(expert_N.numel(), device=expert_N.device)
    # A stable sort by expert of the priority order groups each expert's assignments, best
    # first; an assignment's rank in its group decides whether it fits.
    order_N = priority_N[torch.argsort(expert_N[priority_N], stable=True)]
    counts_E = torch.bincount(expert_N)  # length max id + 1: all that start_E is indexed by
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(expert_N.numel(), device=expert_N.device) - start_E[expert_N[order_N]]
    keep_N = torch.empty_like(expert_N, dtype=torch.bool)
    keep_N[order_N] = rank_N < capacity
    return keep_N.view(T, K)
