"""The plan of a run as `sparseforge run --dry-run` prints it: the resolved config, the layout,
parameters, memory per rank, what activation checkpointing saves and costs, and with pipeline
parallelism (parallel.pp > 1) the stages, their ranks and the schedule's bubble; the numbers come
from launch/plan.py."""
from __future__ import annotations

import dataclasses
import io

import yaml

from launch.plan import (PipelinePlan, a2a_bytes, a2a_rows, activations, memory_per_rank, meta_model,
                         microbatches_in_flight, module_breakdown, pipeline_memory_per_rank, pipeline_plan,
                         recompute_macs, stream_width, compute_width, tokens_per_sample)
from models.config import moe_layer_ids
from parallel.config import checkpointed_layers, resolved_dp, resolved_dp_shard
from trainer.config import Config, config_to_dict


def _human(num: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(num) >= scale:
            return f"{num / scale:.2f}{suffix}{unit}"
    return f"{num:.0f}{unit}"


def _groups(groups: list[list[int]], shown: int = 3) -> str:
    """Rank groups, abbreviated beyond `shown` groups of at most 8 ranks."""
    def one(g):
        return str(g) if len(g) <= 8 else f"[{g[0]}, {g[1]}, ..., {g[-1]}]"

    text = ", ".join(one(g) for g in groups[:shown])
    return f"[{text}{', ...' if len(groups) > shown else ''}] ({len(groups)} groups of {len(groups[0])})"


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
    memory = {r: pipeline_memory_per_rank(cfg, plan, r, dp) for r in range(plan.pp)}
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


def fsdp_text(cfg: Config, world_size: int) -> str:
    """What FSDP shards where (parallel/fsdp.py)."""
    par = cfg.parallel
    dp, shard = resolved_dp(par, world_size), resolved_dp_shard(par, world_size)
    how = f"full sharding over dp {dp}" if shard == dp else f"hybrid: shards over {shard} ranks, replicated {dp // shard}x"
    experts = ""
    if par.ep > 1:
        efsdp = shard // par.ep
        experts = (f"; routed experts (1/ep {par.ep} per rank) sharded over {efsdp} ranks along dim 1" if efsdp > 1
                   else "; routed experts not sharded further (each is held by one rank of a shard group)")
    offload = "; shards, gradients and optimizer state in CPU memory" if par.fsdp_cpu_offload else ""
    return (f"data parallel: FSDP2, {how}{experts}; gathered parameters {par.fsdp_param_dtype}, gradients "
            f"reduced in {par.fsdp_reduce_dtype}{offload}; memory 'gathered': the weights a step gathers (the "
            f"root's, two blocks at a time) and one block's unsharded gradients\n")


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


def a2a_text(cfg: Config, plan: PipelinePlan | None) -> str:
    """The all-to-all lines of the plan: per MoE layer and microbatch, and per step (per pipeline
    rank with pp > 1: each holds its own MoE layers)."""
    tr, ep = cfg.train, cfg.parallel.ep
    sequences = plan.microbatch_size if plan else tr.micro_batch_size
    microbatches = (plan.microbatches if plan else 1) * tr.grad_accum_steps
    tokens = sequences * tokens_per_sample(cfg)
    moe_ids = moe_layer_ids(cfg.model, cfg.moe)
    one = a2a_bytes(cfg, moe_ids[:1], tokens)
    b_in, b_out = stream_width(cfg), compute_width(cfg)
    name = {2: "bf16", 4: "fp32"}
    same = len({a2a_rows(cfg, i, tokens) for i in moe_ids}) == 1
    out = io.StringIO()
    out.write("expert all-to-all, bytes each rank sends (= receives, uniform routing), forward + backward:\n")
    if same:
        out.write(f"  per MoE layer and microbatch: dispatch {_human(one['dispatch'], 'B')} ({name[b_in]}) + combine "
                  f"{_human(one['combine'], 'B')} ({name[b_out]}) = {_human(one['total'], 'B')}; "
                  f"2 x R x d_model {cfg.model.d_model} x ({b_in} + {b_out}) B x (ep-1)/ep "
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


def recompute_text(cfg: Config, model, plan: PipelinePlan | None) -> str:
    """What activation checkpointing recomputes, the activations per rank with and without it (per
    pipeline rank with pp > 1), and the forward compute it adds to a step; "" when it is off."""
    par = cfg.parallel
    if par.activation_checkpoint == "none":
        return ""
    if par.activation_checkpoint == "block":
        k = par.activation_checkpoint_every
        what = f"whole blocks{f' (every {k})' if k > 1 else ''}, layers {checkpointed_layers(par, cfg.model.num_layers)}"
    else:
        what = f"the routed experts of MoE layers {moe_layer_ids(cfg.model, cfg.moe)}"
    without = dataclasses.replace(cfg, parallel=dataclasses.replace(par, activation_checkpoint="none"))
    if plan is None:
        held, replay = activations(cfg), activations(cfg).replay
        sizes = f"{_human(held.peak(), 'B')} instead of {_human(activations(without).peak(), 'B')} per rank"
    else:
        sizes = "; ".join(f"pp rank {r} {_human(pipeline_memory_per_rank(cfg, plan, r)['activations'], 'B')} "
                          f"instead of {_human(pipeline_memory_per_rank(without, plan, r)['activations'], 'B')}"
                          for r in range(plan.pp))
        replay = sum(activations(cfg, s.layer_ids, s.last, plan.microbatch_size).replay for s in plan.stages)
    kept = f", of which all-to-all rows kept for the recompute {_human(replay, 'B')}" if replay else ""
    forward, again = recompute_macs(cfg, model)
    return (f"activation checkpointing ({par.activation_checkpoint}): recomputes {what} in backward; "
            f"activations {sizes}{kept}; compute: {again / forward:.0%} of a forward again, "
            f"about +{again / (3 * forward):.1%} per step (a step ~ 3 forwards)\n")


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
    out.write(recompute_text(cfg, model, plan))
    if par.data_parallel == "fsdp":
        out.write(fsdp_text(cfg, world_size))
    if plan is not None:
        out.write(format_pipeline(cfg, plan, dp))
        return out.getvalue()
    if cfg.train.engine == "deepspeed":
        held = "every parameter" if par.ep == 1 else "all but the routed experts (their own AdamW, reduced over edp)"
        out.write(f"engine: deepspeed ZeRO-{cfg.train.zero_stage} over dp {dp}, holding {held}\n")
    mem = memory_per_rank(cfg, total, routed, dp, model)
    parts = ", ".join(f"{k} {_human(v, 'B')}" for k, v in mem.items())
    out.write(f"\nmemory per rank (estimate): {parts}; total {_human(sum(mem.values()), 'B')}\n")
    return out.getvalue()
