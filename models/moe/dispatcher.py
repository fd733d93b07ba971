"""Token dispatch: run the kept (token, expert) assignments through the experts and combine.

Shape legend (suffixes on tensor names):
    T  tokens        D  model dim        E  experts        C  rows per expert when padded
    N  kept (token, expert) assignments; `*_sorted_*` tensors are in expert order

An MoE layer calls `self.dispatcher(x_TD, routing, self.experts)`, where `routing` is a
`models.moe.router.Routing`: flat assignments (token_idx_N, expert_idx_N, weight_N), so token
choice (N = T·K minus drops) and expert choice (N = E·C, any number per token) share one path.
The experts are called as `experts(x_sorted_ND, counts_E)` on rows sorted by expert. The default
is `LocalDispatcher` (one process). `parallel/` swaps in an all-to-all dispatcher from outside
with `layer.dispatcher = ...`; it implements the same `Dispatcher` interface and can reuse
`permute`, `padded_slots` and `unpermute_combine` around its exchange.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from models.moe.router import Routing, count_ids


def permute(x_TD: torch.Tensor, routing: Routing, num_experts: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather one row per assignment, sorted by expert.

    Returns:
        x_sorted_ND: the token rows in expert order.
        order_N: assignment indices (into routing.*_N) in expert order.
        counts_E: rows per expert (int64).
    """
    # Stable so that rows of one expert keep the router's order: deterministic, and it matches
    # the order an all-to-all receiver reconstructs.
    order_N = torch.argsort(routing.expert_idx_N, stable=True)
    counts_E = count_ids(routing.expert_idx_N, num_experts)
    return x_TD[routing.token_idx_N[order_N]], order_N, counts_E


def padded_slots(counts_E: torch.Tensor, capacity: int) -> torch.Tensor:
    """Row of every expert-sorted assignment in a layout of E chunks of exactly `capacity` rows
    (requires counts_E <= capacity, which capacity dropping guarantees)."""
    expert_sorted_N = torch.repeat_interleave(torch.arange(counts_E.numel(), device=counts_E.device),
                                              counts_E)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(expert_sorted_N.numel(), device=counts_E.device) - start_E[expert_sorted_N]
    return expert_sorted_N * capacity + rank_N


def unpermute_combine(y_sorted_ND: torch.Tensor, order_N: torch.Tensor, routing: Routing,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """Weight each expert row by its gate and sum every token's rows into y_TD (tokens with no
    kept assignment get zeros)."""
    # Combine in the wider of the two dtypes so bf16 expert outputs are summed in fp32.
    dtype = torch.promote_types(y_sorted_ND.dtype, routing.weight_N.dtype)
    weight_N = routing.weight_N[order_N].to(dtype)
    y_weighted_ND = y_sorted_ND.to(dtype) * weight_N[:, None]
    y_TD = y_sorted_ND.new_zeros((routing.num_tokens, y_sorted_ND.shape[1]), dtype=dtype)
    y_TD.index_add_(0, routing.token_idx_N[order_N], y_weighted_ND)
    return y_TD.to(out_dtype)


class Dispatcher:
    """Interface: x_TD + a `Routing` + experts in, combined output y_TD out.

    Not an nn.Module: it holds no parameters (an all-to-all one holds a process group), so
    swapping it never changes the model's state_dict.
    """

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: nn.Module,
                 overlap_fn: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Args:
            overlap_fn: optional work whose [T, D] result is added to the output (the shared
                experts); a communicating dispatcher runs it while its messages are in flight.
        """
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    """All experts live in this process."""

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: nn.Module,
                 overlap_fn: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        # 1. permute: one row per kept assignment, sorted by expert (stable argsort)
        x_sorted_ND, order_N, counts_E = permute(x_TD, routing, experts.num_experts)
        # 2. count rows per expert (all E of them, so empty experts get 0); with
        #    pad_to, place each expert's rows in a chunk of exactly C rows, zeros after them, so
        #    the expert compute sees static shapes. Padding rows are never gathered back, so
        #    they change neither the output nor any gradient.
        C = routing.pad_to
        if C > 0:
            slot_N = padded_slots(counts_E, C)
            x_in = x_sorted_ND.new_zeros((counts_E.numel() * C, x_TD.shape[1]))
            x_in = x_in.index_copy(0, slot_N, x_sorted_ND)
            counts_in_E = torch.full_like(counts_E, C)
        else:
            x_in, counts_in_E = x_sorted_ND, counts_E
        # 3. run every expert on its contiguous chunk
        y_out = experts(x_in, counts_in_E)
        y_sorted_ND = y_out[slot_N] if C > 0 else y_out
        # 4. multiply by the gate weight, 5. unpermute and sum each token's rows (index_add_)
        y_TD = unpermute_combine(y_sorted_ND, order_N, routing, x_TD.dtype)
        # 6. add the work that runs beside the routed experts (nothing to overlap locally)
        return y_TD + overlap_fn() if overlap_fn is not None else y_TD
