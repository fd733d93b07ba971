"""Everything that knows about process groups. Applied to plain-torch models from outside.

Order of application (fixed, as in torchtitan): expert parallelism (shard the routed experts,
swap in the all-to-all dispatcher), pipeline split, then data-parallel wrapping. With pp > 1 the
stages are not wrapped in DDP: `sync_replicated_grads` reduces their gradients once per step.

A training step with expert parallelism: backward (DDP reduces the non-expert gradients over dp),
then `sync_expert_grads` (expert gradients over their expert-data-parallel group), then
`clip_grad_norm` (the norm of the whole sharded model), then the optimizer step.
"""
from __future__ import annotations

import torch.nn as nn

from parallel.data_parallel import (clip_grad_norm, sync_context, sync_expert_grads, sync_replicated_grads, unwrap,
                                    wrap_data_parallel)
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
    if mesh.pp > 1:
        raise ValueError("parallelize: use parallelize_pipeline for pipeline parallelism (pp > 1)")
    return wrap_data_parallel(model, mesh)


def parallelize_pipeline(model: nn.Module, mesh: ParallelMesh, cfg, loss_fn):
    """Expert parallelism (if ep > 1), then this rank's pipeline stages; returns a
    `parallel.pipeline.Pipeline` whose `module` holds this rank's parameters (build the optimizer
    on it). `loss_fn(last stage output, targets)` is the unscaled mean loss of a microbatch."""
    from parallel.pipeline import build_pipeline

    if mesh.ep > 1:
        apply_expert_parallel(model, mesh, cfg.parallel.ep_overlap, cfg.parallel.ep_chunks)
    return build_pipeline(model, mesh, cfg, loss_fn)


__all__ = ["AllToAllDispatcher", "EP_OVERLAPS", "ParallelMesh", "all_reduce_mean", "all_reduce_sum", "apply_expert_parallel",
           "barrier", "build_mesh", "clip_grad_norm", "group_ranks", "layout", "parallelize", "parallelize_pipeline",
           "pick_device", "shard_experts", "sync_context", "sync_expert_grads", "sync_replicated_grads", "unwrap"]
