"""The dots.llm1 family (model_type "dots1"): Qwen3-MoE's attention (per-head q/k RMSNorm, one
attention_bias) with DeepSeek-V3's routing (sigmoid, e_score_correction_bias, groups scored by
their top 2, routed_scaling_factor), shared experts, the first k layers dense, and a sliding
window on the layers layer_types marks "sliding_attention"."""
from __future__ import annotations

from models.hf.family_base import Family, gqa_problems, HFFormatError, read_common, write_common
from models.hf.family_glm4_moe import sigmoid_moe_keys, sigmoid_moe_out, sigmoid_moe_problems

LAYER_TYPES = ("full_attention", "sliding_attention")


def _dots1_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=152064, num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6,
             hidden_act="silu", rope_theta=1e4)
    model = read_common(hf, d, where)
    L, window = model["num_layers"], hf.get("sliding_window")
    # transformers' default when config.json has no layer_types
    first_windowed = hf["max_window_layers"] if hf.get("max_window_layers") is not None else 62
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= first_windowed
                                      else "full_attention" for i in range(L)]
    if len(types) != L or set(types) - set(LAYER_TYPES):
        raise HFFormatError(f"{where}: layer_types={types}: expected {L} of {', '.join(LAYER_TYPES)}")
    windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    bias = bool(hf.get("attention_bias", False))
    model.update(head_dim=hf.get("head_dim") or 0, ffn_dim=hf.get("intermediate_size", 10944), qkv_bias=bias,
                 attn_out_bias=bias, qk_norm_per_head=True)
    if windowed:
        model.update(sliding_window=int(window), sliding_window_layers=windowed)
    E = hf.get("n_routed_experts") or hf.get("num_local_experts")
    if not E:
        raise HFFormatError(f"{where}: no n_routed_experts")
    moe = sigmoid_moe_keys({"norm_topk_prob": False, **hf}, E, hf.get("moe_intermediate_size", 1408), 1.0)
    return {"model": model, "moe": moe}


def _dots1_problems(m, moe) -> list[str]:
    out = gqa_problems(m, qkv_bias=None, out_bias=None, qk_norm_per_head=True, window=True)
    if m.qkv_bias != m.attn_out_bias:
        out.append("model.qkv_bias != model.attn_out_bias (dots1 has one attention_bias)")
    return out + sigmoid_moe_problems(moe, "dots1")


def _dots1_out(m, moe) -> dict:
    hf = write_common(m, "dots1", "Dots1ForCausalLM")
    windowed = set(m.sliding_window_layers or range(m.num_layers)) if m.sliding_window else set()
    types = ["sliding_attention" if i in windowed else "full_attention" for i in range(m.num_layers)]
    hf.update(sigmoid_moe_out(moe), head_dim=m.resolved_head_dim, intermediate_size=m.ffn_dim,
              attention_bias=m.qkv_bias, sliding_window=m.sliding_window or None, layer_types=types,
              max_window_layers=m.num_layers)
    return hf


FAMILY = Family("dots1", "Dots1ForCausalLM", _dots1_in, _dots1_problems, _dots1_out)
