"""The Mixtral family (model_type "mixtral"): GQA, softmax top-k renormalised, every layer MoE."""
from __future__ import annotations

from models.hf.family_base import (Family, gqa_problems, HFFormatError, moe_keys, read_common, softmax_problems,
                                   write_common)


def _mixtral_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=32000, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
             hidden_act="silu", rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2, intermediate_size=14336)
    model = read_common(hf, d, where)
    window = hf.get("sliding_window")
    if window is not None and window < model["max_seq_len"]:
        raise HFFormatError(f"{where}: sliding_window={window} (sliding-window attention is not supported)")
    model.update(head_dim=hf.get("head_dim") or 0, ffn_dim=hf.get("intermediate_size") or d["intermediate_size"])
    moe = moe_keys(num_experts=hf.get("num_local_experts") or d["num_local_experts"],
               top_k=hf.get("num_experts_per_tok") or d["num_experts_per_tok"], expert_ffn_dim=model["ffn_dim"])
    return {"model": model, "moe": moe}


def _mixtral_problems(m, moe) -> list[str]:
    out = gqa_problems(m, qkv_bias=False, out_bias=False) + softmax_problems(moe)
    if not moe.renormalize:
        out.append("moe.renormalize=false (Mixtral renormalises the top-k weights)")
    if moe.first_k_dense or moe.moe_every != 1:
        out.append("dense layers (moe.first_k_dense / moe.moe_every)")
    return out


def _mixtral_out(m, moe) -> dict:
    hf = write_common(m, "mixtral", "MixtralForCausalLM")
    hf.update(head_dim=m.head_dim or m.d_model // m.num_heads, intermediate_size=moe.expert_ffn_dim,
              num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k, sliding_window=None,
              router_jitter_noise=0.0)
    return hf


FAMILY = Family("mixtral", "MixtralForCausalLM", _mixtral_in, _mixtral_problems, _mixtral_out)
