"""The plan of a run, computed before any process starts: layout, parameters, memory per rank,
and with pipeline parallelism (parallel.pp > 1) the stages, their ranks and the schedule's bubble."""
from __future__ import annotations

import io
from dataclasses import dataclass

import yaml

from models.config import moe_layer_config, moe_layer_ids
from parallel.config import pp_microbatches, pp_stages_per_rank, resolved_dp, stage_owners
from trainer.config import Config, config_to_dict


def _human(num: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(num) >= scale:
            return f"{num / scale:.2f}{suffix}{unit}"
    return f"{num:.0f}{unit}"


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


def _groups(groups: list[list[int]], shown: int = 3) -> str:
    """Rank groups, abbreviated beyond `shown` groups of at most 8 ranks."""
    def one(g):
        return str(g) if len(g) <= 8 else f"[{g[0]}, {g[1]}, ..., {g[-1]}]"

    text = ", ".join(one(g) for g in groups[:shown])
    return f"[{text}{', ...' if len(groups) > shown else ''}] ({len(groups)} groups of {len(groups[0])})"


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism


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


def bubble_text(plan: PipelinePlan) -> str:
    """The schedule's theoretical bubble: idle share of a micro step, equal-time passes assumed."""
    p, m, v = plan.pp, plan.microbatches, plan.stages_per_rank
    if plan.schedule in ("gpipe", "1f1b"):
        return f"{(p - 1) / (m + p - 1):.1%} of each micro step idle, (p-1)/(m+p-1) with p {p}, m {m}"
    if plan.schedule == "interleaved_1f1b":  # Narayanan et al. 2021: the bubble shrinks by v
        return (f"{(p - 1) / (v * m + p - 1):.1%} of each micro step idle, (p-1)/(v*m+p-1) "
                f"with p {p}, v {v}, m {m}")
    if plan.schedule == "zbv":
        return ("~0 (zero bubble, in theory: ZB-V with equal forward, input-grad and weight-grad "
                "pass times and enough microbatches; real runs keep some)")
    # dualpipev: DeepSeek's DualPipe analysis counts the bubble in pass times, not as a share of m.
    return ("small, not zero in general: (pp/2-1)*(F&B+B-3W) pass times in DeepSeek's DualPipe "
            "analysis (F&B: a forward and a backward overlapped), below 1F1B's (pp-1)*(F+B)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('ch') else 's'}"


def _layer_range(ids: list[int]) -> str:
    return f"layer {ids[0]}" if len(ids) == 1 else f"layers {ids[0]}-{ids[-1]}"


def _rank_range(pp_rank: int, dp: int) -> str:
    """The global ranks of one pipeline rank (rank = pp_rank * dp + dp_rank: contiguous)."""
    first = pp_rank * dp
    return f"rank {first}" if dp == 1 else f"ranks {first}-{first + dp - 1}"


def _stage_ids_text(plan: PipelinePlan, pp_rank: int) -> str:
    return ",".join(str(s.index) for s in plan.rank_stages(pp_rank))


def format_pipeline(cfg: Config, plan: PipelinePlan, dp: int) -> str:
    """The pipeline section: schedule, microbatches, bubble, one line per stage, memory per pp rank."""
    out = io.StringIO()
    shape = "V: rank r holds r and 2pp-1-r" if plan.schedule in ("zbv", "dualpipev") else \
        ("loop: rank r holds r, r+pp, ..." if plan.stages_per_rank > 1 else "one per rank")
    out.write(f"\npipeline: schedule {plan.schedule}, {plan.num_stages} stages = pp {plan.pp} x "
              f"{plan.stages_per_rank} per rank ({shape}); {_count(plan.microbatches, 'microbatch')} of "
              f"{_count(plan.microbatch_size, 'sequence')} per micro step\n")
    out.write(f"bubble (theory): {bubble_text(plan)}\n")
    memory = {r: pipeline_memory_per_rank(cfg, plan, r) for r in range(plan.pp)}
    rows = [("stage", "pp_rank", "layers", "holds", "params", "active", "memory of its rank(s)")]
    for s in plan.stages:
        holds = "+".join(part for part, has in (("embedding", s.first), ("norm+head", s.last)) if has) or "-"
        rows.append((str(s.index), str(s.pp_rank), _layer_range(s.layer_ids), holds, _human(s.total),
                     _human(s.active), f"{_human(sum(memory[s.pp_rank].values()), 'B')} "
                     f"({_rank_range(s.pp_rank, dp)})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] + "\n")
    out.write("\nmemory per rank (estimate), by pipeline rank:\n")
    for r in range(plan.pp):
        parts = ", ".join(f"{k} {_human(v, 'B')}" for k, v in memory[r].items())
        bound = "" if plan.schedule in ("gpipe", "1f1b") else ", an upper bound"
        out.write(f"pp rank {r} (stages {_stage_ids_text(plan, r)}; {_rank_range(r, dp)}): {parts} "
                  f"({_count(microbatches_in_flight(plan, r), 'microbatch')} in flight per stage{bound}); "
                  f"total {_human(sum(memory[r].values()), 'B')}\n")
    return out.getvalue()


def peft_text(cfg: Config) -> str:
    """What a PEFT run trains, counted on a meta-device model (ESFT's experts are chosen from
    task data at start, so only the rule is known here)."""
    p = cfg.peft
    if p.method == "esft":
        return (f"peft esft: per MoE layer the experts holding top_p {p.esft_top_p} of the {p.esft_score}, "
                f"scored on {p.esft_calib_batches} training micro batches per rank at start; base {p.base}")
    from models.peft import apply_peft

    return f"{apply_peft(meta_model(cfg), p)}; base {p.base}"


def prune_text(cfg: Config) -> str:
    """What a prune run does first (the model above is the checkpoint's, before compression)."""
    p = cfg.prune
    if p.method in ("experts", "merge"):
        from models.pruning import keep_counts

        what = f"criterion {p.criterion}" if p.method == "experts" else "router-logit similarity groups"
        kept = (f"per layer {keep_counts([cfg.moe.num_experts], p.sparsity, 1, cfg.parallel.ep)[0]} of "
                f"{cfg.moe.num_experts} experts" if p.budget == "per_layer" else f"{p.sparsity:.0%} of all experts")
        return (f"prune {p.method} ({what}, {p.budget} budget): keeps {kept}, calibrated on {p.calib_batches} "
                f"training micro batches per rank; then {cfg.train.steps} recovery steps; from {p.checkpoint}")
    if p.method in ("dare", "darex"):
        q = "1/(1-p)" if p.method == "dare" else (f"1/{p.darex_q}" if p.darex_q else "1/q, q tuned on one batch")
        return f"prune {p.method}: delta of {p.checkpoint} to {p.reference}, drop p {p.drop_rate}, rescale {q}"
    if p.method == "ties":
        return (f"prune ties: {1 + len(p.ties_checkpoints)} fine-tunes of {p.reference}, density {p.ties_density}, "
                f"lambda {p.ties_lambda}")
    return f"prune magnitude: expert weights of {p.checkpoint}, {p.nm or f'{p.sparsity:.0%} unstructured'}"


# ---------------------------------------------------------------------------------------------
# Expert-parallel all-to-all volume


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


def a2a_text(cfg: Config, plan: PipelinePlan | None) -> str:
    """The all-to-all lines of the plan: per MoE layer and microbatch, and per step (per pipeline
    rank with pp > 1: each holds its own MoE layers)."""
    tr, ep = cfg.train, cfg.parallel.ep
    sequences = plan.microbatch_size if plan else tr.micro_batch_size
    microbatches = (plan.microbatches if plan else 1) * tr.grad_accum_steps
    tokens = sequences * tokens_per_sample(cfg)
    moe_ids = moe_layer_ids(cfg.model, cfg.moe)
    one = a2a_bytes(cfg, moe_ids[:1], tokens)
    b_out = "bf16" if tr.dtype == "bf16" else "fp32"
    same = len({a2a_rows(cfg, i, tokens) for i in moe_ids}) == 1
    out = io.StringIO()
    out.write("expert all-to-all, bytes each rank sends (= receives, uniform routing), forward + backward:\n")
    if same:
        out.write(f"  per MoE layer and microbatch: dispatch {_human(one['dispatch'], 'B')} (fp32) + combine "
                  f"{_human(one['combine'], 'B')} ({b_out}) = {_human(one['total'], 'B')}; "
                  f"2 x R x d_model {cfg.model.d_model} x (4 + {2 if b_out == 'bf16' else 4}) B x (ep-1)/ep "
                  f"{ep - 1}/{ep}, R = {a2a_rows(cfg, moe_ids[0], tokens)} rows ({tokens} tokens x top_k "
                  f"{cfg.moe.top_k}{'' if a2a_rows(cfg, moe_ids[0], tokens) == tokens * cfg.moe.top_k else ', capacity'})\n")
    rows = []  # (first pp rank, last pp rank, MoE layers, bytes per step): equal neighbours merged
    for r in range(plan.pp) if plan else [0]:
        layer_ids = [i for s in plan.rank_stages(r) for i in s.layer_ids] if plan else range(cfg.model.num_layers)
        num_moe = len(set(layer_ids) & set(moe_ids))
        step = a2a_bytes(cfg, layer_ids, tokens)["total"] * microbatches
        if rows and rows[-1][2:] == (num_moe, step):
            rows[-1] = (rows[-1][0], r, num_moe, step)
        else:
            rows.append((r, r, num_moe, step))
    for first, last, num_moe, step in rows:
        who = "each rank" if not plan else f"pp rank {first}" if first == last else f"pp ranks {first}-{last}"
        out.write(f"  per step, {who}: {_human(step, 'B')} ({_count(num_moe, 'MoE layer')} x {_count(microbatches, 'microbatch')})\n")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# The whole plan


def format_plan(cfg: Config, world_size: int, nproc_per_node: int) -> str:
    par = cfg.parallel
    dp = resolved_dp(par, world_size)
    model = meta_model(cfg)
    total, active, routed = module_breakdown(model, cfg.moe)
    plan = pipeline_plan(cfg, model) if par.pp > 1 else None
    out = io.StringIO()
    out.write("# resolved config\n")
    out.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    out.write("\n# plan\n")
    out.write(f"world size {world_size} = pp {par.pp} x dp {dp} (ep {par.ep} folded into dp); "
              f"{world_size // nproc_per_node} node(s) x {nproc_per_node} process(es)\n")
    moe_ids = moe_layer_ids(cfg.model, cfg.moe)
    counts = cfg.moe.layer_num_experts  # a pruned model: each MoE layer its own count
    experts = (f"{counts if counts else cfg.moe.num_experts} experts top-{cfg.moe.top_k} on layers {moe_ids}"
               if moe_ids else "dense")
    out.write(f"model: {cfg.model.family}{' preset ' + cfg.model.preset if cfg.model.preset else ''}, "
              f"{cfg.model.num_layers} layers, d_model {cfg.model.d_model}, {experts}\n")
    out.write(f"parameters: {_human(total)} total, {_human(active)} active per token\n")
    if cfg.peft.method != "none":
        out.write(peft_text(cfg) + "\n")
    if cfg.prune.method != "none":
        out.write(prune_text(cfg) + "\n")
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp
    unit = "images" if cfg.model.family == "dit" else "sequences"
    out.write(f"batch: {global_batch} {unit} x {tokens_per_sample(cfg)} tokens per step "
              f"({cfg.train.micro_batch_size} per rank x {cfg.train.grad_accum_steps} accumulation x dp {dp}); "
              f"{cfg.train.steps} steps\n")
    from parallel.mesh import layout  # the same arithmetic the trainer uses

    coords = [layout(rank, world_size, par) for rank in range(world_size)]
    # A rank's stage ids ("0,3" under zbv); with one stage per rank that is its pp rank.
    stage_ids = [_stage_ids_text(plan, c["pp_rank"]) if plan else str(c["pp_rank"]) for c in coords]
    width = max(9, *(len(s) + 1 for s in stage_ids))
    out.write(f"\nrank  node  local  {'pp_stage':<{width}} dp_rank  ep_rank  experts held\n")
    per_rank = cfg.moe.num_experts // par.ep if cfg.moe.num_experts else 0
    for rank, (c, stages) in enumerate(zip(coords, stage_ids)):
        held = (f"{c['ep_rank'] * per_rank}-{(c['ep_rank'] + 1) * per_rank - 1}" if per_rank else "-")
        if counts:  # per MoE layer
            held = ",".join(f"{c['ep_rank'] * (E // par.ep)}-{(c['ep_rank'] + 1) * (E // par.ep) - 1}" for E in counts)
        out.write(f"{rank:<5d} {rank // nproc_per_node:<5d} {rank % nproc_per_node:<6d} {stages:<{width}} "
                  f"{c['dp_rank']:<8d} {c['ep_rank']:<8d} {held}\n")
    if par.ep > 1:
        from parallel.mesh import group_ranks

        groups = group_ranks(world_size, par)
        chunks = f", {par.ep_chunks} chunks" if par.ep_overlap in ("chunked", "combinable") else ""
        out.write(f"expert parallel: all-to-all within {_groups(groups['ep'])}, expert grads reduced "
                  f"within {_groups(groups['edp'])}; overlap {par.ep_overlap}{chunks}\n")
        if moe_layer_ids(cfg.model, cfg.moe):
            out.write(a2a_text(cfg, plan))
    if plan is not None:
        out.write(format_pipeline(cfg, plan, dp))
        return out.getvalue()
    if cfg.train.engine == "deepspeed":
        held = "every parameter" if par.ep == 1 else "all but the routed experts (their own AdamW, reduced over edp)"
        out.write(f"engine: deepspeed ZeRO-{cfg.train.zero_stage} over dp {dp}, holding {held}\n")
    mem = memory_per_rank(cfg, total, routed, dp)
    parts = ", ".join(f"{k} {_human(v, 'B')}" for k, v in mem.items())
    out.write(f"\nmemory per rank (estimate): {parts}; total {_human(sum(mem.values()), 'B')}\n")
    return out.getvalue()

