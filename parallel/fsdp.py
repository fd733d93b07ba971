"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`), parallel.data_parallel
fsdp: parameters, gradients and optimizer state sharded over the dp group (or, HSDP, over shard
groups and replicated across them), each block's parameters gathered just for its compute.

Wrapping, per transformer or DiT block, then the root(s) (the model, or each pipeline stage):
    1. the routed experts of an MoE block, when ep > 1 and other ranks hold the same experts, as
       their own unit over `mesh.expert_fsdp_mesh`: they are already split over the ep group, so
       FSDP shards each rank's experts over the ranks holding the same ones. Sharded along dim 1
       (an expert's rows), which every shard size divides in practice, where dim 0 (the few local
       experts) would leave ranks empty. Their gradient is the sum over those ranks divided by dp
       (as `sync_expert_grads`: the reverse all-to-all already summed over the ep group).
    2. the block over `mesh.fsdp_mesh`; experts that no other rank holds (dp == ep) stay plain
       tensors outside FSDP, reduced by `sync_expert_grads` as under DDP.
    3. the root, holding what no block holds (embedding, final norm, head).
Works on the meta device (then `parallel/materialize.py` allocates the shards) or on a
materialised model (FSDP shards the existing tensors). Gradients are reduce-scattered after every
micro step's backward, so accumulation sums shards; clipping and the non-finite guard read the
local shards (`local_tensor`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from models.moe import moe_layers
from parallel.config import CPU_OFFLOAD_ON_CPU, ParallelConfig
from parallel.mesh import ParallelMesh

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard (a view), else `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def apply_fsdp(model: nn.Module, roots: list[nn.Module], mesh: ParallelMesh, par: ParallelConfig) -> None:
    """Shard `model`'s blocks held by this rank, then each of `roots` (in place).

    Args:
        model: the whole model (blocks in `model.layers`; those no root holds are left alone).
        roots: the modules this rank runs: [model], or its pipeline stage modules.
    """
    if par.fsdp_cpu_offload and mesh.device.type == "cpu":  # FSDP2's offload needs an accelerator
        raise ValueError(CPU_OFFLOAD_ON_CPU)
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=DTYPES[par.fsdp_param_dtype],
                                            reduce_dtype=DTYPES[par.fsdp_reduce_dtype]),
              offload_policy=CPUOffloadPolicy() if par.fsdp_cpu_offload else OffloadPolicy())
    held = {id(m) for root in roots for m in root.modules()}
    ignored: set[nn.Parameter] = set()  # experts outside FSDP (no other rank holds them)
    for block in model.layers.values():
        if id(block) not in held:
            continue
        block_ignored = set()
        for layer in moe_layers(block):
            if mesh.ep == 1:
                continue
            if mesh.expert_fsdp_mesh is None:
                block_ignored |= set(layer.experts.parameters())
                continue
            fully_shard(layer.experts, mesh=mesh.expert_fsdp_mesh, shard_placement_fn=lambda p: Shard(1),
                        reshard_after_forward=par.fsdp_reshard_after_forward, **kw)
            layer.experts.set_gradient_divide_factor(float(mesh.dp))
            if mesh.device.type != "cuda":  # gloo has no pre-multiplied sum: sum, then scale
                layer.experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=mesh.fsdp_mesh, ignored_params=block_ignored or None,
                    shard_placement_fn=_expert_placement(block, mesh.ep),
                    reshard_after_forward=par.fsdp_reshard_after_forward, **kw)
        ignored |= block_ignored
    for root in roots:
        root_ignored = {p for p in root.parameters() if p in ignored}
        # The root's own parameters are gathered for the whole step: no resharding after forward.
        fully_shard(root, mesh=mesh.fsdp_mesh, ignored_params=root_ignored or None,
                    reshard_after_forward=False, **kw)


def _expert_placement(block: nn.Module, ep: int):
    """Without expert parallelism the experts are ordinary block parameters: shard them along dim
    1 too (dim 0, the few experts, would leave most ranks empty); everything else along dim 0."""
    if ep > 1:
        return None
    experts = {id(p) for layer in moe_layers(block) for p in layer.experts.parameters()}
    return lambda p: Shard(1) if id(p) in experts else None


def is_fsdp_managed(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)
