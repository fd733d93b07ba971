"""The plan's weights, gradients and optimizer state per rank (bytes) under each engine: DDP,
FSDP (shards and the working set a step gathers) and DeepSpeed ZeRO. launch/plan.py adds the
activations and splits by pipeline rank."""
from __future__ import annotations

from trainer.config import Config


def fsdp_units(module, ep: int) -> tuple[int, int, int]:
    """(parameters outside the blocks, the largest block's parameters as FSDP gathers them on one
    rank: its routed experts divided by ep, the largest block's without its routed experts) of a
    model or pipeline stage (`layers` its blocks)."""
    from models.moe import is_expert_param

    in_blocks = {id(p) for block in module.layers.values() for p in block.parameters()}
    root = sum(p.numel() for p in module.parameters() if id(p) not in in_blocks)
    blocks = [[(p.numel(), is_expert_param(n)) for n, p in block.named_parameters()]
              for block in module.layers.values()]
    largest = max((sum(n // ep if expert else n for n, expert in b) for b in blocks), default=0)
    largest_dense = max((sum(n for n, expert in b if not expert) for b in blocks), default=0)
    return root, largest, largest_dense


def _ema_copies(cfg: Config) -> int:
    """A DiT keeps an EMA of the weights this rank holds (trainer/ema.py), counted with the
    optimizer state: one more copy of them in their dtype. An LLM keeps none."""
    return 1 if cfg.model.family == "dit" else 0


def state_bytes(cfg: Config, total_params: int, expert_params: int, dp: int, root: int = 0,
                largest_block: int = 0, largest_dense_block: int = 0, pipelined: bool = False) -> dict[str, int]:
    """Weights, gradients and AdamW's two moments (and a DiT's EMA) on one rank (bytes), fp32, for
    `total_params` of which `expert_params` are routed experts (a model, or a pipeline rank's stages).

    DDP: every rank holds all but the routed experts, of which expert parallelism keeps 1/ep.
    FSDP (parallel.data_parallel fsdp, parallel/fsdp.py): each rank keeps a 1/dp_shard shard of
    the others and of its experts 1/(dp_shard/ep); routed experts no other rank holds (ep =
    dp_shard, no replicas) stay outside FSDP, whole. On top, "gathered", the working set of a step
    in fsdp_param_dtype (weights) and fsdp_reduce_dtype (unsharded gradients):
        without a pipeline   the root's parameters (`root`: embedding, head) gathered for the whole
                             step, two blocks at a time (the one running and the one prefetched;
                             `largest_block`, or `largest_dense_block` when the experts stay
                             outside), and the unsharded gradients of the root (reduced at the end
                             of backward) and of one block
        pipelined            all that FSDP manages on the rank: torch's pipeline schedules keep
                             every stage gathered and accumulate its unsharded gradients over the
                             microbatches, reducing them once after the last
    With fsdp_cpu_offload the shards, their gradients and moments live in CPU memory: only the
    working set is on the device.
    """
    par, ep = cfg.parallel, cfg.parallel.ep
    routed_here = expert_params // ep if ep > 1 else expert_params
    if par.data_parallel != "fsdp":
        params = (total_params - expert_params + routed_here) * 4
        return {"params": params, "grads": params, "optimizer": (2 + _ema_copies(cfg)) * params}
    shard = dp if par.dp_shard <= 0 else par.dp_shard
    expert_shard = shard if ep == 1 else max(1, shard // ep)  # 1: no other rank holds these experts
    held = (-(-(total_params - expert_params) // shard) + -(-routed_here // expert_shard)) * 4
    width = {"fp32": 4, "bf16": 2}
    experts_in_fsdp = ep == 1 or dp // shard * expert_shard > 1  # as parallel/mesh.py builds the meshes
    if pipelined:
        weights = grads = total_params - expert_params + (routed_here if experts_in_fsdp else 0)
    else:
        block = largest_block if experts_in_fsdp else largest_dense_block
        weights, grads = root + 2 * block, root + block
    gathered = weights * width[par.fsdp_param_dtype] + grads * width[par.fsdp_reduce_dtype]
    on_device = 0 if par.fsdp_cpu_offload else 1
    return {"params": held * on_device, "grads": held * on_device,
            "optimizer": (2 + _ema_copies(cfg)) * held * on_device, "gathered": gathered}


def zero_state_bytes(cfg: Config, total_params: int, expert_params: int, dp: int) -> dict[str, int]:
    """train.engine=deepspeed (trainer/adapt/ds_engine.py): ZeRO holds every parameter when ep == 1, all
    but the routed experts when ep > 1 (those stay fp32 with their own AdamW, 1/ep per rank). Of what
    ZeRO holds each rank keeps the weights (2 bytes in bf16) and an fp32 master partition (1/dp),
    the gradients (whole with stage 1, 1/dp with stage 2) and the AdamW moments of its partition."""
    ep = cfg.parallel.ep
    ours = expert_params // ep if ep > 1 else 0
    zero = total_params - (expert_params if ep > 1 else 0)
    width = 2 if cfg.train.dtype == "bf16" else 4
    grads = zero * width // (dp if cfg.train.zero_stage == 2 else 1)
    return {"params": zero * width + zero * 4 // dp + ours * 4, "grads": grads + ours * 4,
            "optimizer": 8 * (zero // dp + ours) + _ema_copies(cfg) * (zero * width + ours * 4)}
