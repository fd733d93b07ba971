"""The model's own config: `ModelConfig`, `MoEConfig`, the names of what models/ implements, and
the rules between their fields. Plain dataclasses, no torch: a recipe is checked in well under a
second, before anything heavy is imported.

Declarative constraints sit on the fields: `Literal` choices, and ranges in the field metadata
(`bounded(default, gt=0)`), which the recipe loader (trainer/recipe.py, pydantic) enforces and
names in its one-line errors. Rules between fields are the `check_*` functions below; they raise
`ConfigError`, one line naming the keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args


class ConfigError(ValueError):
    """A recipe problem, reported as one line that names the key or file."""


class ConfigSection:
    """Base of every config dataclass. The recipe loader (pydantic) reads this: unknown keys are
    errors, and a number given for a string field is that string (`--set logging.run_name=123`)."""
    __pydantic_config__ = {"extra": "forbid", "coerce_numbers_to_str": True}


def bounded(default, **bounds):
    """A field with a range: bounds are pydantic's gt / ge / lt / le."""
    return field(default=default, metadata=bounds)


def require(cond: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `cond`: the form of every cross-field rule."""
    if not cond:
        raise ConfigError(message)


# The names of what models/ implements; the modules that implement them import these.
Family = Literal["llm", "dit"]
AttentionKind = Literal["gqa", "mla"]
RopeScalingKind = Literal["none", "linear", "dynamic", "yarn"]  # models/rope.py
ExpertAct = Literal["swiglu", "clamped_swiglu"]  # models/moe/backends.py
Routing = Literal["token_choice", "expert_choice"]
ScoreFunc = Literal["softmax", "sigmoid"]
GroupScore = Literal["top2_sum", "max"]
DropPolicy = Literal["probability", "position"]
Backend = Literal["auto", "loop", "grouped_mm", "megablocks"]
ROUTINGS, SCORE_FUNCS, DROP_POLICIES, BACKEND_CHOICES = (get_args(t) for t in (Routing, ScoreFunc, DropPolicy,
                                                                                  Backend))
GROUP_SCORES = get_args(GroupScore)
PEFT_METHODS = ("none", "full", "lora", "perft", "esft")
PERFT_VARIANTS = ("S", "D", "R", "E")  # shared, dense, routed, per expert
ESFT_SCORES = ("gate_mass", "token_share")
PRUNE_CRITERIA = ("frequency", "gate_mass", "router_norm", "reap", "naee", "random")


@dataclass
class ModelConfig(ConfigSection):
    preset: str = ""  # a name in models.registry; its values sit under the recipe's own
    family: Family = "llm"
    vocab_size: int = bounded(260, gt=0)
    d_model: int = bounded(128, gt=0)
    num_layers: int = bounded(4, gt=0)
    num_heads: int = bounded(4, gt=0)
    num_kv_heads: int = bounded(2, gt=0)
    head_dim: int = bounded(0, ge=0)  # 0: d_model // num_heads
    ffn_dim: int = bounded(512, gt=0)  # hidden size of dense (non-MoE) FFN layers
    max_seq_len: int = bounded(512, gt=0)
    rope_theta: float = 10000.0
    # RoPE context extension (models/rope.py, as transformers computes it): none | linear |
    # dynamic (NTK) | yarn. The other rope_* keys only matter when it is not none.
    rope_scaling: RopeScalingKind = "none"
    rope_factor: float = bounded(1.0, gt=0)  # context extension factor
    rope_original_max_seq_len: int = bounded(0, ge=0)  # the pre-extension context; 0: max_seq_len
    rope_beta_fast: float = bounded(32.0, gt=0)  # yarn: rotations bounding the extrapolated band
    rope_beta_slow: float = bounded(1.0, gt=0)  # yarn: rotations bounding the interpolated band
    rope_mscale: float = bounded(0.0, ge=0)  # yarn: mscale (0: unset)
    rope_mscale_all_dim: float = bounded(0.0, ge=0)  # yarn: mscale_all_dim (0: unset); MLA softmax scale too
    rope_attention_factor: float = bounded(0.0, ge=0)  # yarn: cos/sin factor; 0: from factor and mscales
    rope_truncate: bool = True  # yarn: round the correction band to whole dims
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Attention (models/attention.py): gqa (grouped-query) | mla (DeepSeek multi-head latent).
    attention: AttentionKind = "gqa"
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2-MoE); mla: on q_a and kv_a
    attn_out_bias: bool = False  # bias on the attention output projection
    qk_norm: bool = False  # gqa: RMSNorm over the whole q and k projections before RoPE (OLMoE)
    clip_qkv: float = bounded(0.0, ge=0)  # gqa: clamp q, k, v to [-c, c] (OLMoE); 0: off
    qk_norm_per_head: bool = False  # gqa: RMSNorm over each head's q and k channels before RoPE (Qwen3-MoE)
    partial_rotary_factor: float = bounded(1.0, gt=0, le=1)  # gqa: RoPE on this first fraction of a head's channels
    attn_sinks: bool = False  # gqa: a learned per-head logit in every softmax denominator (gpt-oss)
    sliding_window: int = bounded(0, ge=0)  # gqa: attend to the last W tokens (self included); 0: off
    sliding_window_layers: list[int] = field(default_factory=list)  # the windowed layers; empty: all
    mla_q_lora_rank: int = bounded(0, ge=0)  # rank of the q bottleneck; 0: a full-rank q projection
    mla_kv_lora_rank: int = 512  # the compressed kv latent per token
    mla_qk_nope_head_dim: int = 128  # q/k channels per head without RoPE
    mla_qk_rope_head_dim: int = 64  # q/k channels per head with RoPE (the key's shared by all heads)
    mla_v_head_dim: int = 128
    # A fresh run starts from these weights: "hf:DIR" (a Hugging Face checkpoint of a supported
    # family) or a checkpoint directory of ours; the architecture keys come from the source
    # (trainer/adapt/sources.py).
    init_from: str = ""
    # Sparse upcycling: a checkpoint directory (step_XXXXXXXX) of a dense run of ours whose
    # weights initialise this MoE model when the run does not resume (models/moe/upcycle.py).
    upcycle_from: str = ""
    upcycle_granularity: int = bounded(1, ge=1)  # G > 1: experts of dense ffn_dim / G, each a 1/G slice
    # DiT (family dit): images of image_size² pixels and in_channels channels, cut into
    # patch_size² patches (one token each); class-conditional over num_classes (label num_classes
    # is the "no label" of classifier-free guidance, used with class_dropout_prob in training).
    image_size: int = bounded(8, gt=0)
    patch_size: int = bounded(2, gt=0)
    in_channels: int = bounded(1, gt=0)
    num_classes: int = bounded(10, gt=0)
    class_dropout_prob: float = bounded(0.1, ge=0, lt=1)
    learn_sigma: bool = True  # also output the interpolation v of the variance (DDPM objective)

    @property
    def resolved_head_dim(self) -> int:
        """Channels per attention head (gqa): head_dim, or d_model // num_heads."""
        return self.head_dim or self.d_model // self.num_heads


@dataclass
class MoEConfig(ConfigSection):
    num_experts: int = bounded(8, ge=0)  # 0: a dense model (every FFN is dense)
    top_k: int = 2
    expert_ffn_dim: int = bounded(256, gt=0)
    moe_every: int = bounded(1, gt=0)  # MoE on every k-th layer (after the dense first-k)
    first_k_dense: int = bounded(0, ge=0)
    num_shared_experts: int = bounded(0, ge=0)
    shared_expert_ffn_dim: int = bounded(0, ge=0)  # 0: expert_ffn_dim
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x·w_gate)
    router_bias: bool = False  # a bias on the router logits (gpt-oss)
    expert_bias: bool = False  # biases on the routed experts' gate, up and down projections (gpt-oss)
    # Routed experts' activation: swiglu silu(g)·u | clamped_swiglu (gpt-oss):
    # g' = min(g, limit), u' = clamp(u, ±limit), out = (u' + 1)·g'·sigmoid(alpha·g')
    expert_act: ExpertAct = "swiglu"
    swiglu_alpha: float = bounded(1.702, gt=0)
    swiglu_limit: float = bounded(7.0, gt=0)
    # Routing. expert_choice (each expert picks its top-C tokens) is not causal: a token's
    # routing depends on later tokens, so it suits DiTs and leaks the future in causal LMs.
    routing: Routing = "token_choice"
    score_func: ScoreFunc = "softmax"  # sigmoid: DeepSeek-V3
    renormalize: bool = True  # chosen top-k weights rescaled to sum 1 (token choice)
    num_groups: int = bounded(0, ge=0)  # group-limited routing (DeepSeek-V3): expert groups; 0: off
    topk_group: int = bounded(0, ge=0)  # groups kept per token
    group_score: GroupScore = "top2_sum"  # a group's score: sum of its top-2 expert scores (V3) | max (V2)
    routed_scaling_factor: float = bounded(1.0, gt=0)  # multiplies the routed experts' gate weights
    router_jitter: float = bounded(0.0, ge=0, lt=1)  # eps of U[1-eps, 1+eps] noise on the router input (training)
    # Balancing: each loss has its own coefficient (0: off) and its own log key moe/<name>.
    aux_loss_coeff: float = bounded(0.01, ge=0)  # Switch/GShard load-balancing loss
    seq_aux_loss_coeff: float = bounded(0.0, ge=0)  # the same per sequence, averaged (DeepSeek-V2/V3)
    z_loss_coeff: float = bounded(0.001, ge=0)  # router z-loss
    expert_balance_loss_coeff: float = bounded(0.0, ge=0)  # DiT-MoE/DeepSeekMoE expert-level balance loss
    aux_free: bool = False  # auxiliary-loss-free balancing: per-expert selection bias
    aux_free_update_rate: float = bounded(1e-3, ge=0)  # u in b += u·sign(mean load - load), per optimizer step
    # Capacity. Token choice: C = ceil(T·K·capacity_factor/E) per expert, 0: dropless.
    # Expert choice: C = ceil(T·capacity_factor/E), 0: use top_k as the factor.
    capacity_factor: float = bounded(0.0, ge=0)
    drop_policy: DropPolicy = "probability"  # over capacity keep: probability (highest gate) | position
    pad_to_capacity: bool = False  # pad every expert's rows to C (static shapes, as Megatron)
    backend: Backend = "auto"  # expert compute backend (models/moe/backends.py)
    # Pruned models (models/pruning): experts of each MoE layer, in order; empty: every MoE layer
    # has num_experts (then the widest layer's count). A layer routes to min(top_k, its count).
    layer_num_experts: list[int] = field(default_factory=list)
    # Dynamic skipping (NAEE), eval mode only: per MoE layer β; a token drops its 2nd (and later)
    # expert when that expert's gate weight is below β times its 1st's. Empty or 0: off.
    skip_beta: list[float] = field(default_factory=list)


# -- which layers are MoE, and what each of them is ----------------------------------------------


def is_moe_layer(layer_id: int, moe_cfg: MoEConfig) -> bool:
    """The one rule: MoE from layer first_k_dense on, every moe_every-th layer."""
    return (moe_cfg.num_experts > 0 and layer_id >= moe_cfg.first_k_dense
            and (layer_id - moe_cfg.first_k_dense) % moe_cfg.moe_every == 0)


def moe_layer_ids(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> list[int]:
    """Indices of the MoE layers, ascending."""
    return [i for i in range(model_cfg.num_layers) if is_moe_layer(i, moe_cfg)]


def moe_layer_config(layer_id: int, moe_cfg: MoEConfig) -> MoEConfig:
    """The MoE config of MoE layer `layer_id`: its own expert count from moe.layer_num_experts
    (a pruned model; empty: moe.num_experts) and top_k clipped to that count."""
    if not moe_cfg.layer_num_experts:
        return moe_cfg
    E = moe_cfg.layer_num_experts[(layer_id - moe_cfg.first_k_dense) // moe_cfg.moe_every]
    return dataclasses.replace(moe_cfg, num_experts=E, top_k=min(moe_cfg.top_k, E))


def shape_fields(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict[str, object]:
    """The config values that decide the weights' names and shapes, by config key: two configs
    with equal values load each other's tensors."""
    m, moe = model_cfg, moe_cfg
    fields: dict[str, object] = {"model.family": m.family, "model.d_model": m.d_model,
                                 "model.num_layers": m.num_layers, "model.num_heads": m.num_heads,
                                 "model.head_dim": m.resolved_head_dim, "moe.num_experts": moe.num_experts}
    if m.family == "llm":
        fields.update({"model.vocab_size": m.vocab_size, "model.num_kv_heads": m.num_kv_heads,
                       "model.tie_embeddings": m.tie_embeddings, "model.attention": m.attention,
                       "model.qkv_bias": m.qkv_bias, "model.attn_out_bias": m.attn_out_bias,
                       "model.qk_norm": m.qk_norm, "model.qk_norm_per_head": m.qk_norm_per_head,
                       "model.attn_sinks": m.attn_sinks})
        if m.attention == "mla":
            fields.update({f"model.{k}": getattr(m, k) for k in (
                "mla_q_lora_rank", "mla_kv_lora_rank", "mla_qk_nope_head_dim", "mla_qk_rope_head_dim",
                "mla_v_head_dim")})
    else:
        fields.update({"model.image_size": m.image_size, "model.patch_size": m.patch_size,
                       "model.in_channels": m.in_channels, "model.num_classes": m.num_classes,
                       "model.learn_sigma": m.learn_sigma})
    if len(moe_layer_ids(m, moe)) < m.num_layers:  # dense FFN layers exist
        fields["model.ffn_dim"] = m.ffn_dim
    if moe.num_experts > 0:
        shared = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
        fields.update({"moe.expert_ffn_dim": moe.expert_ffn_dim, "moe.moe_every": moe.moe_every,
                       "moe.first_k_dense": moe.first_k_dense, "moe.num_shared_experts": moe.num_shared_experts,
                       "moe.shared_expert_ffn_dim": shared, "moe.shared_expert_gate": moe.shared_expert_gate,
                       "moe.aux_free": moe.aux_free, "moe.layer_num_experts": list(moe.layer_num_experts),
                       "moe.router_bias": moe.router_bias, "moe.expert_bias": moe.expert_bias})
    return fields


# -- rules between fields ------------------------------------------------------------------------


def check_model(m: ModelConfig, moe: MoEConfig) -> None:
    """Every rule between the fields of the model and moe sections."""
    require(m.num_heads % m.num_kv_heads == 0,
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}")
    _check_attention(m)
    if m.family == "dit":
        require(m.image_size % m.patch_size == 0,
                f"model.patch_size={m.patch_size} does not divide model.image_size={m.image_size}")
    require(not (m.init_from and m.upcycle_from), "model.init_from and model.upcycle_from: choose one source of weights")
    if moe.num_experts > 0:
        require(1 <= moe.top_k <= moe.num_experts,
                f"moe.top_k={moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}")
        require(moe.first_k_dense < m.num_layers,
                f"moe.first_k_dense={moe.first_k_dense} leaves no MoE layer in model.num_layers={m.num_layers}")
        _check_routing(moe)
    require(moe.num_experts > 0 or not (moe.layer_num_experts or moe.skip_beta),
            "moe.layer_num_experts, moe.skip_beta: need an MoE model (moe.num_experts > 0)")
    _check_pruned_layers(m, moe)
    G = m.upcycle_granularity
    if m.upcycle_from:
        require(moe.num_experts > 0, "model.upcycle_from: needs an MoE model to upcycle into (moe.num_experts > 0)")
        require(moe.num_experts % G == 0 and moe.top_k % G == 0,
                f"model.upcycle_granularity={G} must divide moe.num_experts={moe.num_experts} and moe.top_k={moe.top_k}")


def _check_attention(m: ModelConfig) -> None:
    if m.attention == "mla":
        dims = {"model.mla_kv_lora_rank": m.mla_kv_lora_rank, "model.mla_qk_nope_head_dim": m.mla_qk_nope_head_dim,
                "model.mla_qk_rope_head_dim": m.mla_qk_rope_head_dim, "model.mla_v_head_dim": m.mla_v_head_dim}
        for key, value in dims.items():
            require(value > 0, f"{key}: must be > 0 with model.attention=mla, got {value}")
        require(m.mla_qk_rope_head_dim % 2 == 0, f"model.mla_qk_rope_head_dim={m.mla_qk_rope_head_dim} must be even for RoPE")
        require(not m.qk_norm and m.clip_qkv == 0 and not m.qk_norm_per_head and m.partial_rotary_factor == 1.0
                and m.sliding_window == 0 and not m.attn_sinks, "model.qk_norm, model.qk_norm_per_head, "
                "model.clip_qkv, model.partial_rotary_factor, model.sliding_window, model.attn_sinks: gqa options, "
                "not for model.attention=mla")
        return
    require(not (m.qk_norm and m.qk_norm_per_head), "model.qk_norm and model.qk_norm_per_head: choose one")
    require(all(0 <= i < m.num_layers for i in m.sliding_window_layers),
            f"model.sliding_window_layers={m.sliding_window_layers}: layer ids must be in [0, {m.num_layers})")
    if m.head_dim == 0:
        require(m.d_model % m.num_heads == 0,
                f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads} (or set model.head_dim)")
    rotary = int(m.resolved_head_dim * m.partial_rotary_factor)
    require(rotary > 0 and rotary % 2 == 0, f"model head_dim x model.partial_rotary_factor = {rotary} channels: "
                                             f"must be even and > 0 for RoPE")
    require(m.sliding_window > 0 or not m.sliding_window_layers, "model.sliding_window_layers: needs model.sliding_window > 0")


def _check_routing(moe: MoEConfig) -> None:
    """Routing, balancing and capacity fields of an MoE model (num_experts > 0)."""
    E, tc = moe.num_experts, moe.routing == "token_choice"
    if moe.num_groups > 0:
        G = moe.num_groups
        require(tc, "moe.num_groups: group-limited routing needs moe.routing=token_choice")
        require(E % G == 0, f"moe.num_groups={G} does not divide moe.num_experts={E}")
        require(1 <= moe.topk_group <= G, f"moe.topk_group={moe.topk_group} must be between 1 and moe.num_groups={G}")
        require(moe.top_k <= moe.topk_group * (E // G),
                f"moe.top_k={moe.top_k} exceeds the {moe.topk_group * (E // G)} experts "
                f"in moe.topk_group={moe.topk_group} groups")
    require(moe.topk_group == 0 or moe.num_groups > 0, f"moe.topk_group={moe.topk_group} needs moe.num_groups > 0")
    require(tc or not moe.aux_free, "moe.aux_free: needs moe.routing=token_choice (expert choice is balanced already)")
    require(not moe.pad_to_capacity or moe.capacity_factor > 0 or not tc,
            "moe.pad_to_capacity: needs moe.capacity_factor > 0 (dropless chunks have no fixed size)")
    require(not moe.shared_expert_gate or moe.num_shared_experts > 0,
            "moe.shared_expert_gate: needs moe.num_shared_experts > 0")


def _check_pruned_layers(m: ModelConfig, moe: MoEConfig) -> None:
    """moe.layer_num_experts and moe.skip_beta: one entry per MoE layer."""
    n = len(moe_layer_ids(m, moe))
    counts = moe.layer_num_experts
    if counts:
        require(len(counts) == n, f"moe.layer_num_experts has {len(counts)} entries for {n} MoE layers")
        require(all(E >= 1 for E in counts), f"moe.layer_num_experts={counts}: every layer needs >= 1 expert")
        require(moe.num_experts == max(counts),
                f"moe.num_experts={moe.num_experts} must equal max(moe.layer_num_experts)={max(counts)}")
        require(moe.num_groups == 0, "moe.layer_num_experts: per-layer counts do not support group-limited "
                                     "routing (moe.num_groups > 0)")
    if moe.skip_beta:
        require(len(moe.skip_beta) == n, f"moe.skip_beta has {len(moe.skip_beta)} entries for {n} MoE layers")
        require(all(0.0 <= b <= 1.0 for b in moe.skip_beta), f"moe.skip_beta={moe.skip_beta}: each must be in [0, 1]")
        require(moe.routing == "token_choice", "moe.skip_beta: dynamic skipping needs moe.routing=token_choice")
        require(moe.top_k >= 2, f"moe.skip_beta: skips a token's 2nd expert; needs moe.top_k >= 2, got {moe.top_k}")
