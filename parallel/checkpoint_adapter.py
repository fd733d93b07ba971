"""Checkpoint state of expert-sharded models: each expert stored once, loadable onto any ep size.

With ep > 1 every rank of an ep group holds other experts under the same parameter name, so a
plain state dict would give torch.distributed.checkpoint (DCP) the same key with different
contents on every rank: it would keep one rank's slice and load it everywhere (the failure of
MegaBlocks #160 and DeepSpeed #6589). Instead, for DCP only, every expert-sharded tensor (the
parameter and its same-shaped optimizer state, AdamW's exp_avg / exp_avg_sq) is presented as a
DTensor over the ep group with placement Shard(0): its key and global shape are those of the
unsharded model ([E, ...]) and each rank owns the rows [expert_offset, expert_offset + E/ep).

Why DTensor rather than renamed per-expert keys: DCP already reshards DTensors, so
    - the format is the unsharded model's: key `layers.1.ffn.experts.w1_EFD`, shape [E, F, D],
      stored as ep chunks along dim 0 (one chunk when saved with ep=1); an ep=1 run saves plain
      tensors under the same keys, and any ep loads any other;
    - a load reads exactly the rows the rank holds under its new layout, whatever the old one;
    - expert-data-parallel replicas (same ep_rank, other edp_rank) write the same chunk index, and
      DCP keeps one writer per (key, offset), as it does for replicated plain tensors;
    - consolidating a checkpoint with DCP's own tools gives full [E, ...] tensors, one key per
      parameter (not E × 3 keys per layer).
Outside FSDP the model itself never holds DTensors: they exist only between `get_state_dict` and
`dcp.save`, and between `dcp.load` and `set_state_dict`, wrapping (not copying) the local tensors.
Under FSDP (parallel/fsdp.py) an expert parameter is already a DTensor over the expert shard mesh
(the rank's [E/ep, ...] experts split along dim 1); it is presented over that mesh and the ep group
(`mesh.expert_ckpt_mesh`), again the unsharded [E, ...] tensor. Non-expert FSDP parameters are
DTensors of their global shape already and need nothing.

Pipeline parallelism needs nothing here: stage modules keep the full model's parameter names, so a
stage saves and loads only the keys it holds (each pp stage writes its own keys; any pp reads them).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from parallel.mesh import ParallelMesh


def expert_shards(model: nn.Module) -> dict[str, tuple[int, int]]:
    """FQN -> (expert_offset, num_global_experts) of every parameter sliced by `shard_experts`."""
    shards = {}
    for prefix, module in model.named_modules():
        if not hasattr(module, "num_global_experts"):
            continue
        for name, _ in module.named_parameters():
            fqn = f"{prefix}.{name}" if prefix else name
            shards[fqn] = (module.expert_offset, module.num_global_experts)
    return shards


def to_checkpoint(model: nn.Module, model_sd: dict, optim_sd: dict, mesh: ParallelMesh) -> dict:
    """Wrap the expert-sharded tensors of `get_state_dict`'s dicts as DTensors of the unsharded
    [E, ...] tensor, in place; returns what `from_checkpoint` puts back.

    Args:
        model: the unwrapped (no DDP) model the state dicts come from.
        model_sd, optim_sd: from `torch.distributed.checkpoint.state_dict.get_state_dict` with
            `flatten_optimizer_state_dict=True` (optimizer keys `state.<fqn>.<name>`).
        mesh: the run's mesh; a no-op when mesh.ep == 1.
    """
    shards = expert_shards(model)
    originals: dict = {}
    if mesh.ep == 1 or not shards:
        return originals
    device_mesh = DeviceMesh.from_group(mesh.ep_group, mesh.device.type, mesh_dim_names=("ep",))
    for fqn, (offset, num_global) in shards.items():
        if fqn not in model_sd:  # frozen (a PEFT run's base experts) or not in this extra state
            continue
        value = model_sd[fqn]
        local = value.shape[0]  # experts this rank holds (FSDP shards them along another dim)
        # DTensor places shard r at rows [r·E/ep, (r+1)·E/ep): that must be what shard_experts kept.
        if offset != mesh.ep_rank * local or num_global != local * mesh.ep:
            raise RuntimeError(f"{fqn}: experts [{offset}, {offset + local}) of {num_global} do not "
                               f"match ep_rank {mesh.ep_rank} of ep={mesh.ep}")
        # Optimizer state, flattened per parameter (`state.<fqn>.<name>`, see trainer/checkpoint.py):
        # moments have the parameter's shape; scalars (AdamW's `step`) are the same everywhere.
        keys = [(model_sd, fqn)] + [(optim_sd, k) for k, v in optim_sd.items()
                                    if k.startswith(f"state.{fqn}.") and _is_rows(v, local)]
        for sd, key in keys:
            originals[(id(sd), key)] = sd[key]
            sd[key] = _global_experts(sd[key], device_mesh, mesh, num_global)
    return originals


def from_checkpoint(model_sd: dict, optim_sd: dict, originals: dict) -> None:
    """Put back the tensors `to_checkpoint` wrapped (after `dcp.load` filled them in place)."""
    for sd in (model_sd, optim_sd):
        for key in list(sd):
            if (id(sd), key) in originals:
                sd[key] = originals[(id(sd), key)]


def _is_rows(value, num_local: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == num_local


def _global_experts(value: torch.Tensor, ep_mesh: DeviceMesh, mesh: ParallelMesh, num_global: int) -> DTensor:
    """This rank's experts as a DTensor of the unsharded tensor: over the ep group (rows), and
    under FSDP also over the expert shard mesh (its own placements: dim 1, replicas)."""
    # run_check=False: no collective; shapes are equal across the groups by construction.
    if not isinstance(value, DTensor):
        return DTensor.from_local(value, ep_mesh, [Shard(0)], run_check=False)
    shape = (num_global, *value.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value.to_local(), mesh.expert_ckpt_mesh, [*value.placements, Shard(0)],
                              run_check=False, shape=shape, stride=stride)
