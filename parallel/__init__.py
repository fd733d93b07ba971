"""Everything that knows about process groups. Applied to plain-torch models from outside.

    config.py            ParallelConfig and what derives from it (no torch)
    mesh.py              process groups: pp x dp, with ep folded into dp
    apply.py             parallelize(): EP, PP and DP applied to a model, in a fixed order
    expert_parallel.py   the all-to-all dispatcher and its overlap strategies
    pipeline.py          stages and schedules (torch.distributed.pipelining)
    recompute.py         activation checkpointing, and the all-to-alls its recompute replays
    compile.py           torch.compile of every block, around the checkpointed regions
    data_parallel.py     DDP wrapping, expert and replicated gradient reduction, clipping
    checkpoint_adapter.py, watchdog.py   expert shards in DCP; naming the rank that hangs

A training step with expert parallelism: backward (DDP reduces the non-expert gradients over dp),
then `sync_expert_grads` (expert gradients over their expert-data-parallel group), then
`clip_grad_norm` (the norm of the whole sharded model), then the optimizer step.
"""
# The public names, loaded on first use: importing `parallel.config` (the launcher, the recipe
# loader) must not import torch.distributed.
_LAZY = {
    "clip_grad_norm": "parallel.data_parallel",
    "sync_context": "parallel.data_parallel",
    "sync_expert_grads": "parallel.data_parallel",
    "sync_replicated_grads": "parallel.data_parallel",
    "unwrap": "parallel.data_parallel",
    "wrap_data_parallel": "parallel.data_parallel",
    "AllToAllDispatcher": "parallel.expert_parallel",
    "apply_expert_parallel": "parallel.expert_parallel",
    "shard_experts": "parallel.expert_parallel",
    "ParallelMesh": "parallel.mesh",
    "all_reduce_mean": "parallel.mesh",
    "all_reduce_sum": "parallel.mesh",
    "barrier": "parallel.mesh",
    "build_mesh": "parallel.mesh",
    "group_ranks": "parallel.mesh",
    "layout": "parallel.mesh",
    "pick_device": "parallel.mesh",
    "parallelize": "parallel.apply",
    "parallelize_pipeline": "parallel.apply",
    "apply_activation_checkpointing": "parallel.recompute",
    "checkpointed_modules": "parallel.recompute",
    "compile_blocks": "parallel.compile",
    "EP_OVERLAPS": "parallel.config",
    "ParallelConfig": "parallel.config",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parallel' has no attribute {name!r}")
