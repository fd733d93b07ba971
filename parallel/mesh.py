"""Process groups of a run: pipeline x data parallel, with expert parallelism folded into dp.

Rank layout (pp outermost, as Megatron-Core and torchtitan do): rank = pp_rank * dp + dp_rank.
Expert parallelism (a later issue) splits each dp group into ep-sized expert groups; the mesh
records ep now so the layout printed by --dry-run is the one training will use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.config import ParallelConfig, resolved_dp


@dataclass
class ParallelMesh:
    world_size: int
    rank: int
    pp: int
    dp: int
    ep: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    dp_group: dist.ProcessGroup | None  # None when dp == 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str) -> torch.device:
    """`auto` means CUDA when present (one device per local rank), else CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def layout(rank: int, world_size: int, par: ParallelConfig) -> dict:
    """Coordinates of one rank; pure, so the launcher's plan and the trainer agree."""
    dp = resolved_dp(par, world_size)
    return {"pp_rank": rank // dp, "dp_rank": rank % dp, "ep_rank": (rank % dp) % par.ep}


def build_mesh(par: ParallelConfig, device: torch.device) -> ParallelMesh:
    """Join the job's process group (torchrun env vars) and build the dp groups.

    Runs with a single process too (no env vars): then no group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=par.timeout_s))
    dp = resolved_dp(par, world_size)
    coords = layout(rank, world_size, par)
    dp_group = None
    if dp > 1:
        # Every rank must create every group, in the same order.
        for stage in range(par.pp):
            ranks = list(range(stage * dp, (stage + 1) * dp))
            group = dist.new_group(ranks) if par.pp > 1 else dist.group.WORLD
            if coords["pp_rank"] == stage:
                dp_group = group
    return ParallelMesh(world_size, rank, par.pp, dp, par.ep, coords["pp_rank"], coords["dp_rank"],
                        device, dp_group)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Mean over the group (a no-op without one); used for logged losses and eval."""
    if group is None:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values / dist.get_world_size(group)
