"""Apply the mesh's parallelism to a plain-torch model, in a fixed order (as torchtitan): expert
parallelism (shard the routed experts, swap in the all-to-all dispatcher), activation
checkpointing (parallel/recompute.py), pipeline split, then data parallelism: FSDP2
(parallel/fsdp.py) or DDP. With pp > 1 the stages are not wrapped in DDP:
`sync_replicated_grads` reduces their gradients once per step."""
from __future__ import annotations

import torch.nn as nn

from parallel.config import ParallelConfig
from parallel.data_parallel import wrap_data_parallel
from parallel.expert_parallel import apply_expert_parallel
from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelMesh
from parallel.compile import compile_blocks
from parallel.recompute import apply_activation_checkpointing, checkpointed_modules


def parallelize(model: nn.Module, mesh: ParallelMesh, par: ParallelConfig) -> nn.Module:
    """Apply the mesh's parallelism to a model (pp 1); returns the module to run.

    Args:
        model: plain torch model, on the meta device or materialised and initialised identically
            on every rank. With ep > 1 its experts are replaced by this rank's shard (new
            parameters): build the optimizer afterwards, on `unwrap(result)`.
        mesh: from `build_mesh`, with pp == 1.
        par: the parallel section (ep_overlap, ep_chunks, data_parallel, fsdp_*).
    Order: expert parallelism, activation checkpointing, torch.compile of every block
    (par.compile), then FSDP (on meta too:
    parallel/materialize.py allocates the shards) or DDP (only for a materialised model: DDP
    needs real tensors; a meta model is wrapped later with `wrap_data_parallel`).
    """
    if mesh.pp > 1:
        raise ValueError("parallelize: use parallelize_pipeline for pipeline parallelism (pp > 1)")
    if mesh.ep > 1:
        apply_expert_parallel(model, mesh, par.ep_overlap, par.ep_chunks)
    apply_activation_checkpointing(model, par)
    if par.compile:  # after checkpointing, before FSDP (torchtitan's order): see parallel/compile.py
        compile_blocks(model, checkpointed_modules(model, par), par.compile_backend)
    if mesh.fsdp:
        apply_fsdp(model, [model], mesh, par)
        return model
    if any(p.is_meta for p in model.parameters()):
        return model
    return wrap_data_parallel(model, mesh)


def parallelize_pipeline(model: nn.Module, mesh: ParallelMesh, par: ParallelConfig, loss_fn, **batch):
    """Expert parallelism (if ep > 1), then this rank's pipeline stages, each FSDP-sharded under
    parallel.data_parallel fsdp; returns a `parallel.pipeline.Pipeline` whose `module` holds this
    rank's parameters (build the optimizer on it). `loss_fn(last stage output, targets)` is the
    unscaled mean loss of a microbatch; `batch`: micro_batch_size, grad_accum_steps, seq_len (see
    `build_pipeline`). Works on the meta device too."""
    from parallel.pipeline import build_pipeline

    if mesh.ep > 1:
        apply_expert_parallel(model, mesh, par.ep_overlap, par.ep_chunks)
    apply_activation_checkpointing(model, par)
    pipeline = build_pipeline(model, mesh, par, loss_fn, **batch)
    if mesh.fsdp:
        apply_fsdp(model, pipeline.stage_modules, mesh, par)
    return pipeline
