"""Data-parallel gradients: DDP wrapping over the mesh's dp group, the expert and replicated
gradient reductions that DDP does not do, and the gradient norm of the whole sharded model.

DDP (parallel.data_parallel ddp) replicates every non-expert parameter; FSDP2 (fsdp, parallel/fsdp.py)
shards them and reduce-scatters their gradients itself. Either way, with expert parallelism
(ep > 1) each rank holds other routed experts: gradients of experts FSDP does not manage are
reduced by `sync_expert_grads` over the expert-data-parallel group, and `clip_grad_norm` computes
the norm of the whole model from every rank's shards.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from models.moe import expert_parameters, is_expert_param
from parallel.fsdp import is_fsdp_managed, local_tensor
from parallel.mesh import ParallelMesh


def wrap_data_parallel(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """DDP over the dp group, or the model itself when there is nothing to reduce over (or FSDP
    reduces it)."""
    if mesh.dp_group is None or mesh.fsdp:
        return model
    # Sharded experts (ep > 1) are reduced by sync_expert_grads, never broadcast from rank 0.
    ignored = [name for name, _ in expert_parameters(model)] if mesh.ep > 1 else []
    if not any(p.requires_grad for name, p in model.named_parameters() if name not in ignored):
        return model  # nothing for DDP to reduce (ESFT under ep trains expert rows only)
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [mesh.device.index] if mesh.device.type == "cuda" else None
    # Every parameter takes part in every step (the MoE loop backend touches idle experts with
    # empty matmuls), so DDP does not need the slow unused-parameter search.
    # Buffers (RoPE tables) are computed identically on every rank: no per-forward broadcast.
    return DistributedDataParallel(model, process_group=mesh.dp_group, device_ids=device_ids,
                                   gradient_as_bucket_view=True, **_no_buffer_sync())


def _no_buffer_sync() -> dict:
    """DDP's argument that turns off the per-forward buffer broadcast: `forward_sync_buffers`
    since torch 2.13 (which deprecates `broadcast_buffers`), `broadcast_buffers` before."""
    takes = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in takes else {"broadcast_buffers": False}


def sync_context(model: nn.Module, is_last_micro_step: bool):
    """Skip DDP's all-reduce on all but the last micro step of gradient accumulation."""
    if isinstance(model, DistributedDataParallel) and not is_last_micro_step:
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def sync_expert_grads(model: nn.Module, mesh: ParallelMesh) -> None:
    """Average the routed-expert gradients as DDP averages the others (no-op when ep == 1).

    Call once per optimizer step, after the last micro step's backward, before clipping. The
    gradient of an expert on its owner rank already sums the contributions of the tokens of all
    ep ranks (the reverse all-to-all brought them back); summing over the expert-data-parallel
    group adds the other ep groups' tokens, so dividing by dp (not by dp/ep) gives the gradient
    of the mean loss over the dp ranks, the one DDP gives every other parameter.
    """
    if mesh.ep == 1:
        return
    grads = [p.grad for _, p in expert_parameters(unwrap(model)) if p.grad is not None and not is_fsdp_managed(p)]
    if not grads:
        return
    if mesh.edp_group is not None:  # one collective for all expert grads
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.edp_group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    torch._foreach_div_(grads, float(mesh.dp))


def sync_replicated_grads(model: nn.Module, mesh: ParallelMesh) -> None:
    """Average the non-expert gradients over the dp group, as DDP would (no-op when dp == 1).

    For pipeline stages, which are not wrapped in DDP: a schedule runs many forwards and
    backwards per step (split into input and weight halves by the zero-bubble schedules), and
    one flat all-reduce after the last of them is simpler than steering DDP's reducer through
    them. Call once per optimizer step, with `sync_expert_grads`, before clipping.
    """
    if mesh.dp_group is None or mesh.fsdp:  # FSDP reduce-scatters in backward
        return
    skip_experts = mesh.ep > 1  # sharded: reduced over their expert-data-parallel group instead
    grads = [p.grad for n, p in unwrap(model).named_parameters()
             if p.grad is not None and not (skip_experts and is_expert_param(n))]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.dp_group)
    flat /= mesh.dp
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def clip_grad_norm(model: nn.Module, mesh: ParallelMesh, max_norm: float) -> torch.Tensor:
    """Clip all gradients by the 2-norm of the whole model's gradient; returns that norm.

    What torch.nn.utils.clip_grad_norm_ gives on the unsharded model. The squares of this rank's
    gradients are summed by kind, then over the ranks that hold other parts of the model:
        replicated (DDP, or no dp)    counted once: every rank holds the same values
        FSDP shards                   summed over the shard group (HSDP replicas hold the same)
        experts (ep > 1)              FSDP's expert shards over their shard group, then every
                                      rank's experts over the ep group (after `sync_expert_grads`
                                      the expert-data-parallel replicas hold the same values)
        pipeline stages (pp > 1)      disjoint parameters: summed over the pp group
    `max_norm` inf: measure only, gradients untouched (even for a non-finite norm, which
    clip_grad_norm_ would spread as NaN into every gradient).
    """
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.grad is not None]
    if mesh.ep == 1 and mesh.pp == 1 and not mesh.fsdp:
        if math.isinf(max_norm):  # what clip_grad_norm_ returns, without its scaling by inf / norm
            return torch.nn.utils.get_total_norm([p.grad for _, p in named], 2.0)
        return torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm)
    grads = [local_tensor(p.grad) for _, p in named]
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads], torch.float32)
    # (expert?, DTensor mesh or None, its sharded mesh dims) -> sum of squares of this rank's part
    sq: dict = {}
    for (name, p), g in zip(named, grads):
        grad = p.grad
        shards = (grad.device_mesh, tuple(i for i, pl in enumerate(grad.placements) if pl.is_shard())) \
            if is_fsdp_managed(grad) else (None, ())
        key = (is_expert_param(name), *shards)
        sq[key] = sq.get(key, 0.0) + torch.linalg.vector_norm(g, dtype=dtype).square()
    experts = torch.zeros((), dtype=dtype, device=mesh.device)
    total_sq = torch.zeros((), dtype=dtype, device=mesh.device)
    for (expert, device_mesh, dims), value in sq.items():
        for dim in dims:  # FSDP shards: summed over the mesh dims they are split along
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=device_mesh.get_group(dim))
        if expert:
            experts = experts + value
        else:
            total_sq = total_sq + value
    if mesh.ep > 1:  # every rank of the ep group holds other experts
        dist.all_reduce(experts, op=dist.ReduceOp.SUM, group=mesh.ep_group)
    total_sq = total_sq + experts
    if mesh.pp > 1:  # stages hold disjoint parameters
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=mesh.pp_group)
    total = total_sq.sqrt()
    if not math.isinf(max_norm):
        # As torch: scale by max_norm / (norm + 1e-6) when that is below 1.
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype) if grads else coef)
    return total
