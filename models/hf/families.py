"""Hugging Face model families: their config.json <-> our model and moe config keys.

    FAMILIES                       model_type -> Family (mixtral, qwen2_moe, olmoe, deepseek_v3)
    family_of(hf_cfg, where)       the Family of a parsed config.json, or HFFormatError
    ARCH_KEYS                      the keys an import sets (every one of them, every time)

`Family.to_ours(hf_cfg)` returns {"model": {...}, "moe": {...}} with a value for every key of
ARCH_KEYS, so merged over a recipe it replaces the whole architecture and leaves the training
choices (loss coefficients, capacity, backend, ...) to the recipe. `Family.problems(model, moe)`
lists what the family cannot express; `Family.to_hf(model, moe)` is the config.json dict.
Pure: no transformers, no files. Shapes are checked again when the weights are converted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ARCH_KEYS = {
    "model": ("family", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
              "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings", "attention", "qkv_bias", "attn_out_bias",
              "qk_norm", "clip_qkv", "mla_q_lora_rank", "mla_kv_lora_rank", "mla_qk_nope_head_dim",
              "mla_qk_rope_head_dim", "mla_v_head_dim"),
    "moe": ("num_experts", "top_k", "expert_ffn_dim", "moe_every", "first_k_dense", "num_shared_experts",
            "shared_expert_ffn_dim", "shared_expert_gate", "routing", "score_func", "renormalize", "num_groups",
            "topk_group", "routed_scaling_factor", "aux_free", "layer_num_experts"),
}


class HFFormatError(ValueError):
    """A Hugging Face checkpoint we cannot read or write, as one line naming the file or key."""


def _rope(hf: dict, default_theta: float, where: str) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise HFFormatError(f"{where}: RoPE scaling {kind!r} is not supported (only the default RoPE)")
    return float(params.get("rope_theta") or hf.get("rope_theta") or default_theta)


def _common(hf: dict, d: dict, where: str) -> dict:
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
                max_seq_len=get("max_position_embeddings"), rope_theta=_rope(hf, d["rope_theta"], where),
                norm_eps=float(get("rms_norm_eps")), tie_embeddings=bool(get("tie_word_embeddings")),
                attention="gqa", qkv_bias=False, attn_out_bias=False, qk_norm=False, clip_qkv=0.0,
                mla_q_lora_rank=0, mla_kv_lora_rank=512, mla_qk_nope_head_dim=128, mla_qk_rope_head_dim=64,
                mla_v_head_dim=128)


def _moe(**kw) -> dict:
    base = dict(moe_every=1, first_k_dense=0, num_shared_experts=0, shared_expert_ffn_dim=0,
                shared_expert_gate=False, routing="token_choice", score_func="softmax", renormalize=True,
                num_groups=0, topk_group=0, routed_scaling_factor=1.0, aux_free=False, layer_num_experts=[])
    return {**base, **kw}


def _hf_common(m, model_type: str, architecture: str) -> dict:
    theta = float(m.rope_theta)
    return {"architectures": [architecture], "model_type": model_type, "vocab_size": m.vocab_size,
            "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads, "max_position_embeddings": m.max_seq_len,
            "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
            "initializer_range": m.init_std, "attention_dropout": 0.0, "use_cache": True,
            # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
            "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta}


def _moe_layers(model, moe) -> list[int]:
    return [i for i in range(model.num_layers)
            if moe.num_experts > 0 and i >= moe.first_k_dense and (i - moe.first_k_dense) % moe.moe_every == 0]


def _common_problems(m, moe) -> list[str]:
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


def _gqa_problems(m, *, qkv_bias, out_bias, qk_norm: bool = False, clip: bool = False) -> list[str]:
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
    return out


def _softmax_problems(moe, *, shared: bool = False, gate: bool = False) -> list[str]:
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


# -- Mixtral --------------------------------------------------------------------------------------

def _mixtral_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=32000, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
             hidden_act="silu", rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, intermediate_size=14336)
    model = _common(hf, d, where)
    window = hf.get("sliding_window")
    if window is not None and window < model["max_seq_len"]:
        raise HFFormatError(f"{where}: sliding_window={window} (sliding-window attention is not supported)")
    model.update(head_dim=hf.get("head_dim") or 0, ffn_dim=hf.get("intermediate_size") or d["intermediate_size"])
    moe = _moe(num_experts=hf.get("num_local_experts") or d["num_local_experts"],
               top_k=hf.get("num_experts_per_tok") or d["num_experts_per_tok"], expert_ffn_dim=model["ffn_dim"])
    return {"model": model, "moe": moe}


def _mixtral_problems(m, moe) -> list[str]:
    out = _gqa_problems(m, qkv_bias=False, out_bias=False) + _softmax_problems(moe)
    if not moe.renormalize:
        out.append("moe.renormalize=false (Mixtral renormalises the top-k weights)")
    if moe.first_k_dense or moe.moe_every != 1:
        out.append("dense layers (moe.first_k_dense / moe.moe_every)")
    return out


def _mixtral_out(m, moe) -> dict:
    hf = _hf_common(m, "mixtral", "MixtralForCausalLM")
    hf.update(head_dim=m.head_dim or m.d_model // m.num_heads, intermediate_size=moe.expert_ffn_dim,
              num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k, sliding_window=None,
              router_jitter_noise=0.0)
    return hf


# -- Qwen2-MoE ------------------------------------------------------------------------------------

def _qwen2_moe_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=151936, num_key_value_heads=16, max_position_embeddings=32768, rms_norm_eps=1e-6,
             hidden_act="silu", rope_theta=1e4)
    model = _common(hf, d, where)
    if hf.get("use_sliding_window"):
        raise HFFormatError(f"{where}: use_sliding_window=true (sliding-window attention is not supported)")
    L, E = model["num_layers"], hf.get("num_experts", 60)
    step, dense_only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or [])
    sparse = [i for i in range(L) if i not in dense_only and E > 0 and (i + 1) % step == 0]
    if not sparse:
        raise HFFormatError(f"{where}: no MoE layer (num_experts={E}, mlp_only_layers, decoder_sparse_step={step})")
    first, every = sparse[0], (sparse[1] - sparse[0] if len(sparse) > 1 else 1)
    if sparse != list(range(first, L, every)):
        raise HFFormatError(f"{where}: MoE layers {sparse} (mlp_only_layers={sorted(dense_only)}, decoder_sparse_"
                            f"step={step}) are not 'every k-th after the first k dense', which is all we express")
    shared = hf.get("shared_expert_intermediate_size", 5632) or 0
    model.update(head_dim=hf.get("head_dim") or 0, ffn_dim=hf.get("intermediate_size", 5632),
                 qkv_bias=bool(hf.get("qkv_bias", True)))
    moe = _moe(num_experts=E, top_k=hf.get("num_experts_per_tok", 4), expert_ffn_dim=hf.get("moe_intermediate_size", 1408),
               first_k_dense=first, moe_every=every, renormalize=bool(hf.get("norm_topk_prob", False)),
               num_shared_experts=1 if shared else 0, shared_expert_ffn_dim=shared, shared_expert_gate=bool(shared))
    return {"model": model, "moe": moe}


def _qwen2_moe_problems(m, moe) -> list[str]:
    out = _gqa_problems(m, qkv_bias=None, out_bias=False) + _softmax_problems(moe, shared=True, gate=True)
    if moe.num_shared_experts == 0:
        out.append("no shared expert (Qwen2-MoE always has a gated one)")
    return out


def _qwen2_moe_out(m, moe) -> dict:
    hf = _hf_common(m, "qwen2_moe", "Qwen2MoeForCausalLM")
    dense = [i for i in range(m.num_layers) if i not in _moe_layers(m, moe)]
    hf.update(intermediate_size=m.ffn_dim, moe_intermediate_size=moe.expert_ffn_dim, num_experts=moe.num_experts,
              num_experts_per_tok=moe.top_k, norm_topk_prob=moe.renormalize, qkv_bias=m.qkv_bias,
              shared_expert_intermediate_size=moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim),
              decoder_sparse_step=1, mlp_only_layers=dense, use_sliding_window=False)
    if m.head_dim and m.head_dim * m.num_heads != m.d_model:
        hf["head_dim"] = m.head_dim  # read with getattr(config, "head_dim", hidden // heads)
    return hf


# -- OLMoE ----------------------------------------------------------------------------------------

def _olmoe_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=50304, num_key_value_heads=None, max_position_embeddings=4096, rms_norm_eps=1e-5,
             hidden_act="silu", rope_theta=1e4)
    model = _common(hf, d, where)
    bias = bool(hf.get("attention_bias", False))
    model.update(ffn_dim=hf.get("intermediate_size", 2048), qk_norm=True, qkv_bias=bias, attn_out_bias=bias,
                 clip_qkv=float(hf.get("clip_qkv") or 0.0))
    moe = _moe(num_experts=hf.get("num_experts", 64), top_k=hf.get("num_experts_per_tok", 8),
               expert_ffn_dim=model["ffn_dim"], renormalize=bool(hf.get("norm_topk_prob", False)))
    return {"model": model, "moe": moe}


def _olmoe_problems(m, moe) -> list[str]:
    out = _gqa_problems(m, qkv_bias=None, out_bias=None, qk_norm=True, clip=True) + _softmax_problems(moe)
    if m.qkv_bias != m.attn_out_bias:
        out.append("model.qkv_bias != model.attn_out_bias (OLMoE has one attention_bias)")
    if m.head_dim and m.head_dim * m.num_heads != m.d_model:
        out.append(f"model.head_dim={m.head_dim} x num_heads != d_model (OLMoE's q norm spans d_model)")
    if moe.first_k_dense or moe.moe_every != 1:
        out.append("dense layers (moe.first_k_dense / moe.moe_every)")
    return out


def _olmoe_out(m, moe) -> dict:
    hf = _hf_common(m, "olmoe", "OlmoeForCausalLM")
    hf.update(intermediate_size=moe.expert_ffn_dim, num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
              norm_topk_prob=moe.renormalize, attention_bias=m.qkv_bias, clip_qkv=m.clip_qkv or None)
    return hf


# -- DeepSeek-V3 ----------------------------------------------------------------------------------

def _deepseek_v3_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=129280, num_key_value_heads=None, max_position_embeddings=4096, rms_norm_eps=1e-6,
             hidden_act="silu", rope_theta=1e4)
    model = _common(hf, d, where)
    bias = bool(hf.get("attention_bias", False))
    model.update(num_kv_heads=model["num_heads"], ffn_dim=hf.get("intermediate_size", 18432), attention="mla",
                 qkv_bias=bias, attn_out_bias=bias, mla_q_lora_rank=hf.get("q_lora_rank") or 0,
                 mla_kv_lora_rank=hf.get("kv_lora_rank", 512), mla_qk_nope_head_dim=hf.get("qk_nope_head_dim", 128),
                 mla_qk_rope_head_dim=hf.get("qk_rope_head_dim", 64), mla_v_head_dim=hf.get("v_head_dim") or 128)
    F_ = hf.get("moe_intermediate_size", 2048)
    E = hf.get("n_routed_experts", 256)
    groups = hf.get("n_group") or 1
    # Selection uses scores + e_score_correction_bias: held by our aux-free bias buffer.
    moe = _moe(num_experts=E, top_k=hf.get("num_experts_per_tok", 8), expert_ffn_dim=F_,
               first_k_dense=hf.get("first_k_dense_replace", 3) or 0, score_func="sigmoid",
               renormalize=bool(hf.get("norm_topk_prob", True)), num_groups=groups,
               topk_group=hf.get("topk_group") or groups, routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
               num_shared_experts=hf.get("n_shared_experts", 1) or 0, shared_expert_ffn_dim=F_, aux_free=True)
    return {"model": model, "moe": moe}


def _deepseek_v3_problems(m, moe) -> list[str]:
    out = []
    if m.attention != "mla":
        out.append(f"model.attention={m.attention} (DeepSeek-V3 has MLA)")
    if m.qkv_bias != m.attn_out_bias:
        out.append("model.qkv_bias != model.attn_out_bias (DeepSeek-V3 has one attention_bias)")
    if moe.score_func != "sigmoid":
        out.append(f"moe.score_func={moe.score_func} (DeepSeek-V3 scores with a sigmoid)")
    if moe.moe_every != 1:
        out.append(f"moe.moe_every={moe.moe_every} (only the first k layers may be dense)")
    if moe.shared_expert_gate:
        out.append("moe.shared_expert_gate")
    width = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    if width % moe.expert_ffn_dim:
        out.append(f"shared experts of total width {width}, not a multiple of moe.expert_ffn_dim={moe.expert_ffn_dim}")
    if moe.num_experts // max(moe.num_groups, 1) < 2:
        out.append("expert groups of one expert (transformers scores a group by its top 2)")
    return out


def _deepseek_v3_out(m, moe) -> dict:
    hf = _hf_common(m, "deepseek_v3", "DeepseekV3ForCausalLM")
    width = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    groups = moe.num_groups or 1  # one group holding every expert: no group limit
    hf.update(num_key_value_heads=m.num_heads, intermediate_size=m.ffn_dim, moe_intermediate_size=moe.expert_ffn_dim,
              n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k, n_group=groups,
              topk_group=moe.topk_group or groups, routed_scaling_factor=moe.routed_scaling_factor,
              norm_topk_prob=moe.renormalize, first_k_dense_replace=moe.first_k_dense,
              n_shared_experts=width // moe.expert_ffn_dim, q_lora_rank=m.mla_q_lora_rank or None,
              kv_lora_rank=m.mla_kv_lora_rank, qk_nope_head_dim=m.mla_qk_nope_head_dim,
              qk_rope_head_dim=m.mla_qk_rope_head_dim, v_head_dim=m.mla_v_head_dim, attention_bias=m.qkv_bias,
              # DeepSeek's own layout (RoPE channels in neighbouring pairs); export permutes to it.
              rope_interleave=True, num_nextn_predict_layers=0)
    return hf


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    to_ours: Callable[[dict, str], dict]  # (config.json dict, where) -> {"model": ..., "moe": ...}
    problems: Callable[..., list[str]]  # (ModelConfig, MoEConfig) -> what this family cannot hold
    to_hf: Callable[..., dict]  # (ModelConfig, MoEConfig) -> config.json dict

    def check(self, model_cfg, moe_cfg) -> None:
        found = _common_problems(model_cfg, moe_cfg) + self.problems(model_cfg, moe_cfg)
        if found:
            raise HFFormatError(f"{self.model_type} cannot express: {'; '.join(found)}")


FAMILIES = {f.model_type: f for f in (
    Family("mixtral", "MixtralForCausalLM", _mixtral_in, _mixtral_problems, _mixtral_out),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", _qwen2_moe_in, _qwen2_moe_problems, _qwen2_moe_out),
    Family("olmoe", "OlmoeForCausalLM", _olmoe_in, _olmoe_problems, _olmoe_out),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", _deepseek_v3_in, _deepseek_v3_problems, _deepseek_v3_out),
)}


def family_of(hf_cfg: dict, where: str) -> Family:
    """The family named by config.json's model_type; HFFormatError for any other."""
    model_type = hf_cfg.get("model_type")
    if model_type not in FAMILIES:
        raise HFFormatError(f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def infer_family(model_cfg, moe_cfg) -> Family:
    """The first family (in FAMILIES order) that expresses this architecture exactly."""
    reasons = []
    for family in FAMILIES.values():
        try:
            family.check(model_cfg, moe_cfg)
            return family
        except HFFormatError as e:
            reasons.append(str(e))
    raise HFFormatError("no Hugging Face family fits this model: " + " | ".join(reasons))
