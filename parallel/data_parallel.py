"""Data-parallel wrapping: PyTorch DDP over the mesh's dp group.

Why DDP and not FSDP2: at the model sizes this runs on CPU, replicating parameters costs little,
DDP overlaps its bucketed all-reduce with backward, and gloo supports all of it.

With expert parallelism (ep > 1) DDP skips the routed-expert parameters: each rank holds other
experts. Their gradients are reduced by `sync_expert_grads` over the expert-data-parallel group
only, and `clip_grad_norm` computes the norm of the whole (sharded) model.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from models.moe import expert_parameters, is_expert_param
from parallel.mesh import ParallelMesh


def wrap_data_parallel(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """DDP over the dp group, or the model itself when there is nothing to reduce over."""
    if mesh.dp_group is None:
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
                                   forward_sync_buffers=False, gradient_as_bucket_view=True)


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
    grads = [p.grad for _, p in expert_parameters(unwrap(model)) if p.grad is not None]
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
    if mesh.dp_group is None:
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

    What torch.nn.utils.clip_grad_norm_ gives on the unsharded model: replicated parameters
    count once, expert shards are summed over the ep group (after `sync_expert_grads` they are
    equal across the expert-data-parallel group, so each expert counts once). Under pipeline
    parallelism each rank holds some stages' parameters: the squares are summed over the pp
    group too. `max_norm` inf: measure only, gradients untouched (even for a non-finite norm,
    which clip_grad_norm_ would spread as NaN into every gradient).
    """
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.grad is not None]
    if mesh.ep == 1 and mesh.pp == 1:
        if math.isinf(max_norm):  # what clip_grad_norm_ returns, without its scaling by inf / norm
            return torch.nn.utils.get_total_norm([p.grad for _, p in named], 2.0)
        return torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm)
    grads = [p.grad for _, p in named]
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads], torch.float32)
    sq = [torch.zeros((), dtype=dtype, device=mesh.device) for _ in range(2)]  # other, expert
    for (name, _), g in zip(named, grads):
        i = int(is_expert_param(name))
        sq[i] = sq[i] + torch.linalg.vector_norm(g, dtype=dtype).square()
    if mesh.ep > 1:
        dist.all_reduce(sq[1], op=dist.ReduceOp.SUM, group=mesh.ep_group)
    total_sq = sq[0] + sq[1]
    if mesh.pp > 1:  # stages hold disjoint parameters
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=mesh.pp_group)
    total = total_sq.sqrt()
    if not math.isinf(max_norm):
        # As torch: scale by max_norm / (norm + 1e-6) when that is below 1.
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype) if grads else coef)
    return total
