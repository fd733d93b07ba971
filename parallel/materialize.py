"""Per-rank materialisation: a model built on the meta device, already split (expert shards,
pipeline stages, FSDP shards), gets memory only for what this rank holds, and its initial values
from the run's seed (models/init.py), the same values whatever the layout.

    1. `module.to_empty(device)`: this rank's parameters (a DTensor's local shard under FSDP) and
       buffers; the rest of the model (other stages' layers) stays on meta, never allocated
    2. `initialize(model, seed, local_part)`: every parameter this rank holds, by its name in the
       whole model; `local_part` tells where a DTensor's shard sits in the global tensor
    3. buffers derived from the config (RoPE tables, DiT positions) computed by the modules that
       hold them (a pipeline stage holds its own reference to the model's tables)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from models.init import initialize


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, global shape, offset of the local part per dim) of a tensor or DTensor."""
    if not isinstance(t, DTensor):
        return t, tuple(t.shape), (0,) * t.ndim
    shape = tuple(t.shape)
    _, offset = compute_local_shape_and_global_offset(shape, t.device_mesh, t.placements)
    return t.to_local(), shape, tuple(offset)


def share_of(t: torch.Tensor, full: torch.Tensor, expert_offset: int | None) -> torch.Tensor:
    """The part of `full` (a tensor of the unsharded model) that `t` holds here: its experts'
    rows under expert parallelism, then its FSDP shard."""
    if expert_offset is not None:
        full = full[expert_offset:expert_offset + t.shape[0]]
    local, _, offset = local_part(t)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))]


def expert_offsets(module: nn.Module) -> dict[str, int]:
    """Name -> global index of local expert 0, for every tensor of an expert module (dim 0 = experts)."""
    out = {}
    for prefix, m in module.named_modules():
        if getattr(m, "is_expert_module", False):
            for name, _ in m.named_parameters():
                out[f"{prefix}.{name}" if prefix else name] = getattr(m, "expert_offset", 0)
    return out


@torch.no_grad()
def load_whole_state(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy this rank's share of each tensor of `state` (keys: the unsharded model's names) into
    `module`; returns the keys of `module` that `state` did not have."""
    offsets = expert_offsets(module)
    missing = []
    for name, t in module.state_dict(keep_vars=True).items():  # parameters and persistent buffers
        if name not in state:
            missing.append(name)
            continue
        local_part(t)[0].copy_(share_of(t, state[name], offsets.get(name)))
    return missing


@torch.no_grad()
def materialize(model: nn.Module, module: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate and initialise what this rank holds.

    Args:
        model: the whole model (on meta), whose parameter names key the initial values.
        module: the part this rank holds: `model` itself, or its pipeline stages' union module.
        device: where to allocate it.
        seed: train.seed.
    """
    module.to_empty(device=device)
    initialize(model, seed, local_part)
    for m in module.modules():
        if m is not model and hasattr(m, "init_buffers"):
            m.init_buffers()
