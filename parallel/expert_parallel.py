"""Expert parallelism: routed experts sharded over the ep group, tokens exchanged by all-to-all.

Shape legend (suffixes, as in models/moe):
    T  tokens of this rank       D  model dim        E  experts (global)
    P  ranks of the ep group     L  experts held per rank (E / P)
    N  (token, expert) assignments this rank sends, in expert order (plus padding rows)
    M  rows this rank receives for its experts

ep_rank r holds experts [r·L, (r+1)·L). The router stays replicated: every rank routes its own
tokens over all E experts, then `AllToAllDispatcher` moves each row to the rank holding its
expert and back. `apply_expert_parallel` swaps it into every MoE layer from outside the model.

Overlap strategies (`parallel.ep_overlap`), all computing exactly what `none` computes (chunked
ones sum expert gradients chunk by chunk, so fp32 results differ in rounding only):
    none           every exchange is waited for as soon as it is started
    async          the count exchange and token all-to-all run while the routing bookkeeping
                   (row gather, splits, local re-sort indices) is computed
    chunked        tokens split into `num_chunks` chunks; the all-to-all of chunk i+1 runs during
                   the expert compute of chunk i and the combine of chunk i-1
    shared_expert  the layer's shared experts (passed as `overlap_fn`) run during the dispatch
    combinable     all three

Overlap in backward comes from the autograd graph itself. Each all-to-all is a pair of nodes: a
start (launch, async) and a wait. In backward the wait node launches the reverse all-to-all and
the start node waits for it, and PyTorch's engine runs ready nodes in reverse creation order, so
whatever was computed between start and wait in forward (another chunk's experts, the shared
experts) has its backward run while the reverse exchange is in flight.

Activation checkpointing (parallel/recompute.py) re-runs a checkpointed block's forward during
backward. Its backward is the original graph's (the recompute only re-creates saved tensors), so
the reverse exchanges run once, as always; the recompute must not exchange again (twice the
forward traffic, and it would pair up only while every ep rank recomputes the same layer at the
same moment). While a checkpointed forward runs, the block's dispatchers record into an
`ExchangeTape` (parallel/recompute.py) what they received (steps 2, 3 and 5); its recompute takes
the same steps on the recorded rows, without communicating.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from models.moe import Dispatcher, Routing, moe_layers, padded_slots, unpermute_combine
from models.moe.router import count_ids
from parallel.config import EP_OVERLAPS

if TYPE_CHECKING:
    from parallel.recompute import ExchangeTape, Record


# -- one all-to-all as an autograd start/wait pair ------------------------------------------------


class _Exchange:
    """An all-to-all of rows, shared by its start and wait nodes (forward and backward).

    `replayed`: the rows this exchange received in the forward that a recompute re-runs; the
    forward launch then returns them and communicates nothing (the backward never runs on a
    recompute's nodes: autograd uses the original graph)."""

    def __init__(self, group: dist.ProcessGroup, send_splits: list[int], recv_splits: list[int],
                 replayed: torch.Tensor | None = None):
        self.group, self.send_splits, self.recv_splits = group, send_splits, recv_splits
        self.replayed = replayed
        self._work = None
        self._buffers = None  # output and input, alive until the exchange is waited for

    def launch(self, x_ND: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        if self.replayed is not None and not reverse:
            # A new alias: autograd makes the returned tensor a graph output, never the tape's own.
            out = self.replayed.detach()
            self._work, self._buffers = _Replayed(), (out, None)
            return out
        send, recv = (self.recv_splits, self.send_splits) if reverse else (self.send_splits, self.recv_splits)
        x_ND = x_ND.contiguous()
        out = x_ND.new_empty((sum(recv), x_ND.shape[1]))
        self._work = dist.all_to_all_single(out, x_ND, recv, send, group=self.group, async_op=True)
        self._buffers = (out, x_ND)
        return out

    def wait(self) -> torch.Tensor:
        self._work.wait()
        out = self._buffers[0]
        self._work = self._buffers = None
        return out


class _Replayed:
    """A finished collective: what a recompute waits for instead of an exchange."""

    def wait(self) -> None:
        pass


class _StartAllToAll(torch.autograd.Function):
    """Forward: launch the exchange; returns the receive buffer (not to be read before the wait).
    Backward: wait for the reverse exchange launched by the matching `_WaitAllToAll.backward`."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        return exchange.launch(x_ND)

    @staticmethod
    @once_differentiable
    def backward(ctx, _placeholder: torch.Tensor):
        return ctx.exchange.wait(), None


class _WaitAllToAll(torch.autograd.Function):
    """Forward: wait for the exchange. Backward: launch the reverse exchange (send and receive
    splits swapped) of the output gradient; `_StartAllToAll.backward` waits for it."""

    @staticmethod
    def forward(ctx, buffer_ND: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        return exchange.wait().view_as(buffer_ND)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND: torch.Tensor):
        ctx.exchange.launch(grad_ND, reverse=True)
        # The start node's only input is this gradient; it ignores it and takes the exchanged one.
        return grad_ND, None


# -- the dispatcher --------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """What one dispatch unit (all tokens, or one token chunk) carries between the steps."""

    x_TD: torch.Tensor
    routing: Routing
    pad: int  # rows per expert in the send buffer (capacity mode), 0: exactly the kept rows
    order_N: torch.Tensor | None = None  # assignments in expert order
    send_counts_PL: torch.Tensor | None = None
    slot_N: torch.Tensor | None = None  # row of every real assignment in a padded send buffer
    x_send_ND: torch.Tensor | None = None
    recv_counts_PL: torch.Tensor | None = None
    sort_M: torch.Tensor | None = None  # received (source, expert) order -> local-expert order
    unsort_M: torch.Tensor | None = None
    counts_L: torch.Tensor | None = None
    exchanges: list = field(default_factory=list)  # dispatch, then combine
    buffer: torch.Tensor | None = None  # receive buffer of the exchange in flight
    received: list = field(default_factory=list)  # what steps 3 and 5 received, for an ExchangeTape
    y_TD: torch.Tensor | None = None


class AllToAllDispatcher(Dispatcher):
    """The `Dispatcher` for experts sharded over an expert-parallel group.

    Args:
        group: the ep process group (P ranks; rank r holds experts [r·E/P, (r+1)·E/P)).
        num_experts: E, the global expert count the router chooses from.
        overlap: one of EP_OVERLAPS.
        num_chunks: token chunks for "chunked" and "combinable" (others use 1).

    Call as any dispatcher, `dispatcher(x_TD, routing, experts)`, with `experts` holding this
    rank's L experts. Optional `overlap_fn`: a callable returning a [T, D] tensor (the shared
    experts) that is added to the output; it runs while tokens are in flight when the strategy
    includes shared_expert, after the combine otherwise (same result either way).

    Dropless by default. In capacity mode (routing.pad_to = C > 0, over-capacity assignments
    already dropped by the router) the unchunked strategies send every expert exactly C rows,
    as the local dispatcher pads it, so the token all-to-all has fixed, even splits. Chunked
    strategies send the kept rows only (a chunk's rows are data dependent anyway); padding never
    changes the output or any gradient.

    `tape`: an `ExchangeTape` while a checkpointed forward or its recompute runs (set from
    outside, by parallel/recompute.py), else None.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int, overlap: str = "none",
                 num_chunks: int = 2):
        if overlap not in EP_OVERLAPS:
            raise ValueError(f"ep overlap {overlap!r} is not one of {', '.join(EP_OVERLAPS)}")
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        if num_experts % self.num_ranks:
            raise ValueError(f"{num_experts} experts do not divide over {self.num_ranks} ep ranks")
        self.num_experts, self.num_local = num_experts, num_experts // self.num_ranks
        self.overlap = overlap
        self.use_async = overlap in ("async", "combinable")
        self.num_chunks = max(1, num_chunks) if overlap in ("chunked", "combinable") else 1
        self.overlap_shared = overlap in ("shared_expert", "combinable")
        self.tape: ExchangeTape | None = None

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(ep={self.num_ranks}, experts={self.num_experts}, "
                f"overlap={self.overlap!r}, chunks={self.num_chunks})")

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: nn.Module,
                 overlap_fn: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        if experts.num_experts != self.num_local:
            raise ValueError(f"experts hold {experts.num_experts} experts, the dispatcher expects "
                             f"{self.num_local} (E={self.num_experts} over {self.num_ranks} ranks)")
        # A recompute takes every step below on what its forward's exchanges received (no exchange).
        replay = self.tape.next_record() if self.tape is not None and self.tape.replaying else None
        chunks = self._split(x_TD, routing)
        # 1. permute locally by (global) expert: the order and counts first, for step 2 ...
        for c in chunks:
            self._route(c)
        # 2. exchange per-expert counts (one all-to-all for every chunk; replayed by a recompute) ...
        counts_work, send_counts, recv_counts = self._start_count_exchange(chunks, replay)
        if not self.use_async:
            counts_work.wait()
        # ... 1 (cont.) gathering the rows meanwhile when async.
        for c in chunks:
            self._gather(c)
        if self.use_async:
            counts_work.wait()
        splits = self._set_splits(chunks, recv_counts, replay)
        if not self.use_async:
            for c in chunks:
                self._local_order(c)
        # 3.-6. per chunk: all-to-all tokens, local experts, reverse all-to-all, combine. With
        # several chunks the token exchange of chunk i+1 is in flight during the experts of chunk
        # i and the combine of chunk i-1; with one chunk every wait follows its start.
        self._dispatch(chunks[0])
        shared_TD = overlap_fn() if overlap_fn is not None and self.overlap_shared else None
        for i, c in enumerate(chunks):
            if i + 1 < len(chunks):
                self._dispatch(chunks[i + 1])
            self._compute(c, experts)
            if i > 0:
                self._combine(chunks[i - 1], x_TD.dtype)
        self._combine(chunks[-1], x_TD.dtype)
        if self.tape is not None and not self.tape.replaying:  # a checkpointed forward: for its recompute
            self.tape.record(send_counts, recv_counts, splits, [c.received for c in chunks])
        y_TD = chunks[0].y_TD if len(chunks) == 1 else torch.cat([c.y_TD for c in chunks])
        if overlap_fn is not None:
            y_TD = y_TD + (shared_TD if shared_TD is not None else overlap_fn())
        return y_TD

    # -- the steps ---------------------------------------------------------------------------------

    def _split(self, x_TD: torch.Tensor, routing: Routing) -> list[_Chunk]:
        """Contiguous token ranges, each with the assignments of its tokens (re-indexed)."""
        T, C = x_TD.shape[0], self.num_chunks
        if C == 1:
            return [_Chunk(x_TD, routing, routing.pad_to)]
        bounds = [T * i // C for i in range(C + 1)]
        chunk_N = torch.bucketize(routing.token_idx_N, torch.tensor(bounds[1:-1], device=x_TD.device),
                                  right=True)
        chunks = []
        for i in range(C):
            keep_N = chunk_N == i
            sub = Routing(routing.token_idx_N[keep_N] - bounds[i], routing.expert_idx_N[keep_N],
                          routing.weight_N[keep_N], bounds[i + 1] - bounds[i])
            chunks.append(_Chunk(x_TD[bounds[i]:bounds[i + 1]], sub, 0))
        return chunks

    def _route(self, c: _Chunk) -> None:
        """Step 1a: assignment order and rows per destination expert (no row is moved yet)."""
        # Stable, as models.moe.permute: rows of one expert keep the router's order.
        c.order_N = torch.argsort(c.routing.expert_idx_N, stable=True)
        counts_E = count_ids(c.routing.expert_idx_N, self.num_experts)
        if c.pad:
            c.slot_N = padded_slots(counts_E, c.pad)
            counts_E = torch.full_like(counts_E, c.pad)
        c.send_counts_PL = counts_E.view(self.num_ranks, self.num_local)

    def _start_count_exchange(self, chunks: list[_Chunk], replay: Record | None):
        """Step 2: rank p receives, from every rank, its rows per local expert for every chunk (a
        recompute: what its forward received). Returns (work, sent counts, received counts)."""
        send_PCL = torch.stack([c.send_counts_PL for c in chunks], dim=1).contiguous()
        if replay is not None:
            if not torch.equal(send_PCL, replay.send_PCL):  # the recorded rows would be the wrong ones
                raise RuntimeError("activation checkpointing: the recompute routed other tokens than the "
                                   "forward it re-runs (a non-deterministic forward?)")
            return _Replayed(), send_PCL, replay.recv_PCL
        recv_PCL = torch.empty_like(send_PCL)
        work = dist.all_to_all_single(recv_PCL, send_PCL, group=self.group, async_op=True)
        return work, send_PCL, recv_PCL

    def _gather(self, c: _Chunk) -> None:
        """Step 1b: one row per assignment, in expert order (and in its padded slot)."""
        x_sorted_ND = c.x_TD[c.routing.token_idx_N[c.order_N]]
        if c.pad:
            buf = x_sorted_ND.new_zeros((self.num_experts * c.pad, c.x_TD.shape[1]))
            x_sorted_ND = buf.index_copy(0, c.slot_N, x_sorted_ND)
        c.x_send_ND = x_sorted_ND

    def _set_splits(self, chunks: list[_Chunk], recv_PCL: torch.Tensor, replay: Record | None) -> list:
        """Row counts per peer for every chunk, read back to the host in one go (a recompute
        reuses its forward's, and its exchanges return the recorded rows); returns them."""
        if replay is None:
            send_PC = torch.stack([c.send_counts_PL.sum(1) for c in chunks], dim=1)
            both = torch.stack([send_PC, recv_PCL.sum(2)]).tolist()  # split sizes must be host ints
        else:
            both = replay.splits
        for i, c in enumerate(chunks):
            c.recv_counts_PL = recv_PCL[:, i]
            send = [row[i] for row in both[0]]
            recv = [row[i] for row in both[1]]
            dispatched, combined = replay.received[i] if replay is not None else (None, None)
            c.exchanges = [_Exchange(self.group, send, recv, dispatched), _Exchange(self.group, recv, send, combined)]
        return both

    def _local_order(self, c: _Chunk) -> None:
        """Received rows come as (source rank, local expert); the experts want local-expert order."""
        P, L = self.num_ranks, self.num_local
        counts = c.recv_counts_PL
        expert_M = torch.repeat_interleave(torch.arange(L, device=counts.device).repeat(P), counts.reshape(-1))
        c.sort_M = torch.argsort(expert_M, stable=True)
        c.unsort_M = torch.empty_like(c.sort_M)
        c.unsort_M[c.sort_M] = torch.arange(c.sort_M.numel(), device=counts.device)
        c.counts_L = counts.sum(0)

    def _dispatch(self, c: _Chunk) -> None:
        """Step 3: all-to-all of the token rows, uneven splits, started asynchronously."""
        c.buffer = _StartAllToAll.apply(c.x_send_ND, c.exchanges[0])
        if self.use_async and c.sort_M is None:
            self._local_order(c)  # bookkeeping while the rows are in flight

    def _compute(self, c: _Chunk, experts: nn.Module) -> None:
        """Step 4: wait for the rows, run the local experts, and 5. start the reverse all-to-all."""
        x_recv_MD = _WaitAllToAll.apply(c.buffer, c.exchanges[0])
        c.received.append(x_recv_MD.detach())  # no graph reference: a tape lives as long as the graph
        y_MD = experts(x_recv_MD[c.sort_M], c.counts_L)[c.unsort_M]
        c.buffer = _StartAllToAll.apply(y_MD, c.exchanges[1])

    def _combine(self, c: _Chunk, out_dtype: torch.dtype) -> None:
        """Step 6: wait for the expert outputs, drop padding, unpermute and combine with the gates."""
        y_sorted_ND = _WaitAllToAll.apply(c.buffer, c.exchanges[1])
        c.received.append(y_sorted_ND.detach())
        if c.pad:
            y_sorted_ND = y_sorted_ND[c.slot_N]
        c.y_TD = unpermute_combine(y_sorted_ND, c.order_N, c.routing, out_dtype)
        c.buffer = None


# -- applying it to a model ------------------------------------------------------------------------


def shard_experts(experts: nn.Module, ep_rank: int, ep: int) -> None:
    """Keep experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of a `GroupedExperts` (every parameter is
    sliced along dim 0 into a new nn.Parameter, so shard before building the optimizer).

    Sets `experts.num_experts` to the local count and records, for checkpoint adapters,
    `experts.expert_offset` (global index of local expert 0) and `experts.num_global_experts`.
    """
    if hasattr(experts, "num_global_experts"):
        raise RuntimeError("experts are already sharded")
    E = experts.num_experts
    local = E // ep
    offset = ep_rank * local
    for module_name, module in experts.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.shape[0] != E:
                raise ValueError(f"expert parameter {module_name}.{name} has dim 0 of {p.shape[0]}, not E={E}")
            setattr(module, name, nn.Parameter(p.detach()[offset:offset + local].clone(),
                                               requires_grad=p.requires_grad))
    experts.num_experts = local
    experts.expert_offset = offset
    experts.num_global_experts = E


def apply_expert_parallel(model: nn.Module, mesh, overlap: str = "none", num_chunks: int = 2) -> nn.Module:
    """Shard the routed experts of every MoE layer of `model` over the mesh's ep group and swap in
    the all-to-all dispatcher (in place; returns the model). A no-op when mesh.ep == 1."""
    if mesh.ep == 1:
        return model
    for layer in moe_layers(model):
        shard_experts(layer.experts, mesh.ep_rank, mesh.ep)
        layer.dispatcher = AllToAllDispatcher(mesh.ep_group, layer.experts.num_global_experts,
                                              overlap, num_chunks)
    return model
