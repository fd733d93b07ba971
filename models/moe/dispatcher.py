"""Token dispatch: route (token, slot) rows to experts and combine their outputs.

Shape legend (suffixes on tensor names):
    T  tokens        D  model dim        E  experts        K  experts per token
    N  (token, slot) rows, N = T·K, sorted by expert id

An MoE layer calls `self.dispatcher(x_TD, topk_idx_TK, topk_weight_TK, self.experts)`. The
default is `LocalDispatcher` (one process). `parallel/` swaps in an all-to-all dispatcher from
outside with `layer.dispatcher = ...`; it implements the same `Dispatcher` interface and can
reuse `permute` and `unpermute_combine` around its exchange.
"""
from __future__ import annotations

import torch
from torch import nn


def permute(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather one row per (token, slot), sorted by expert.

    Returns:
        x_sorted_ND: the token rows in expert order.
        order_N: positions in the flattened [T·K] routing table, in expert order.
        counts_E: rows per expert (int64).
    """
    idx_N = topk_idx_TK.reshape(-1)
    # Stable so that rows of one expert keep token order: deterministic, and it matches the
    # order an all-to-all receiver reconstructs.
    order_N = torch.argsort(idx_N, stable=True)
    token_N = order_N // topk_idx_TK.shape[1]
    counts_E = torch.bincount(idx_N, minlength=num_experts)
    return x_TD[token_N], order_N, counts_E


def unpermute_combine(y_sorted_ND: torch.Tensor, order_N: torch.Tensor,
                      topk_weight_TK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Weight each expert row by its gate and sum the K rows of every token into y_TD."""
    T, K = topk_weight_TK.shape
    # Combine in the wider of the two dtypes so bf16 expert outputs are summed in fp32.
    dtype = torch.promote_types(y_sorted_ND.dtype, topk_weight_TK.dtype)
    weight_N = topk_weight_TK.reshape(-1)[order_N].to(dtype)
    y_weighted_ND = y_sorted_ND.to(dtype) * weight_N[:, None]
    y_TD = y_sorted_ND.new_zeros((T, y_sorted_ND.shape[1]), dtype=dtype)
    y_TD.index_add_(0, order_N // K, y_weighted_ND)
    return y_TD.to(out_dtype)


class Dispatcher:
    """Interface: routing decisions + experts in, combined output y_TD out.

    Not an nn.Module: it holds no parameters (an all-to-all one holds a process group), so
    swapping it never changes the model's state_dict.
    """

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 topk_weight_TK: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    """All experts live in this process."""

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 topk_weight_TK: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        # 1. permute: one row per (token, slot), sorted by expert (stable argsort)
        # 2. count rows per expert (bincount with minlength=E, so empty experts get 0)
        x_sorted_ND, order_N, counts_E = permute(x_TD, topk_idx_TK, experts.num_experts)
        # 3. run every expert on its contiguous chunk
        y_sorted_ND = experts(x_sorted_ND, counts_E)
        # 4. multiply by the routing weight, 5. unpermute and sum the K slots (index_add_)
        return unpermute_combine(y_sorted_ND, order_N, topk_weight_TK, x_TD.dtype)
