"""The DeepSeek-V2 family (model_type "deepseek_v2"): MLA (RoPE in neighbouring pairs, always),
softmax routing, greedy or group-limited (a group scored by its best expert), routed_scaling_factor,
shared experts, the first k layers dense.

transformers (5.25) builds MoE on every layer from first_k_dense_replace on, ignoring
moe_layer_freq, and never renormalises the top-k weights, ignoring norm_topk_prob; DeepSeek's own
code honours both. No release sets them (freq 1, false), so other values are refused on import
rather than read one way or the other.
"""
from __future__ import annotations

from models.hf.family_base import Family, HFFormatError, moe_keys, read_common, write_common

TOPK_METHODS = ("greedy", "group_limited_greedy")


def mla_keys(hf: dict) -> dict:
    """MLA's model keys from a DeepSeek config.json (V2 and V3 name them alike)."""
    bias = bool(hf.get("attention_bias", False))
    return dict(attention="mla", qkv_bias=bias, attn_out_bias=bias, mla_q_lora_rank=hf.get("q_lora_rank") or 0,
                mla_kv_lora_rank=hf.get("kv_lora_rank", 512), mla_qk_nope_head_dim=hf.get("qk_nope_head_dim", 128),
                mla_qk_rope_head_dim=hf.get("qk_rope_head_dim", 64), mla_v_head_dim=hf.get("v_head_dim") or 128)


def _deepseek_v2_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=102400, num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6,
             hidden_act="silu", rope_theta=1e4)
    model = read_common(hf, d, where)
    method = hf.get("topk_method") or "greedy"
    if method not in TOPK_METHODS:
        raise HFFormatError(f"{where}: topk_method={method!r}; transformers' DeepSeek-V2 has {', '.join(TOPK_METHODS)}")
    if (hf.get("moe_layer_freq") or 1) != 1:
        raise HFFormatError(f"{where}: moe_layer_freq={hf['moe_layer_freq']} (transformers ignores it and DeepSeek's "
                            f"code does not: which layers are MoE is ambiguous)")
    if hf.get("norm_topk_prob"):
        raise HFFormatError(f"{where}: norm_topk_prob=true (transformers' DeepSeek-V2 never renormalises and "
                            f"DeepSeek's code does: the routing weights are ambiguous)")
    if hf.get("mlp_bias"):
        raise HFFormatError(f"{where}: mlp_bias=true (biases on the dense and shared-expert MLPs are not supported)")
    model.update(num_kv_heads=model["num_heads"], ffn_dim=hf.get("intermediate_size", 11008), **mla_keys(hf))
    F_ = hf.get("moe_intermediate_size", 1407)
    E = hf.get("n_routed_experts") or hf.get("num_local_experts") or 64
    grouped = method == "group_limited_greedy"
    moe = moe_keys(num_experts=E, top_k=hf.get("num_experts_per_tok") or 6, expert_ffn_dim=F_,
                   first_k_dense=hf.get("first_k_dense_replace") or 0, renormalize=False,
                   num_groups=(hf.get("n_group") or 1) if grouped else 0,
                   topk_group=(hf.get("topk_group") or hf.get("n_group") or 1) if grouped else 0,
                   group_score="max", routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
                   num_shared_experts=hf.get("n_shared_experts") or 0, shared_expert_ffn_dim=F_)
    return {"model": model, "moe": moe}


def _deepseek_v2_problems(m, moe) -> list[str]:
    out = []
    if m.attention != "mla":
        out.append(f"model.attention={m.attention} (DeepSeek-V2 has MLA)")
    if m.qkv_bias != m.attn_out_bias:
        out.append("model.qkv_bias != model.attn_out_bias (DeepSeek-V2 has one attention_bias)")
    if moe.score_func != "softmax":
        out.append(f"moe.score_func={moe.score_func} (DeepSeek-V2 scores with a softmax)")
    if moe.renormalize:
        out.append("moe.renormalize=true (transformers' DeepSeek-V2 never renormalises)")
    if moe.aux_free:
        out.append("the aux-free selection bias (moe.aux_free)")
    if moe.num_groups and moe.group_score != "max":
        out.append(f"moe.group_score={moe.group_score} (DeepSeek-V2 scores a group by its best expert)")
    if moe.moe_every != 1:
        out.append(f"moe.moe_every={moe.moe_every} (only the first k layers may be dense)")
    if moe.shared_expert_gate:
        out.append("moe.shared_expert_gate")
    if moe.num_shared_experts == 0:
        out.append("no shared experts (DeepSeek-V2 always has them)")
    width = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    if width % moe.expert_ffn_dim:
        out.append(f"shared experts of total width {width}, not a multiple of moe.expert_ffn_dim={moe.expert_ffn_dim}")
    return out


def _deepseek_v2_out(m, moe) -> dict:
    hf = write_common(m, "deepseek_v2", "DeepseekV2ForCausalLM")
    width = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    grouped = moe.num_groups > 0
    hf.update(num_key_value_heads=m.num_heads, intermediate_size=m.ffn_dim, moe_intermediate_size=moe.expert_ffn_dim,
              n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
              topk_method="group_limited_greedy" if grouped else "greedy", n_group=moe.num_groups if grouped else None,
              topk_group=moe.topk_group if grouped else None, routed_scaling_factor=moe.routed_scaling_factor,
              norm_topk_prob=False, first_k_dense_replace=moe.first_k_dense, moe_layer_freq=1,
              n_shared_experts=width // moe.expert_ffn_dim, q_lora_rank=m.mla_q_lora_rank or None,
              kv_lora_rank=m.mla_kv_lora_rank, qk_nope_head_dim=m.mla_qk_nope_head_dim,
              qk_rope_head_dim=m.mla_qk_rope_head_dim, v_head_dim=m.mla_v_head_dim, attention_bias=m.qkv_bias,
              mlp_bias=False)
    return hf


FAMILY = Family("deepseek_v2", "DeepseekV2ForCausalLM", _deepseek_v2_in, _deepseek_v2_problems, _deepseek_v2_out)
