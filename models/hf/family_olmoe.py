"""The OLMoE family (model_type "olmoe"): GQA with q/k RMSNorm over all heads and q/k/v clamping."""
from __future__ import annotations

from models.hf.family_base import Family, gqa_problems, moe_keys, read_common, softmax_problems, write_common


def _olmoe_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=50304, num_key_value_heads=None, max_position_embeddings=4096, rms_norm_eps=1e-5,
             hidden_act="silu", rope_theta=1e4)
    model = read_common(hf, d, where)
    bias = bool(hf.get("attention_bias", False))
    model.update(ffn_dim=hf.get("intermediate_size", 2048), qk_norm=True, qkv_bias=bias, attn_out_bias=bias,
                 clip_qkv=float(hf.get("clip_qkv") or 0.0))
    moe = moe_keys(num_experts=hf.get("num_experts", 64), top_k=hf.get("num_experts_per_tok", 8),
               expert_ffn_dim=model["ffn_dim"], renormalize=bool(hf.get("norm_topk_prob", False)))
    return {"model": model, "moe": moe}


def _olmoe_problems(m, moe) -> list[str]:
    out = gqa_problems(m, qkv_bias=None, out_bias=None, qk_norm=True, clip=True) + softmax_problems(moe)
    if m.qkv_bias != m.attn_out_bias:
        out.append("model.qkv_bias != model.attn_out_bias (OLMoE has one attention_bias)")
    if m.head_dim and m.head_dim * m.num_heads != m.d_model:
        out.append(f"model.head_dim={m.head_dim} x num_heads != d_model (OLMoE's q norm spans d_model)")
    if moe.first_k_dense or moe.moe_every != 1:
        out.append("dense layers (moe.first_k_dense / moe.moe_every)")
    return out


def _olmoe_out(m, moe) -> dict:
    hf = write_common(m, "olmoe", "OlmoeForCausalLM")
    hf.update(intermediate_size=moe.expert_ffn_dim, num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
              norm_topk_prob=moe.renormalize, attention_bias=m.qkv_bias, clip_qkv=m.clip_qkv or None)
    return hf


FAMILY = Family("olmoe", "OlmoeForCausalLM", _olmoe_in, _olmoe_problems, _olmoe_out)
