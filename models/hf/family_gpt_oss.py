"""The gpt-oss family (model_type "gpt_oss"): GQA with q/k/v/o biases and per-head attention
sinks, sliding-window attention on the layers `layer_types` names, YaRN RoPE, a router with a bias
(softmax over the top-k logits), experts with biases and the clamped SwiGLU, every layer MoE."""
from __future__ import annotations

from models.hf.family_base import (Family, HFFormatError, gqa_problems, moe_keys, read_common, softmax_problems,
                                   write_common)

# What transformers' GptOssConfig assumes when config.json has no RoPE entry.
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gpt_oss_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=201088, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
             hidden_act="silu", rope_theta=150000.0)
    if hf.get("quantization_config"):
        raise HFFormatError(f"{where}: a quantised checkpoint ({hf['quantization_config'].get('quant_method')}); "
                            "save a dequantised copy with transformers first (Mxfp4Config(dequantize=True))")
    if not hf.get("rope_parameters") and not hf.get("rope_scaling"):
        hf = {**hf, "rope_parameters": {**_DEFAULT_ROPE, "rope_theta": hf.get("rope_theta") or d["rope_theta"]}}
    model = read_common(hf, d, where)
    L = model["num_layers"]
    types = hf.get("layer_types") or [_LAYER_TYPES[(i + 1) % 2] for i in range(L)]
    if len(types) != L or any(t not in _LAYER_TYPES for t in types):
        raise HFFormatError(f"{where}: layer_types={types} (expected {L} of {', '.join(_LAYER_TYPES)})")
    window = hf.get("sliding_window") or 0
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"] if window else []
    bias = bool(hf.get("attention_bias", True))
    F_ = hf.get("intermediate_size", 2880)
    model.update(head_dim=hf.get("head_dim") or 64, ffn_dim=F_, qkv_bias=bias, attn_out_bias=bias, attn_sinks=True,
                 sliding_window=window if sliding else 0, sliding_window_layers=sliding)
    moe = moe_keys(num_experts=hf.get("num_local_experts", 128), top_k=hf.get("num_experts_per_tok", 4),
                   expert_ffn_dim=F_, renormalize=True, router_bias=True, expert_bias=True, expert_act="clamped_swiglu",
                   swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0)))
    return {"model": model, "moe": moe}


def _gpt_oss_problems(m, moe) -> list[str]:
    out = gqa_problems(m, qkv_bias=None, out_bias=None, window=True) + softmax_problems(moe)
    if m.qkv_bias != m.attn_out_bias:
        out.append("model.qkv_bias != model.attn_out_bias (gpt-oss has one attention_bias)")
    if not m.attn_sinks:
        out.append("no attention sinks (gpt-oss has them: model.attn_sinks=true)")
    if not moe.renormalize:
        out.append("moe.renormalize=false (gpt-oss takes a softmax over the top-k logits)")
    if not (moe.router_bias and moe.expert_bias):
        out.append("no router or expert biases (gpt-oss has both: moe.router_bias, moe.expert_bias)")
    if moe.expert_act != "clamped_swiglu":
        out.append(f"moe.expert_act={moe.expert_act} (gpt-oss's experts use clamped_swiglu)")
    if moe.first_k_dense or moe.moe_every != 1:
        out.append("dense layers (moe.first_k_dense / moe.moe_every)")
    return out


def _gpt_oss_out(m, moe) -> dict:
    hf = write_common(m, "gpt_oss", "GptOssForCausalLM")
    sliding = set(m.sliding_window_layers or range(m.num_layers)) if m.sliding_window else set()
    hf.update(head_dim=m.head_dim or m.d_model // m.num_heads, intermediate_size=moe.expert_ffn_dim,
              num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k, attention_bias=m.qkv_bias,
              sliding_window=m.sliding_window or None, swiglu_alpha=moe.swiglu_alpha, swiglu_limit=moe.swiglu_limit,
              layer_types=[_LAYER_TYPES[0] if i in sliding else _LAYER_TYPES[1] for i in range(m.num_layers)],
              router_aux_loss_coef=0.0, output_router_logits=False)
    return hf


FAMILY = Family("gpt_oss", "GptOssForCausalLM", _gpt_oss_in, _gpt_oss_problems, _gpt_oss_out, gpt_oss_features=True)
