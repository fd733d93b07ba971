"""What every Hugging Face family module (models/hf/family_*.py) shares: the keys an import sets,
the one-line error, the `Family` record, and the config.json readers and writers common to the
GQA families. Pure: no transformers, no files, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ARCH_KEYS = {
    "model": ("family", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
              "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings", "attention", "qkv_bias", "attn_out_bias",
              "qk_norm", "clip_qkv", "mla_q_lora_rank", "mla_kv_lora_rank", "mla_qk_nope_head_dim",
              "mla_qk_rope_head_dim", "mla_v_head_dim", "qk_norm_per_head", "partial_rotary_factor",
              "rope_scaling", "rope_factor", "rope_original_max_seq_len", "rope_beta_fast", "rope_beta_slow",
              "rope_mscale", "rope_mscale_all_dim", "rope_attention_factor", "rope_truncate",
              "attn_sinks", "sliding_window", "sliding_window_layers"),
    "moe": ("num_experts", "top_k", "expert_ffn_dim", "moe_every", "first_k_dense", "num_shared_experts",
            "shared_expert_ffn_dim", "shared_expert_gate", "routing", "score_func", "renormalize", "num_groups",
            "topk_group", "routed_scaling_factor", "aux_free", "layer_num_experts", "group_score",
            "router_bias", "expert_bias", "expert_act", "swiglu_alpha", "swiglu_limit"),
}


class HFFormatError(ValueError):
    """A Hugging Face checkpoint we cannot read or write, as one line naming the file or key."""


# transformers' rope_type -> model.rope_scaling, and the optional YaRN fields -> our keys.
_ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn"}
_YARN_FIELDS = {"beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "mscale": "rope_mscale",
                "mscale_all_dim": "rope_mscale_all_dim", "attention_factor": "rope_attention_factor"}
NO_ROPE_SCALING = dict(rope_scaling="none", rope_factor=1.0, rope_original_max_seq_len=0, rope_beta_fast=32.0,
                       rope_beta_slow=1.0, rope_mscale=0.0, rope_mscale_all_dim=0.0, rope_attention_factor=0.0,
                       rope_truncate=True)


def rope_params_of(hf: dict) -> dict:
    """The RoPE dict: `rope_parameters` (transformers 5), over which 4.x's `rope_scaling` wins
    (as transformers 5 itself reads a config.json holding both)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    if scaling:
        scaling.setdefault("rope_type", scaling.get("type"))
        params = {"rope_theta": params.get("rope_theta"), **scaling}
    return params


def rope_theta_of(hf: dict, default_theta: float, where: str) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or `rope_theta` (4.x)."""
    return float(rope_params_of(hf).get("rope_theta") or hf.get("rope_theta") or default_theta)


def rope_scaling_of(hf: dict, max_seq_len: int, where: str) -> dict:
    """Our model.rope_* keys from config.json's RoPE dict; HFFormatError for a scaling we lack."""
    params = rope_params_of(hf)
    kind = params.get("rope_type") or "default"
    if kind not in _ROPE_TYPES:
        raise HFFormatError(f"{where}: RoPE scaling {kind!r} is not supported (only {', '.join(_ROPE_TYPES)})")
    out = dict(NO_ROPE_SCALING, rope_scaling=_ROPE_TYPES[kind])
    if kind == "default":
        return out
    original = params.get("original_max_position_embeddings") or max_seq_len
    factor = params.get("factor")
    if factor is None and kind == "yarn":  # transformers: the context ratio
        factor = max_seq_len / original
    if factor is None:
        raise HFFormatError(f"{where}: RoPE scaling {kind!r} without a factor")
    # dynamic NTK rescales beyond max_position_embeddings, which is its original context.
    out.update(rope_factor=float(factor), rope_original_max_seq_len=int(max_seq_len if kind == "dynamic" else original))
    if kind == "yarn":
        out.update({ours: float(params[key]) for key, ours in _YARN_FIELDS.items() if params.get(key)})
        out["rope_truncate"] = bool(params.get("truncate", True))
    return out


def rope_parameters_out(m) -> dict:
    """config.json's RoPE keys for our model `m`: rope_parameters (transformers 5), rope_theta and,
    when scaled, rope_scaling (4.x)."""
    theta = float(m.rope_theta)
    kind = {ours: hf for hf, ours in _ROPE_TYPES.items()}[m.rope_scaling]
    params = {"rope_type": kind, "rope_theta": theta}
    if kind != "default":
        params["factor"] = float(m.rope_factor)
    if kind == "yarn":
        params.update(original_max_position_embeddings=m.rope_original_max_seq_len or m.max_seq_len,
                      beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow, truncate=m.rope_truncate)
        params.update({key: getattr(m, ours) for key, ours in _YARN_FIELDS.items()
                       if ours not in ("rope_beta_fast", "rope_beta_slow") and getattr(m, ours)})
    out = {"rope_parameters": params, "rope_theta": theta}
    if kind != "default":
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    if kind == "dynamic":  # its original context is max_position_embeddings
        out["max_position_embeddings"] = m.rope_original_max_seq_len or m.max_seq_len
    return out


def read_common(hf: dict, d: dict, where: str) -> dict:
    """Model keys every family reads the same way; `d` holds the family's config defaults."""
    def get(key):
        return hf[key] if hf.get(key) is not None else d.get(key)

    if get("hidden_act") != "silu":
        raise HFFormatError(f"{where}: hidden_act={get('hidden_act')!r}; only silu (SwiGLU) experts are supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if get(key) is None:
            raise HFFormatError(f"{where}: no {key}")
    heads = get("num_attention_heads")
    return dict(family="llm", vocab_size=get("vocab_size"), d_model=get("hidden_size"),
                num_layers=get("num_hidden_layers"), num_heads=heads,
                num_kv_heads=get("num_key_value_heads") or heads, head_dim=0,
                max_seq_len=get("max_position_embeddings"), rope_theta=rope_theta_of(hf, d["rope_theta"], where),
                norm_eps=float(get("rms_norm_eps")), tie_embeddings=bool(get("tie_word_embeddings")),
                attention="gqa", qkv_bias=False, attn_out_bias=False, qk_norm=False, clip_qkv=0.0,
                mla_q_lora_rank=0, mla_kv_lora_rank=512, mla_qk_nope_head_dim=128, mla_qk_rope_head_dim=64,
                mla_v_head_dim=128, qk_norm_per_head=False, partial_rotary_factor=1.0, attn_sinks=False,
                sliding_window=0, sliding_window_layers=[], **rope_scaling_of(hf, get("max_position_embeddings"), where))


def moe_keys(**kw) -> dict:
    base = dict(moe_every=1, first_k_dense=0, num_shared_experts=0, shared_expert_ffn_dim=0,
                shared_expert_gate=False, routing="token_choice", score_func="softmax", renormalize=True,
                num_groups=0, topk_group=0, routed_scaling_factor=1.0, aux_free=False, layer_num_experts=[],
                group_score="top2_sum", router_bias=False, expert_bias=False, expert_act="swiglu", swiglu_alpha=1.702,
                swiglu_limit=7.0)
    return {**base, **kw}


def write_common(m, model_type: str, architecture: str) -> dict:
    hf = {"architectures": [architecture], "model_type": model_type, "vocab_size": m.vocab_size,
            "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads, "max_position_embeddings": m.max_seq_len,
            "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
            "initializer_range": m.init_std, "attention_dropout": 0.0, "use_cache": True}
    # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta (and rope_scaling).
    hf.update(rope_parameters_out(m))
    return hf


def moe_layers(model, moe) -> list[int]:
    return [i for i in range(model.num_layers)
            if moe.num_experts > 0 and i >= moe.first_k_dense and (i - moe.first_k_dense) % moe.moe_every == 0]


def common_problems(m, moe) -> list[str]:
    out = []
    if m.family != "llm":
        out.append(f"model.family={m.family} (only LLMs have a Hugging Face form here)")
    if moe.num_experts <= 0:
        out.append("a dense model (moe.num_experts=0)")
    if moe.routing != "token_choice":
        out.append(f"moe.routing={moe.routing}")
    if moe.layer_num_experts and len(set(moe.layer_num_experts)) > 1:
        out.append(f"per-layer expert counts moe.layer_num_experts={moe.layer_num_experts}")
    return out


def gpt_oss_feature_problems(m, moe) -> list[str]:
    """The gpt-oss features (sinks, router and expert biases, the clamped SwiGLU) that every
    other family lacks (sliding windows: `gqa_problems`, several families have them)."""
    out = []
    if m.attn_sinks:
        out.append("attention sinks (model.attn_sinks)")
    if moe.router_bias:
        out.append("a router bias (moe.router_bias)")
    if moe.expert_bias:
        out.append("expert biases (moe.expert_bias)")
    if moe.expert_act != "swiglu":
        out.append(f"moe.expert_act={moe.expert_act}")
    return out


def gqa_problems(m, *, qkv_bias, out_bias, qk_norm: bool = False, clip: bool = False,
                 qk_norm_per_head: bool | None = False, partial_rotary: bool = False,
                 window: bool = False) -> list[str]:
    """What a GQA family without these options cannot hold (None: either value is fine)."""
    out = []
    if m.attention != "gqa":
        out.append(f"model.attention={m.attention}")
    if qkv_bias is not None and m.qkv_bias != qkv_bias:
        out.append(f"model.qkv_bias={m.qkv_bias}")
    if out_bias is not None and m.attn_out_bias != out_bias:
        out.append(f"model.attn_out_bias={m.attn_out_bias}")
    if m.qk_norm != qk_norm:
        out.append(f"model.qk_norm={m.qk_norm}")
    if m.clip_qkv and not clip:
        out.append(f"model.clip_qkv={m.clip_qkv}")
    if qk_norm_per_head is not None and m.qk_norm_per_head != qk_norm_per_head:
        out.append(f"model.qk_norm_per_head={m.qk_norm_per_head}")
    if m.partial_rotary_factor != 1.0 and not partial_rotary:
        out.append(f"model.partial_rotary_factor={m.partial_rotary_factor}")
    if m.sliding_window and not window:
        out.append(f"sliding-window attention (model.sliding_window={m.sliding_window})")
    return out


def softmax_problems(moe, *, shared: bool = False, gate: bool = False) -> list[str]:
    out = []
    if moe.score_func != "softmax":
        out.append(f"moe.score_func={moe.score_func}")
    if moe.num_groups:
        out.append("group-limited routing (moe.num_groups)")
    if moe.routed_scaling_factor != 1.0:
        out.append(f"moe.routed_scaling_factor={moe.routed_scaling_factor}")
    if moe.aux_free:
        out.append("the aux-free selection bias (moe.aux_free)")
    if not shared and moe.num_shared_experts:
        out.append("shared experts")
    if shared and moe.num_shared_experts and moe.shared_expert_gate != gate:
        out.append(f"moe.shared_expert_gate={moe.shared_expert_gate}")
    return out


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    to_ours: Callable[[dict, str], dict]  # (config.json dict, where) -> {"model": ..., "moe": ...}
    problems: Callable[..., list[str]]  # (ModelConfig, MoEConfig) -> what this family cannot hold
    to_hf: Callable[..., dict]  # (ModelConfig, MoEConfig) -> config.json dict
    gpt_oss_features: bool = False  # True: `problems` judges sinks, windows, biases, the clamped SwiGLU

    def check(self, model_cfg, moe_cfg) -> None:
        found = common_problems(model_cfg, moe_cfg) + self.problems(model_cfg, moe_cfg)
        if not self.gpt_oss_features:
            found += gpt_oss_feature_problems(model_cfg, moe_cfg)
        if found:
            raise HFFormatError(f"{self.model_type} cannot express: {'; '.join(found)}")
