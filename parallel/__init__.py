"""Everything that knows about process groups. Applied to plain-torch models from outside.

Order of application (fixed, as in torchtitan): expert parallelism (shard the routed experts,
swap in the all-to-all dispatcher), pipeline split, then data-parallel wrapping. Pipeline
parallelism is refused by config validation until it lands.

A training step with expert parallelism: backward (DDP reduces the non-expert gradients over dp),
then `sync_expert_grads` (expert gradients over their expert-data-parallel group), then
`clip_grad_norm` (the norm of the whole sharded model), then the optimizer step.
"""
from __future__ import annotations

import torch.nn as nn

from parallel.data_parallel import clip_grad_norm, sync_context, sync_expert_grads, unwrap, wrap_data_parallel
from parallel.expert_parallel import EP_OVERLAPS, AllToAllDispatcher, apply_expert_parallel, shard_experts
from parallel.mesh import (ParallelMesh, all_reduce_mean, all_reduce_sum, barrier, build_mesh, group_ranks, layout,
                           pick_device)


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg=None) -> nn.Module:
    """Apply the mesh's parallelism to a model already on its device; returns the wrapper.

    Args:
        model: plain torch model, initialised identically on every rank. With ep > 1 its experts
            are replaced by this rank's shard (new parameters): build the optimizer afterwards,
            on `unwrap(result)`.
        mesh: from `build_mesh`.
        cfg: the run's `trainer.config.Config` (parallel.ep_overlap, parallel.ep_chunks);
            required when mesh.ep > 1.
    """
    if mesh.ep > 1:
        if cfg is None:
            raise ValueError("parallelize: expert parallelism (ep > 1) needs the run config")
        apply_expert_parallel(model, mesh, cfg.parallel.ep_overlap, cfg.parallel.ep_chunks)
    return wrap_data_parallel(model, mesh)


__all__ = ["AllToAllDispatcher", "EP_OVERLAPS", "ParallelMesh", "all_reduce_mean", "all_reduce_sum", "apply_expert_parallel",
           "barrier", "build_mesh", "clip_grad_norm", "group_ranks", "layout", "parallelize", "pick_device",
           "shard_experts", "sync_context", "sync_expert_grads", "unwrap"]
