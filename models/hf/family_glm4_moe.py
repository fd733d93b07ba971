"""The GLM-4.5 family (model_type "glm4_moe"): GQA with q/k/v biases, RoPE on the first
partial_rotary_factor of each head (rotate-half), optional per-head q/k RMSNorm; DeepSeek-V3's
routing (sigmoid, e_score_correction_bias, groups scored by their top 2, routed_scaling_factor)
with shared experts and the first k layers dense."""
from __future__ import annotations

from models.hf.family_base import Family, gqa_problems, moe_keys, read_common, write_common


def sigmoid_moe_keys(hf: dict, E: int, F_: int, default_scale: float) -> dict:
    """The moe keys of DeepSeek-V3-style routing (glm4_moe, dots1): sigmoid scores whose selection
    adds e_score_correction_bias (our aux-free bias), groups scored by their top 2."""
    groups = hf.get("n_group") or 1
    return moe_keys(num_experts=E, top_k=hf.get("num_experts_per_tok") or 8, expert_ffn_dim=F_,
                    first_k_dense=hf.get("first_k_dense_replace") or 0, score_func="sigmoid",
                    renormalize=bool(hf.get("norm_topk_prob", True)), num_groups=groups,
                    topk_group=hf.get("topk_group") or groups,
                    routed_scaling_factor=float(hf.get("routed_scaling_factor") or default_scale),
                    num_shared_experts=hf.get("n_shared_experts") or 0, shared_expert_ffn_dim=F_, aux_free=True)


def sigmoid_moe_problems(moe, name: str) -> list[str]:
    out = []
    if moe.score_func != "sigmoid":
        out.append(f"moe.score_func={moe.score_func} ({name} scores with a sigmoid)")
    if moe.moe_every != 1:
        out.append(f"moe.moe_every={moe.moe_every} (only the first k layers may be dense)")
    if moe.shared_expert_gate:
        out.append("moe.shared_expert_gate")
    if moe.num_shared_experts == 0:
        out.append(f"no shared experts ({name} always has them)")
    width = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    if width % moe.expert_ffn_dim:
        out.append(f"shared experts of total width {width}, not a multiple of moe.expert_ffn_dim={moe.expert_ffn_dim}")
    if moe.num_groups and moe.group_score != "top2_sum":
        out.append(f"moe.group_score={moe.group_score} ({name} scores a group by its top 2)")
    if moe.num_experts // max(moe.num_groups, 1) < 2:
        out.append("expert groups of one expert (transformers scores a group by its top 2)")
    return out


def sigmoid_moe_out(moe) -> dict:
    width = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
    groups = moe.num_groups or 1  # one group holding every expert: no group limit
    return dict(moe_intermediate_size=moe.expert_ffn_dim, n_routed_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, n_group=groups, topk_group=moe.topk_group or groups,
                routed_scaling_factor=moe.routed_scaling_factor, norm_topk_prob=moe.renormalize,
                first_k_dense_replace=moe.first_k_dense, n_shared_experts=width // moe.expert_ffn_dim)


def _glm4_moe_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=151552, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
             hidden_act="silu", rope_theta=1e4)
    model = read_common(hf, d, where)
    # transformers 5 keeps it in rope_parameters, 4.x at the top; 0.5 when absent (GLM's default)
    factor = (hf.get("rope_parameters") or {}).get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 0.5
    model.update(head_dim=hf.get("head_dim") or 0, ffn_dim=hf.get("intermediate_size", 10944),
                 qkv_bias=bool(hf.get("attention_bias", False)), qk_norm_per_head=bool(hf.get("use_qk_norm", False)),
                 partial_rotary_factor=float(factor))
    F_ = hf.get("moe_intermediate_size", 1408)
    E = hf.get("n_routed_experts") or hf.get("num_local_experts") or 128
    moe = sigmoid_moe_keys({"n_shared_experts": 1, "first_k_dense_replace": 1, **hf}, E, F_, 1.0)
    return {"model": model, "moe": moe}


def _glm4_moe_problems(m, moe) -> list[str]:
    return (gqa_problems(m, qkv_bias=None, out_bias=False, qk_norm_per_head=None, partial_rotary=True)
            + sigmoid_moe_problems(moe, "GLM-4.5"))


def _glm4_moe_out(m, moe) -> dict:
    hf = write_common(m, "glm4_moe", "Glm4MoeForCausalLM")
    hf["rope_parameters"]["partial_rotary_factor"] = m.partial_rotary_factor
    hf.update(sigmoid_moe_out(moe), head_dim=m.resolved_head_dim, intermediate_size=m.ffn_dim,
              attention_bias=m.qkv_bias, use_qk_norm=m.qk_norm_per_head,
              partial_rotary_factor=m.partial_rotary_factor, num_nextn_predict_layers=0, num_mtp_layers=0)
    return hf


FAMILY = Family("glm4_moe", "Glm4MoeForCausalLM", _glm4_moe_in, _glm4_moe_problems, _glm4_moe_out)
