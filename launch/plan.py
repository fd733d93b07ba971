"""The numbers of a run's plan, computed before any process starts: parameters (on a meta-device
model), memory per rank, the pipeline stages and their ranks, all-to-all volumes. The text that
`sparseforge run --dry-run` prints from them is launch/plan_report.py."""
from __future__ import annotations

from dataclasses import dataclass

from models.config import moe_layer_config, moe_layer_ids
from parallel.config import pp_microbatches, pp_stages_per_rank, stage_owners
from trainer.config import Config


def meta_model(cfg: Config):
    """The model on the meta device: shapes only, no memory allocated."""
    import torch

    import models

    with torch.device("meta"):
        return models.build_model(cfg.model, cfg.moe)


def module_breakdown(module, moe_cfg) -> tuple[int, int, int]:
    """(total, active per token, routed-expert) parameters of a model or of a pipeline stage."""
    import models
    from models.moe import expert_parameters

    total, active = models.param_counts(module, moe_cfg)
    return total, active, sum(p.numel() for _, p in expert_parameters(module))


def param_counts(cfg: Config) -> tuple[int, int]:
    """(total, active per token), counted on a meta-device model: no memory is allocated."""
    return param_breakdown(cfg)[:2]


def param_breakdown(cfg: Config) -> tuple[int, int, int]:
    """(total, active per token, routed-expert) parameters, on a meta-device model."""
    return module_breakdown(meta_model(cfg), cfg.moe)


def activation_bytes(cfg: Config, layer_ids: list[int] | None = None, head: bool = True,
                     sequences: int | None = None) -> int:
    """Activations kept for backward by `sequences` sequences (default train.micro_batch_size)
    through the layers `layer_ids` (default all) and, when `head`, the LM head; without
    recomputation (an estimate).

    Per layer and token: attention keeps its normed input, q/k/v, the SDPA output and the
    residual; a dense FFN its input and three F-wide tensors (w1, w3, their SwiGLU product); an MoE
    FFN the router logits plus, for each of its top_k copies, the permuted input and three
    F-wide tensors. The LM head keeps fp32 logits and their gradient.
    """
    m, moe, tr = cfg.model, cfg.moe, cfg.train
    layer_ids = range(m.num_layers) if layer_ids is None else layer_ids
    tokens = (tr.micro_batch_size if sequences is None else sequences) * tokens_per_sample(cfg)
    head_dim = m.head_dim or m.d_model // m.num_heads
    attention = 3 * m.d_model + (m.num_heads + 2 * m.num_kv_heads) * head_dim + m.num_heads * head_dim
    dense_ffn = m.d_model + 3 * m.ffn_dim
    shared = moe.num_shared_experts * 3 * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    moe_ffn = m.d_model + moe.num_experts + moe.top_k * (m.d_model + 3 * moe.expert_ffn_dim) + shared
    moe_ids = set(moe_layer_ids(cfg.model, cfg.moe))
    per_token = sum(attention + (moe_ffn if i in moe_ids else dense_ffn) for i in layer_ids)
    elem = 2 if tr.dtype == "bf16" else 4
    # A DiT's head outputs patch_size² x channels (x 2 with learned sigma) per token, not logits.
    out_width = m.patch_size ** 2 * m.in_channels * (2 if m.learn_sigma else 1) if m.family == "dit" else m.vocab_size
    logits = tokens * out_width * 4 * 2 if head else 0
    return tokens * per_token * elem + logits


def activation_bytes_per_rank(cfg: Config) -> int:
    """Activations of one micro batch through the whole model (no pipeline parallelism)."""
    return activation_bytes(cfg)


def _state_bytes(total_params: int, expert_params: int, ep: int) -> dict[str, int]:
    """fp32 weights, their gradients and AdamW's two fp32 moments; expert parallelism keeps 1/ep
    of the routed experts (`expert_params` of `total_params`) on each rank."""
    params = (total_params - expert_params + expert_params // ep) * 4
    return {"params": params, "grads": params, "optimizer": 2 * params}


def _zero_state_bytes(cfg: Config, total_params: int, expert_params: int, dp: int) -> dict[str, int]:
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
            "optimizer": 8 * (zero // dp + ours)}


def memory_per_rank(cfg: Config, total_params: int, expert_params: int = 0, dp: int = 1) -> dict[str, int]:
    """fp32 weights and gradients, AdamW's two fp32 moments, and activations (bytes), for pp == 1.

    Data parallelism replicates everything (DDP); expert parallelism keeps 1/ep of the routed
    experts on each rank; the DeepSpeed engine partitions over `dp` what ZeRO holds. With pp > 1
    see `pipeline_memory_per_rank`.
    """
    state = (_zero_state_bytes(cfg, total_params, expert_params, dp) if cfg.train.engine == "deepspeed"
             else _state_bytes(total_params, expert_params, cfg.parallel.ep))
    return {**state, "activations": activation_bytes_per_rank(cfg)}


@dataclass
class StagePlan:
    index: int
    pp_rank: int  # the pipeline rank holding this stage
    layer_ids: list[int]
    first: bool  # holds the token embedding
    last: bool  # holds the final norm and the output head
    total: int  # parameters
    active: int  # parameters active per token
    routed: int  # routed-expert parameters (divided by ep on each rank)


@dataclass
class PipelinePlan:
    schedule: str
    pp: int
    stages_per_rank: int
    microbatches: int  # per micro step
    microbatch_size: int  # sequences per microbatch
    stages: list[StagePlan]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def rank_stages(self, pp_rank: int) -> list[StagePlan]:
        return [s for s in self.stages if s.pp_rank == pp_rank]


def pipeline_plan(cfg: Config, model=None) -> PipelinePlan:
    """The stages of a pp > 1 run, split and assigned exactly as `parallel.pipeline` does.

    `model`: a (meta-device) model to count parameters on; built when None.
    """
    from parallel.pipeline import stage_layer_counts, stage_layer_ids

    par = cfg.parallel
    model = meta_model(cfg) if model is None else model
    v, m = pp_stages_per_rank(par), pp_microbatches(par)
    layer_ids = stage_layer_ids(stage_layer_counts(par, model, cfg.moe))
    owner = stage_owners(par)
    last = len(layer_ids) - 1
    stages = []
    for s, ids in enumerate(layer_ids):
        # The trainer's own stage module: it decides which of embedding / norm / head a stage has.
        total, active, routed = module_breakdown(model.pipeline_stage(ids, first=s == 0, last=s == last), cfg.moe)
        stages.append(StagePlan(s, owner[s], ids, s == 0, s == last, total, active, routed))
    return PipelinePlan(par.pp_schedule, par.pp, v, m, cfg.train.micro_batch_size // m, stages)


def microbatches_in_flight(plan: PipelinePlan, pp_rank: int) -> int:
    """Microbatches whose activations one stage of `pp_rank` holds at its peak.

    gpipe runs every forward before any backward: all m. 1f1b's warm-up on rank i runs pp - i
    forwards before the first backward, after which each backward frees one. For
    interleaved_1f1b, zbv and dualpipev the count differs per stage chunk and per rank with the
    schedule's warm-up; min(m, number of stages) per chunk is a conservative estimate.
    """
    m = plan.microbatches
    if plan.schedule == "gpipe":
        return m
    if plan.schedule == "1f1b":
        return min(m, plan.pp - pp_rank)
    return min(m, plan.num_stages)


def pipeline_memory_per_rank(cfg: Config, plan: PipelinePlan, pp_rank: int) -> dict[str, int]:
    """Bytes on each rank of pipeline rank `pp_rank` (its dp ranks are alike): weights, gradients
    and AdamW moments of its stages only, and the activations of its stages' layers for the
    microbatches in flight."""
    held = plan.rank_stages(pp_rank)
    total = sum(s.total for s in held)
    routed = sum(s.routed for s in held)
    in_flight = microbatches_in_flight(plan, pp_rank)
    activations = sum(activation_bytes(cfg, s.layer_ids, head=s.last, sequences=plan.microbatch_size)
                      for s in held) * in_flight
    return {**_state_bytes(total, routed, cfg.parallel.ep), "activations": activations}


def tokens_per_sample(cfg: Config) -> int:
    """Tokens one training sample puts through the layers: data.seq_len for an LLM, the
    (image_size / patch_size)² patches of an image for a DiT."""
    m = cfg.model
    return (m.image_size // m.patch_size) ** 2 if m.family == "dit" else cfg.data.seq_len


def a2a_rows(cfg: Config, layer_id: int, tokens: int) -> int:
    """Rows one rank puts into the dispatch all-to-all of MoE layer `layer_id` for `tokens` of its
    tokens (rows for its own experts included), as `parallel.expert_parallel` builds them: one per
    (token, expert) assignment, T·top_k when dropless; with a capacity factor at most E·C kept
    (exactly E·C when padded to capacity, moe.pad_to_capacity); expert choice E·C."""
    from models.moe.capacity import expert_capacity

    moe = moe_layer_config(layer_id, cfg.moe)
    E, K = moe.num_experts, moe.top_k
    if moe.routing == "expert_choice":  # the layer uses top_k as the capacity factor when it is 0
        return E * expert_capacity(tokens, E, moe.capacity_factor or K, max_rows=tokens)
    rows = tokens * K
    if moe.capacity_factor > 0:
        capacity_rows = E * expert_capacity(rows, E, moe.capacity_factor, max_rows=tokens)
        return capacity_rows if moe.pad_to_capacity else min(rows, capacity_rows)
    return rows


def a2a_bytes(cfg: Config, layer_ids, tokens: int) -> dict[str, int]:
    """Bytes one rank sends through the expert-parallel all-to-alls of the MoE layers among
    `layer_ids` for one (micro)batch of `tokens` tokens, forward and backward; under uniform
    routing it receives as much.

    Per MoE layer: R rows (`a2a_rows`, T·top_k dropless) of d_model values; a row stays on this
    rank when its expert does (1/ep of them under uniform routing), so (ep-1)/ep of them cross.
        dispatch  R·D·b_in·(ep-1)/ep forward (the tokens) + the same backward (their gradients)
        combine   R·D·b_out·(ep-1)/ep forward (expert outputs) + the same backward
    b_in = 4: the dispatched rows are the MoE input, which stays fp32 (the weights are fp32 and
    bf16 autocast leaves norms and residual adds in fp32); b_out = 2 with train.dtype bf16 (the
    experts' matmul output), else 4. The count exchange (E integers) is left out.
    """
    ep, D = cfg.parallel.ep, cfg.model.d_model
    b_in, b_out = 4, (2 if cfg.train.dtype == "bf16" else 4)
    moe_ids = set(moe_layer_ids(cfg.model, cfg.moe))
    rows = sum(a2a_rows(cfg, i, tokens) for i in layer_ids if i in moe_ids)
    dispatch = 2 * rows * D * b_in * (ep - 1) // ep
    combine = 2 * rows * D * b_out * (ep - 1) // ep
    return {"dispatch": dispatch, "combine": combine, "total": dispatch + combine}
