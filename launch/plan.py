"""The numbers of a run's plan, computed before any process starts: parameters (on a meta-device
model), memory per rank (activations under each activation-checkpointing mode), the pipeline
stages and their ranks, all-to-all volumes, the extra compute of recomputation. The text that
`sparseforge run --dry-run` prints from them is launch/plan_report.py."""
from __future__ import annotations

from dataclasses import dataclass

from launch.plan_state import fsdp_units, state_bytes, zero_state_bytes
from models.config import is_moe_layer, moe_layer_config, moe_layer_ids
from parallel.config import checkpointed_layers, pp_microbatches, pp_stages_per_rank, resolved_dp, stage_owners
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


def _layer_bytes(cfg: Config, layer_id: int) -> tuple[int, int]:
    """Activation bytes per token that layer `layer_id` keeps for backward without recomputation, and
    how many of them are the routed experts' intermediates (0 for a dense layer).

    What autograd saves, counted tensor by tensor (listed with saved-tensor hooks on the CPU, checked
    against an H200's peaks: docs/gpu.md). s = the residual stream's width, c = the matmuls' output
    width (`stream_width`, `compute_width`); under bf16 autocast (c < s) every linear saves its own
    bf16 copy of its input and an RMSNorm whose input and weight differ in dtype runs unfused:
      each RMSNorm          its input and the normed output at s (fused, without autocast: the input)
      attention             the input of q, k and v (one tensor without autocast, three casts with);
                            q/k RMSNorm (model.qk_norm) at fp32; SDPA's q, k, v and output at c
      dense FFN             the input of w1 and w3 (shared without autocast), w1 and w3 outputs and
                            their SwiGLU product at c
      MoE                   the router's fp32 input, for each of top_k copies of a token the permuted
                            input at c, the expert's F-wide intermediates (`intermediates`), its
                            output in the combine's fp32 and the gate-weighted rows; shared experts as
                            a dense FFN
    Intermediates: w1 and w3 outputs (the loop and the grouped-GEMM node recompute the product in
    backward), twice that where the GEMMs are composed under autograd (megablocks; biased experts
    or another activation: w1|w3 fused, silu, the product).
    """
    m = cfg.model
    s, c = stream_width(cfg), compute_width(cfg)
    cast = c < s  # autocast: each consumer saves its own cast copy
    D = m.d_model
    head_dim = m.head_dim or D // m.num_heads
    q, kv = m.num_heads * head_dim, m.num_kv_heads * head_dim
    norms = 2 * (2 * D * s if cast else D * s)
    attention = (3 * D * c if cast else D * s) + (2 * q + 2 * kv) * c
    if m.qk_norm:
        attention += (q + kv) * 4 * (2 if cast else 1)

    def swiglu(width: int) -> int:
        return (2 * D * c if cast else D * s) + 3 * width * c

    if not is_moe_layer(layer_id, cfg.moe):
        return norms + attention + swiglu(m.ffn_dim), 0
    moe = moe_layer_config(layer_id, cfg.moe)
    composed = moe.backend == "megablocks" or moe.expert_bias or moe.expert_act != "swiglu"
    intermediates = moe.top_k * (4 if composed else 2) * moe.expert_ffn_dim * c
    shared_width = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    routed = D * 4 + moe.top_k * D * (c + 2 * 4) + intermediates
    return norms + attention + routed + (swiglu(shared_width) if shared_width else 0), intermediates


def stream_width(cfg: Config) -> int:
    """Bytes per value of the residual stream (block inputs, the dispatched all-to-all rows): fp32,
    as bf16 autocast leaves norms and residual adds in fp32, unless FSDP gathers the weights in
    bf16 (parallel.fsdp_param_dtype), which makes the whole forward bf16."""
    par = cfg.parallel
    return 2 if par.data_parallel == "fsdp" and par.fsdp_param_dtype == "bf16" else 4


def compute_width(cfg: Config) -> int:
    """Bytes per value of what the matmuls output (saved activations, the combined rows): 2 under
    bf16 autocast or bf16 FSDP parameters, else 4."""
    return 2 if cfg.train.dtype == "bf16" else stream_width(cfg)


def replay_bytes(cfg: Config, layer_id: int, tokens: int) -> int:
    """The all-to-all rows that the `ExchangeTape` of a checkpointed block keeps for its recompute
    (parallel/recompute.py), for MoE layer `layer_id` and `tokens` tokens of this rank, ep > 1:
    R rows received by each token exchange (`a2a_rows`, uniform routing), d_model values, the
    residual stream's width for the dispatched rows and the experts' output width for the combined
    ones (as `a2a_bytes`)."""
    if cfg.parallel.ep == 1 or not is_moe_layer(layer_id, cfg.moe):
        return 0
    return a2a_rows(cfg, layer_id, tokens) * cfg.model.d_model * (stream_width(cfg) + compute_width(cfg))


@dataclass
class Activations:
    """Activation bytes of one microbatch through some layers, under the run's checkpointing mode."""

    kept: int  # held from forward to backward: saved tensors (a checkpointed block: its input) and logits
    replay: int  # all-to-all rows kept for the recompute of checkpointed blocks (ep > 1)
    recompute: int  # how far a recompute in backward lifts the peak above kept + replay (0 if it does not)

    def peak(self, in_flight: int = 1) -> int:
        """With `in_flight` microbatches held at once (pipeline schedules), one recomputing."""
        return (self.kept + self.replay) * in_flight + self.recompute


def activations(cfg: Config, layer_ids: list[int] | None = None, head: bool = True,
                sequences: int | None = None) -> Activations:
    """Activations of `sequences` sequences (default train.micro_batch_size) through the layers
    `layer_ids` (default all, ascending) and, when `head`, the output head (an estimate, see
    `_layer_bytes`).

    Without recomputation every layer keeps all it saves until its backward, so the peak is the end
    of the forward. parallel.activation_checkpoint=block keeps, of each checkpointed block, only
    its fp32 input (the residual stream; a DiT block also the image's conditioning) and, under
    ep > 1, its MoE layer's replayed all-to-all rows (`replay_bytes`); moe_ffn keeps every layer but
    the experts' intermediates. Backward runs the layers in reverse and frees each one's
    activations as it goes, so when it recomputes layer i, the layers after i are gone: it holds
    what the layers before i keep, the replay rows of the layers up to i, and layer i's activations
    in full (block) or its intermediates (moe_ffn); the peak is the larger of that and the end of
    the forward. The head keeps fp32 logits (patch values for a DiT) and their gradient.
    """
    m, tr, par = cfg.model, cfg.train, cfg.parallel
    layer_ids = range(m.num_layers) if layer_ids is None else layer_ids
    sequences = tr.micro_batch_size if sequences is None else sequences
    tokens = sequences * tokens_per_sample(cfg)
    block_input = (tokens + (sequences if m.family == "dit" else 0)) * m.d_model * stream_width(cfg)
    checkpointed = set(checkpointed_layers(par, m.num_layers))
    kept = replay = recomputing = 0  # recomputing: the most held while a layer recomputes
    for i in layer_ids:
        full, intermediates = _layer_bytes(cfg, i)
        if i in checkpointed:
            replay += replay_bytes(cfg, i, tokens)
            recomputing = max(recomputing, kept + replay + tokens * full)
            kept += block_input
        elif par.activation_checkpoint == "moe_ffn" and intermediates:
            kept += tokens * (full - intermediates)
            recomputing = max(recomputing, kept + replay + tokens * intermediates)
        else:
            kept += tokens * full
    # A DiT's head outputs patch_size² x channels (x 2 with learned sigma) per token, not logits.
    out_width = m.patch_size ** 2 * m.in_channels * (2 if m.learn_sigma else 1) if m.family == "dit" else m.vocab_size
    kept += tokens * out_width * 4 * 2 if head else 0
    return Activations(kept, replay, max(0, recomputing - kept - replay))


def activation_bytes(cfg: Config, layer_ids: list[int] | None = None, head: bool = True,
                     sequences: int | None = None) -> int:
    """The peak of `activations` for one microbatch in flight (bytes)."""
    return activations(cfg, layer_ids, head, sequences).peak()


def recompute_macs(cfg: Config, model) -> tuple[float, float]:
    """(multiply-adds per token of one forward, those that activation checkpointing runs a second
    time in backward), on a (meta-device) model: each layer's active parameters (routed experts
    counted top_k/E) plus its attention scores (q·k and p·v, 2·S·heads·head_dim, halved by the
    LLM's causal mask), and the output head. A step costs about three forwards (backward two), so
    recomputation adds again / (3 · forward) to it."""
    from models.moe import is_expert_param

    m, par = cfg.model, cfg.parallel
    head_dim = m.head_dim or m.d_model // m.num_heads
    scores = 2 * tokens_per_sample(cfg) * m.num_heads * head_dim / (2 if m.family == "llm" else 1)
    checkpointed = set(checkpointed_layers(par, m.num_layers))
    forward, again = float(model.output_weight.numel()), 0.0
    for key, block in model.layers.items():
        moe = moe_layer_config(int(key), cfg.moe) if is_moe_layer(int(key), cfg.moe) else None
        share = moe.top_k / moe.num_experts if moe else 0.0
        experts = sum(p.numel() for n, p in block.named_parameters() if is_expert_param(n)) * share
        cost = sum(p.numel() for n, p in block.named_parameters() if not is_expert_param(n)) + experts + scores
        forward += cost
        again += cost if int(key) in checkpointed else experts if par.activation_checkpoint == "moe_ffn" else 0
    return forward, again


def activation_bytes_per_rank(cfg: Config) -> int:
    """Activations of one micro batch through the whole model (no pipeline parallelism)."""
    return activation_bytes(cfg)


def memory_per_rank(cfg: Config, total_params: int, expert_params: int = 0, dp: int = 1,
                    model=None) -> dict[str, int]:
    """fp32 weights and gradients, AdamW's two fp32 moments, and activations (bytes), for pp == 1.

    `state_bytes` for DDP and FSDP (`model`: the meta-device model, for FSDP's working set; built
    when None); the DeepSpeed engine partitions over `dp` what ZeRO holds. With pp > 1 see
    `pipeline_memory_per_rank`.
    """
    if cfg.train.engine == "deepspeed":
        state = zero_state_bytes(cfg, total_params, expert_params, dp)
    else:
        units = fsdp_units(model if model is not None else meta_model(cfg), cfg.parallel.ep) \
            if cfg.parallel.data_parallel == "fsdp" else (0, 0, 0)
        state = state_bytes(cfg, total_params, expert_params, dp, *units)
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
    root: int = 0  # parameters outside its blocks (embedding, head): what FSDP gathers for the step
    largest_block: int = 0  # its largest block as FSDP gathers it on one rank (experts / ep)
    largest_dense_block: int = 0  # the same without routed experts (when FSDP leaves them whole)


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
        stage = model.pipeline_stage(ids, first=s == 0, last=s == last)
        total, active, routed = module_breakdown(stage, cfg.moe)
        stages.append(StagePlan(s, owner[s], ids, s == 0, s == last, total, active, routed,
                                *fsdp_units(stage, cfg.parallel.ep)))
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


def pipeline_memory_per_rank(cfg: Config, plan: PipelinePlan, pp_rank: int, dp: int = 1) -> dict[str, int]:
    """Bytes on each rank of pipeline rank `pp_rank` (its dp ranks are alike): weights, gradients
    and AdamW moments of its stages only (`state_bytes`, sharded over its dp group under FSDP),
    and the activations of its stages' layers for the microbatches in flight."""
    held = plan.rank_stages(pp_rank)
    total = sum(s.total for s in held)
    routed = sum(s.routed for s in held)
    root = sum(s.root for s in held)
    largest, dense = max(s.largest_block for s in held), max(s.largest_dense_block for s in held)
    in_flight = microbatches_in_flight(plan, pp_rank)
    parts = [activations(cfg, s.layer_ids, head=s.last, sequences=plan.microbatch_size) for s in held]
    # Each stage holds its microbatches in flight; the rank recomputes one layer at a time.
    held_bytes = sum((a.kept + a.replay) * in_flight for a in parts) + max(a.recompute for a in parts)
    state = state_bytes(cfg, total, routed, dp, root, largest, dense, pipelined=True)
    return {**state, "activations": held_bytes}


def memory_by_pp_rank(cfg: Config, world_size: int) -> list[dict[str, int]]:
    """The estimate for every pipeline rank (one entry when pp == 1); its dp ranks, global ranks
    pp_rank·dp … pp_rank·dp + dp − 1, are alike. What --dry-run prints, as numbers."""
    dp, model = resolved_dp(cfg.parallel, world_size), meta_model(cfg)
    if cfg.parallel.pp == 1:
        total, _, routed = module_breakdown(model, cfg.moe)
        return [memory_per_rank(cfg, total, routed, dp, model)]
    plan = pipeline_plan(cfg, model)
    return [pipeline_memory_per_rank(cfg, plan, r, dp) for r in range(plan.pp)]


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
    b_in = `stream_width`: the dispatched rows are the MoE input, the residual stream (fp32 unless
    FSDP gathers bf16 weights); b_out = `compute_width`, the experts' matmul output. The count
    exchange (E integers) is left out.
    """
    ep, D = cfg.parallel.ep, cfg.model.d_model
    b_in, b_out = stream_width(cfg), compute_width(cfg)
    moe_ids = set(moe_layer_ids(cfg.model, cfg.moe))
    rows = sum(a2a_rows(cfg, i, tokens) for i in layer_ids if i in moe_ids)
    dispatch = 2 * rows * D * b_in * (ep - 1) // ep
    combine = 2 * rows * D * b_out * (ep - 1) // ep
    return {"dispatch": dispatch, "combine": combine, "total": dispatch + combine}
