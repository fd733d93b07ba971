"""Process groups of a run: pipeline x data parallel, with expert parallelism folded into dp.

Rank layout (pp outermost, as Megatron-Core and torchtitan do):
    rank    = pp_rank * dp + dp_rank
    dp_rank = edp_rank * ep + ep_rank        (ep groups are contiguous runs of dp ranks)
Groups, per pipeline stage:
    dp   all dp ranks of the stage: reduces non-expert gradients (DDP)
    ep   ep consecutive dp ranks (same edp_rank): exchange tokens by all-to-all; together they
         hold every expert once, ep_rank r holding experts [r·E/ep, (r+1)·E/ep)
    edp  the dp/ep ranks with the same ep_rank (expert data parallel): hold the same experts,
         reduce their gradients
Across stages:
    pp   the pp ranks with the same dp_rank, one per stage: pass activations and gradients
         between stages (torch.distributed.pipelining), sum the squared gradient norm
Contiguous ep groups keep an expert-parallel group on one node when ep divides the processes per
node, so the all-to-all, the heaviest traffic, stays on the fastest links.

FSDP (parallel.data_parallel fsdp) adds DeviceMeshes over the same layout, the world seen as
    (pp, dp_replicate, efsdp, ep),  dp = dp_replicate x dp_shard,  dp_shard = efsdp x ep
(row-major, so dp_rank = (replicate·efsdp + efsdp_rank)·ep + ep_rank as above):
    fsdp_mesh          (dp_shard) or (dp_replicate, dp_shard): non-expert parameters are sharded
                       over dp_shard consecutive dp ranks (their node, when it holds them) and,
                       under HSDP, replicated over dp_replicate such groups
    expert_fsdp_mesh   (efsdp) or (dp_replicate, efsdp): routed experts, already split over ep,
                       are sharded over the ranks holding the same experts in a shard group
    expert_ckpt_mesh   expert_fsdp_mesh's dims and ep: where each piece of an expert tensor lies in
                       the unsharded [E, ...] tensor, for checkpoints
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from parallel.config import ParallelConfig, resolved_dp, resolved_dp_shard


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
    ep_rank: int = 0
    edp_rank: int = 0  # = dp_rank when ep == 1
    ep_group: dist.ProcessGroup | None = None  # None when ep == 1
    edp_group: dist.ProcessGroup | None = None  # None when dp == ep; the dp group when ep == 1
    pp_group: dist.ProcessGroup | None = None  # None when pp == 1
    dp_shard: int = 1  # FSDP's shard group size; 1 without FSDP
    fsdp_mesh: object = None  # DeviceMesh of the non-expert parameters (FSDP only)
    expert_fsdp_mesh: object = None  # DeviceMesh of the expert parameters (FSDP, ep > 1, replicas exist)
    expert_ckpt_mesh: object = None  # expert_fsdp_mesh's dims + ep (FSDP, ep > 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.fsdp_mesh is not None

    @property
    def shard_group(self) -> dist.ProcessGroup | None:
        """The group a non-expert parameter's FSDP shards span (None without FSDP)."""
        return self.fsdp_mesh.get_group("dp_shard") if self.fsdp else None

    @property
    def efsdp_group(self) -> dist.ProcessGroup | None:
        """The group an expert parameter's FSDP shards span (None when experts are not FSDP's)."""
        return self.expert_fsdp_mesh.get_group("efsdp") if self.expert_fsdp_mesh is not None else None

    @property
    def edp(self) -> int:
        """Size of the expert-data-parallel group (ranks holding the same experts)."""
        return self.dp // self.ep


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
    """Coordinates of one rank (pp_rank, dp_rank, ep_rank, edp_rank); pure, so the launcher's
    plan and the trainer agree."""
    dp = resolved_dp(par, world_size)
    dp_rank = rank % dp
    return {"pp_rank": rank // dp, "dp_rank": dp_rank, "ep_rank": dp_rank % par.ep,
            "edp_rank": dp_rank // par.ep}


def group_ranks(world_size: int, par: ParallelConfig) -> dict[str, list[list[int]]]:
    """Members of every dp, ep, edp and pp group, in the order `build_mesh` creates them; pure.

    Each kind partitions the world: every rank is in exactly one group of each kind.
    """
    dp, ep = resolved_dp(par, world_size), par.ep
    edp = dp // ep
    stages = [stage * dp for stage in range(par.pp)]
    return {
        "dp": [[base + i for i in range(dp)] for base in stages],
        "ep": [[base + k * ep + j for j in range(ep)] for base in stages for k in range(edp)],
        "edp": [[base + k * ep + j for k in range(edp)] for base in stages for j in range(ep)],
        "pp": [[stage + d for stage in stages] for d in range(dp)],
    }


def build_mesh(par: ParallelConfig, device: torch.device) -> ParallelMesh:
    """Join the job's process group (torchrun env vars) and build the dp, ep and edp groups.

    Runs with a single process too (no env vars): then no group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=par.timeout_s))
    dp = resolved_dp(par, world_size)
    if dp * par.pp != world_size or dp % par.ep:
        raise ValueError(f"parallel layout pp={par.pp} x dp={dp} (ep={par.ep}) does not fit world size "
                         f"{world_size}")
    coords = layout(rank, world_size, par)
    members = group_ranks(world_size, par)
    # Every rank must create every group, in the same order (new_group is collective).
    dp_group = _own_group(members["dp"], rank, reuse_world=par.pp == 1) if dp > 1 else None
    ep_group = edp_group = None
    if par.ep > 1:
        # Always a group of its own, even when it spans the world: the all-to-alls then never
        # share a gloo/nccl tag sequence with DDP's all-reduces running in the same backward.
        ep_group = _own_group(members["ep"], rank)
        edp_group = _own_group(members["edp"], rank) if dp > par.ep else None
    else:
        edp_group = dp_group  # without expert parallelism the experts are plain data parallel
    pp_group = _own_group(members["pp"], rank) if par.pp > 1 else None
    mesh = ParallelMesh(world_size, rank, par.pp, dp, par.ep, coords["pp_rank"], coords["dp_rank"],
                        device, dp_group, coords["ep_rank"], coords["edp_rank"], ep_group, edp_group,
                        pp_group)
    if par.data_parallel == "fsdp":
        _add_fsdp_meshes(mesh, par, device)
    return mesh


def _add_fsdp_meshes(mesh: ParallelMesh, par: ParallelConfig, device: torch.device) -> None:
    """The DeviceMeshes of FSDP (see the module docstring); every rank builds all of them."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = resolved_dp_shard(par, mesh.world_size)
    replicate, efsdp = mesh.dp // shard, shard // par.ep
    world = init_device_mesh(device.type, (par.pp, replicate, efsdp, par.ep),
                             mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
    world["efsdp", "ep"]._flatten("dp_shard")
    mesh.dp_shard = shard
    mesh.fsdp_mesh = world["dp_replicate", "dp_shard"] if replicate > 1 else world["dp_shard"]
    if par.ep > 1:
        expert_dims = ("dp_replicate", "efsdp") if replicate > 1 else ("efsdp",)
        # Experts held by one rank only (no replicas: dp == ep) stay plain tensors outside FSDP.
        if replicate * efsdp > 1:
            mesh.expert_fsdp_mesh = world[expert_dims]
            mesh.expert_ckpt_mesh = world[(*expert_dims, "ep")]


def _own_group(groups: list[list[int]], rank: int, reuse_world: bool = False) -> dist.ProcessGroup:
    """Create every group of one kind (all ranks, same order); return the one holding `rank`."""
    if reuse_world:
        return dist.group.WORLD
    own = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            own = group
    return own


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over the group into a copy (a no-op without one); used for routed-token loads."""
    if group is None:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def all_reduce_mean(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Mean over the group (a no-op without one); used for logged losses and eval."""
    if group is None:
        return values
    return all_reduce_sum(values, group) / dist.get_world_size(group)
