"""Data-parallel wrapping: PyTorch DDP over the mesh's dp group.

Why DDP and not FSDP2: at the model sizes this runs on CPU, replicating parameters costs little,
DDP overlaps its bucketed all-reduce with backward, and gloo supports all of it. Expert
parallelism (a later issue) keeps DDP for non-expert parameters and reduces expert parameters
over their expert-data-parallel group only.
"""
from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from parallel.mesh import ParallelMesh


def wrap_data_parallel(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """DDP over the dp group, or the model itself when there is nothing to reduce over."""
    if mesh.dp_group is None:
        return model
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
