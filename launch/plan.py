"""The plan of a run, computed before any process starts: layout, parameters, memory per rank."""
from __future__ import annotations

import io

import yaml

from trainer.config import Config, config_to_dict, resolved_dp


def _human(num: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(num) >= scale:
            return f"{num / scale:.2f}{suffix}{unit}"
    return f"{num:.0f}{unit}"


def moe_layer_ids(cfg: Config) -> list[int]:
    moe = cfg.moe
    if moe.num_experts == 0:
        return []
    return [i for i in range(cfg.model.num_layers)
            if i >= moe.first_k_dense and (i - moe.first_k_dense) % moe.moe_every == 0]


def param_counts(cfg: Config) -> tuple[int, int]:
    """(total, active per token), counted on a meta-device model: no memory is allocated."""
    return param_breakdown(cfg)[:2]


def param_breakdown(cfg: Config) -> tuple[int, int, int]:
    """(total, active per token, routed-expert) parameters, on a meta-device model."""
    import torch

    import models
    from models.moe import expert_parameters

    with torch.device("meta"):
        model = models.build_model(cfg.model, cfg.moe)
    total, active = models.param_counts(model, cfg.moe)
    return total, active, sum(p.numel() for _, p in expert_parameters(model))


def activation_bytes_per_rank(cfg: Config) -> int:
    """Activations kept for backward by one micro batch, without recomputation (an estimate).

    Per layer and token: attention keeps its normed input, q/k/v, the SDPA output and the
    residual; a dense FFN its input and three F-wide tensors (w1, w3, their SwiGLU product); an MoE
    FFN the router logits plus, for each of its top_k copies, the permuted input and three
    F-wide tensors. The LM head keeps fp32 logits and their gradient.
    """
    m, moe, tr = cfg.model, cfg.moe, cfg.train
    tokens = tr.micro_batch_size * cfg.data.seq_len
    head_dim = m.head_dim or m.d_model // m.num_heads
    attention = 3 * m.d_model + (m.num_heads + 2 * m.num_kv_heads) * head_dim + m.num_heads * head_dim
    dense_ffn = m.d_model + 3 * m.ffn_dim
    shared = moe.num_shared_experts * 3 * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    moe_ffn = m.d_model + moe.num_experts + moe.top_k * (m.d_model + 3 * moe.expert_ffn_dim) + shared
    num_moe = len(moe_layer_ids(cfg))
    per_token = m.num_layers * attention + num_moe * moe_ffn + (m.num_layers - num_moe) * dense_ffn
    elem = 2 if tr.dtype == "bf16" else 4
    return tokens * per_token * elem + tokens * m.vocab_size * 4 * 2


def memory_per_rank(cfg: Config, total_params: int, expert_params: int = 0) -> dict[str, int]:
    """fp32 weights and gradients, AdamW's two fp32 moments, and activations (bytes).

    Data parallelism replicates everything (DDP); expert parallelism keeps 1/ep of the routed
    experts (`expert_params` of `total_params`) on each rank. Pipeline parallelism will divide
    these numbers once it lands.
    """
    params = (total_params - expert_params + expert_params // cfg.parallel.ep) * 4
    return {"params": params, "grads": params, "optimizer": 2 * params,
            "activations": activation_bytes_per_rank(cfg)}


def _groups(groups: list[list[int]], shown: int = 3) -> str:
    """Rank groups, abbreviated beyond `shown` groups of at most 8 ranks."""
    def one(g):
        return str(g) if len(g) <= 8 else f"[{g[0]}, {g[1]}, ..., {g[-1]}]"

    text = ", ".join(one(g) for g in groups[:shown])
    return f"[{text}{', ...' if len(groups) > shown else ''}] ({len(groups)} groups of {len(groups[0])})"


def format_plan(cfg: Config, world_size: int, nproc_per_node: int) -> str:
    par = cfg.parallel
    dp = resolved_dp(par, world_size)
    total, active, routed = param_breakdown(cfg)
    out = io.StringIO()
    out.write("# resolved config\n")
    out.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    out.write("\n# plan\n")
    out.write(f"world size {world_size} = pp {par.pp} x dp {dp} (ep {par.ep} folded into dp); "
              f"{world_size // nproc_per_node} node(s) x {nproc_per_node} process(es)\n")
    moe_ids = moe_layer_ids(cfg)
    experts = f"{cfg.moe.num_experts} experts top-{cfg.moe.top_k} on layers {moe_ids}" if moe_ids else "dense"
    out.write(f"model: {cfg.model.family}{' preset ' + cfg.model.preset if cfg.model.preset else ''}, "
              f"{cfg.model.num_layers} layers, d_model {cfg.model.d_model}, {experts}\n")
    out.write(f"parameters: {_human(total)} total, {_human(active)} active per token\n")
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp
    out.write(f"batch: {global_batch} sequences x {cfg.data.seq_len} tokens per step "
              f"({cfg.train.micro_batch_size} per rank x {cfg.train.grad_accum_steps} accumulation x dp {dp}); "
              f"{cfg.train.steps} steps\n")
    out.write("\nrank  node  local  pp_stage  dp_rank  ep_rank  experts held\n")
    from parallel.mesh import layout  # the same arithmetic the trainer uses

    per_rank = cfg.moe.num_experts // par.ep if cfg.moe.num_experts else 0
    for rank in range(world_size):
        c = layout(rank, world_size, par)
        held = (f"{c['ep_rank'] * per_rank}-{(c['ep_rank'] + 1) * per_rank - 1}" if per_rank else "-")
        out.write(f"{rank:<5d} {rank // nproc_per_node:<5d} {rank % nproc_per_node:<6d} {c['pp_rank']:<9d} "
                  f"{c['dp_rank']:<8d} {c['ep_rank']:<8d} {held}\n")
    if par.ep > 1:
        from parallel.mesh import group_ranks

        groups = group_ranks(world_size, par)
        chunks = f", {par.ep_chunks} chunks" if par.ep_overlap in ("chunked", "combinable") else ""
        out.write(f"expert parallel: all-to-all within {_groups(groups['ep'])}, expert grads reduced "
                  f"within {_groups(groups['edp'])}; overlap {par.ep_overlap}{chunks}\n")
    mem = memory_per_rank(cfg, total, routed)
    parts = ", ".join(f"{k} {_human(v, 'B')}" for k, v in mem.items())
    out.write(f"\nmemory per rank (estimate): {parts}; total {_human(sum(mem.values()), 'B')}\n")
    return out.getvalue()
