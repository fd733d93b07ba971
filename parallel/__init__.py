"""Everything that knows about process groups. Applied to plain-torch models from outside.

Order of application (fixed, as in torchtitan): expert parallelism (swap the MoE dispatcher),
pipeline split, then data-parallel wrapping. This version applies data parallelism; the
config validation refuses ep > 1 and pp > 1 until those land.
"""
from __future__ import annotations

import torch.nn as nn

from parallel.data_parallel import sync_context, unwrap, wrap_data_parallel
from parallel.mesh import ParallelMesh, all_reduce_mean, barrier, build_mesh, layout, pick_device


def parallelize(model: nn.Module, mesh: ParallelMesh) -> nn.Module:
    """Apply the mesh's parallelism to a model already on its device; returns the wrapper."""
    return wrap_data_parallel(model, mesh)


__all__ = ["ParallelMesh", "all_reduce_mean", "barrier", "build_mesh", "layout", "parallelize",
           "pick_device", "sync_context", "unwrap"]
