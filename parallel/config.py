"""The parallel section of a recipe and the values derived from it: the resolved dp size, pipeline
stages per rank and microbatches, which stages a pipeline rank holds, and the rules that tie the
layout to the model and the world size. No torch: the launcher's plan and the trainer share it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from models.config import ConfigSection, ModelConfig, MoEConfig, bounded, require

# How the expert-parallel all-to-alls overlap computation (same numerics for all), see
# parallel/expert_parallel.py; combinable = async + chunked + shared_expert.
EpOverlap = Literal["none", "async", "chunked", "shared_expert", "combinable"]
# Pipeline schedules of torch.distributed.pipelining (parallel/pipeline.py).
PpSchedule = Literal["gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev"]
# Data parallelism: DDP replicates every parameter, FSDP2 shards them (parallel/fsdp.py).
DataParallel = Literal["ddp", "fsdp"]
Dtype = Literal["fp32", "bf16"]
# What activation checkpointing recomputes in backward (parallel/recompute.py): nothing, every k-th
# whole block, or the routed experts of every MoE layer.
ActivationCheckpoint = Literal["none", "block", "moe_ffn"]
EP_OVERLAPS, PP_SCHEDULES = get_args(EpOverlap), get_args(PpSchedule)
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")  # one stage per rank
V_SCHEDULES = ("zbv", "dualpipev")  # two stages per rank in a V: rank r holds r and 2·pp-1-r


# FSDP2's CPU offload moves shards off an accelerator; refused where the run computes on the CPU.
CPU_OFFLOAD_ON_CPU = ("parallel.fsdp_cpu_offload: moves FSDP's shards from a GPU to CPU memory; this run computes "
                      "on the CPU, where they are already (drop it)")

@dataclass
class ParallelConfig(ConfigSection):
    dp: int = -1  # -1: world_size // pp
    ep: int = bounded(1, gt=0)  # expert-parallel size, folded into dp
    pp: int = bounded(1, gt=0)
    timeout_s: float = bounded(600.0, gt=0)  # collective timeout
    ep_overlap: EpOverlap = "none"
    ep_chunks: int = bounded(2, ge=1)  # token chunks pipelined by chunked / combinable
    # Pipeline parallelism (pp > 1), run by torch.distributed.pipelining:
    pp_schedule: PpSchedule = "1f1b"
    pp_microbatches: int = bounded(0, ge=0)  # pipeline microbatches per micro step (0: the number of stages)
    pp_stages_per_rank: int = bounded(0, ge=0)  # virtual stages per rank (0: 1 for gpipe/1f1b, else 2)
    pp_layers: list[int] = field(default_factory=list)  # layers per stage; empty: balanced by FLOPs
    # Data parallelism over the dp group: ddp (every rank holds every parameter) or fsdp (FSDP2:
    # parameters, gradients and optimizer state sharded, each block gathered for its compute).
    data_parallel: DataParallel = "ddp"
    # fsdp: ranks each parameter is sharded over; -1: the whole dp group (full sharding); fewer:
    # hybrid sharding (HSDP), shards in groups of dp_shard ranks, replicated over dp / dp_shard.
    dp_shard: int = -1
    fsdp_param_dtype: Dtype = "fp32"  # fsdp: dtype of the gathered parameters in forward/backward
    fsdp_reduce_dtype: Dtype = "fp32"  # fsdp: dtype in which gradients are reduced
    fsdp_cpu_offload: bool = False  # fsdp: sharded parameters, gradients and optimizer state in CPU memory
    fsdp_reshard_after_forward: bool = True  # fsdp: free gathered parameters after forward (gather again in backward)
    activation_checkpoint: ActivationCheckpoint = "none"
    activation_checkpoint_every: int = bounded(1, ge=1)  # block mode: layers 0, k, 2k, ... are recomputed
    # torch.compile of every block (after activation checkpointing, before FSDP: torchtitan's order)
    # and of the LM loss; measured 1.65x on one H200 (docs/gpu.md). aot_eager traces without
    # generating kernels (debugging a compile failure; the CPU tests).
    compile: bool = False
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"


def resolved_dp(par: ParallelConfig, world_size: int) -> int:
    """The data-parallel size: explicit, or what the world leaves after pipeline stages."""
    return par.dp if par.dp > 0 else world_size // par.pp


def resolved_dp_shard(par: ParallelConfig, world_size: int) -> int:
    """FSDP's shard group size (the whole dp group when dp_shard is -1); 1 without FSDP."""
    if par.data_parallel != "fsdp":
        return 1
    dp = resolved_dp(par, world_size)
    return dp if par.dp_shard <= 0 else par.dp_shard


def pp_stages_per_rank(par: ParallelConfig) -> int:
    """Stages each pipeline rank holds: explicit, or what the schedule needs."""
    if par.pp_stages_per_rank > 0:
        return par.pp_stages_per_rank
    return 1 if par.pp_schedule in SINGLE_STAGE_SCHEDULES else 2


def num_pp_stages(par: ParallelConfig) -> int:
    return par.pp * pp_stages_per_rank(par)


def pp_microbatches(par: ParallelConfig) -> int:
    """Pipeline microbatches per micro step: explicit, or one per stage."""
    return par.pp_microbatches if par.pp_microbatches > 0 else num_pp_stages(par)


def rank_stage_ids(pp_rank: int, par: ParallelConfig) -> list[int]:
    """Stages held by pipeline rank `pp_rank`, ascending: one (gpipe, 1f1b), a loop r, r+pp, ...
    (interleaved_1f1b), or a V r and 2·pp-1-r (zbv, dualpipev)."""
    if par.pp_schedule in V_SCHEDULES:
        return sorted({pp_rank, 2 * par.pp - 1 - pp_rank})
    return [pp_rank + k * par.pp for k in range(pp_stages_per_rank(par))]


def stage_owners(par: ParallelConfig) -> list[int]:
    """The pp rank holding each stage, by stage id."""
    owner = {s: r for r in range(par.pp) for s in rank_stage_ids(r, par)}
    return [owner[s] for s in range(num_pp_stages(par))]


def checkpointed_layers(par: ParallelConfig, num_layers: int) -> list[int]:
    """The layers whose whole block activation checkpointing recomputes: every
    activation_checkpoint_every-th from layer 0 in block mode, none otherwise."""
    if par.activation_checkpoint != "block":
        return []
    return list(range(0, num_layers, par.activation_checkpoint_every))


def check_parallel(par: ParallelConfig, model: ModelConfig, moe: MoEConfig, micro_batch_size: int,
                   world_size: int | None = None) -> None:
    """The layout against the model (experts per ep rank, layers per stage) and, when given, the
    world size."""
    if moe.num_experts > 0:
        require(moe.num_experts % par.ep == 0,
                f"moe.num_experts={moe.num_experts} is not divisible by parallel.ep={par.ep}")
    counts = moe.layer_num_experts
    require(all(E % par.ep == 0 for E in counts),
            f"moe.layer_num_experts={counts}: every count must be divisible by parallel.ep={par.ep}")
    require(par.ep == 1 or moe.num_experts > 0,
            f"parallel.ep={par.ep}: expert parallelism needs an MoE model (moe.num_experts > 0)")
    require(par.activation_checkpoint != "moe_ffn" or moe.num_experts > 0,
            "parallel.activation_checkpoint=moe_ffn: the model has no MoE layer (moe.num_experts=0); use block")
    if par.pp > 1:
        _check_pipeline(par, model, micro_batch_size)
    if world_size is not None:
        require(world_size >= 1, f"world size must be >= 1, got {world_size}")
        require(world_size % par.pp == 0, f"world size {world_size} is not divisible by parallel.pp={par.pp}")
        dp = resolved_dp(par, world_size)
        require(dp * par.pp == world_size,
                f"parallel layout pp={par.pp} x dp={dp} = {dp * par.pp} ranks does not match world size {world_size}")
        require(dp % par.ep == 0, f"parallel.ep={par.ep} does not divide the data-parallel size {dp}")
        if par.data_parallel == "fsdp":
            shard = resolved_dp_shard(par, world_size)
            require(shard >= 1 and dp % shard == 0,
                    f"parallel.dp_shard={par.dp_shard} does not divide the data-parallel size {dp}")
            # Expert-parallel groups sit inside a shard group: its ranks hold every expert once.
            require(shard % par.ep == 0, f"parallel.ep={par.ep} does not divide parallel.dp_shard={shard} "
                                         f"(the expert-parallel groups must fit in a shard group)")
    require(par.dp_shard == -1 or par.dp_shard >= 1, f"parallel.dp_shard: -1 (all of dp) or >= 1, got {par.dp_shard}")
    require(par.data_parallel == "fsdp" or par.dp_shard == -1,
            f"parallel.dp_shard={par.dp_shard}: shards parameters under parallel.data_parallel=fsdp, not ddp")
    require(not (par.compile and par.pp > 1), "parallel.compile: not with pipeline parallelism yet (pp > 1): its "
            "stages are built from shape inference on meta tensors, which compiled blocks have not been checked with")
    require(par.data_parallel == "fsdp" or not par.fsdp_cpu_offload,
            "parallel.fsdp_cpu_offload: needs parallel.data_parallel=fsdp")


def _check_pipeline(par: ParallelConfig, m: ModelConfig, micro_batch_size: int) -> None:
    """The parallel.pp_* fields, checked only when parallel.pp > 1."""
    v, stages = pp_stages_per_rank(par), num_pp_stages(par)
    if par.pp_schedule in SINGLE_STAGE_SCHEDULES:
        require(v == 1, f"parallel.pp_stages_per_rank={v}: pp_schedule={par.pp_schedule} runs one stage per rank")
    elif par.pp_schedule in V_SCHEDULES:
        require(v == 2, f"parallel.pp_stages_per_rank={v}: pp_schedule={par.pp_schedule} runs exactly 2 stages "
                        f"per rank (a V)")
    else:
        require(v >= 2, f"parallel.pp_stages_per_rank={v}: pp_schedule=interleaved_1f1b needs >= 2 stages per rank")
    require(stages <= m.num_layers,
            f"parallel.pp={par.pp} x pp_stages_per_rank={v} = {stages} stages for model.num_layers={m.num_layers}: "
            f"every stage needs a layer")
    if par.pp_layers:
        require(len(par.pp_layers) == stages,
                f"parallel.pp_layers has {len(par.pp_layers)} entries for {stages} pipeline stages")
        require(all(n >= 1 for n in par.pp_layers), f"parallel.pp_layers={par.pp_layers}: every stage needs >= 1 layer")
        require(sum(par.pp_layers) == m.num_layers,
                f"parallel.pp_layers={par.pp_layers} sums to {sum(par.pp_layers)}, model.num_layers={m.num_layers}")
    mb = pp_microbatches(par)
    require(micro_batch_size % mb == 0,
            f"parallel.pp_microbatches={mb} does not divide train.micro_batch_size={micro_batch_size}")
    require(mb >= par.pp, f"parallel.pp_microbatches={mb} must be >= parallel.pp={par.pp} to fill the pipeline")
    if par.pp_schedule == "dualpipev":
        require(mb >= stages, f"parallel.pp_microbatches={mb}: dualpipev needs >= {stages} (2 x pp)")
    # torch's composable checkpoint recomputes a region once per backward pass and cannot run its
    # recompute a second time; the zero-bubble schedules run two (input, then weight gradients).
    require(par.activation_checkpoint == "none" or par.pp_schedule not in V_SCHEDULES,
            f"parallel.activation_checkpoint={par.activation_checkpoint}: not with pp_schedule={par.pp_schedule} "
            f"(its split backward would recompute twice); use gpipe, 1f1b or interleaved_1f1b")
    require(not m.tie_embeddings,
            "model.tie_embeddings: pipeline stages need untied embeddings (the first and last stage would share a weight)")
