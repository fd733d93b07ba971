"""The DeepSeek-V3 family (model_type "deepseek_v3"): MLA, sigmoid group-limited routing with the
aux-free selection bias, shared experts, the first k layers dense."""
from __future__ import annotations

from models.hf.family_base import Family, moe_keys, read_common, write_common


def _deepseek_v3_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=129280, num_key_value_heads=None, max_position_embeddings=4096, rms_norm_eps=1e-6,
             hidden_act="silu", rope_theta=1e4)
    model = read_common(hf, d, where)
    bias = bool(hf.get("attention_bias", False))
    model.update(num_kv_heads=model["num_heads"], ffn_dim=hf.get("intermediate_size", 18432), attention="mla",
                 qkv_bias=bias, attn_out_bias=bias, mla_q_lora_rank=hf.get("q_lora_rank") or 0,
                 mla_kv_lora_rank=hf.get("kv_lora_rank", 512), mla_qk_nope_head_dim=hf.get("qk_nope_head_dim", 128),
                 mla_qk_rope_head_dim=hf.get("qk_rope_head_dim", 64), mla_v_head_dim=hf.get("v_head_dim") or 128)
    F_ = hf.get("moe_intermediate_size", 2048)
    E = hf.get("n_routed_experts", 256)
    groups = hf.get("n_group") or 1
    # Selection uses scores + e_score_correction_bias: held by our aux-free bias buffer.
    moe = moe_keys(num_experts=E, top_k=hf.get("num_experts_per_tok", 8), expert_ffn_dim=F_,
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
    if moe.num_groups and moe.group_score != "top2_sum":
        out.append(f"moe.group_score={moe.group_score} (DeepSeek-V3 scores a group by its top 2)")
    if moe.num_experts // max(moe.num_groups, 1) < 2:
        out.append("expert groups of one expert (transformers scores a group by its top 2)")
    return out


def _deepseek_v3_out(m, moe) -> dict:
    hf = write_common(m, "deepseek_v3", "DeepseekV3ForCausalLM")
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


FAMILY = Family("deepseek_v3", "DeepseekV3ForCausalLM", _deepseek_v3_in, _deepseek_v3_problems,
                _deepseek_v3_out)
