"""The Qwen2-MoE family (model_type "qwen2_moe"): GQA with q/k/v biases, a gated shared expert,
dense layers by index."""
from __future__ import annotations

from models.hf.family_base import (Family, gqa_problems, HFFormatError, moe_keys, moe_layers, read_common,
                                   softmax_problems, write_common)


def _qwen2_moe_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=151936, num_key_value_heads=16, max_position_embeddings=32768, rms_norm_eps=1e-6,
             hidden_act="silu", rope_theta=1e4)
    model = read_common(hf, d, where)
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
    moe = moe_keys(num_experts=E, top_k=hf.get("num_experts_per_tok", 4), expert_ffn_dim=hf.get("moe_intermediate_size", 1408),
               first_k_dense=first, moe_every=every, renormalize=bool(hf.get("norm_topk_prob", False)),
               num_shared_experts=1 if shared else 0, shared_expert_ffn_dim=shared, shared_expert_gate=bool(shared))
    return {"model": model, "moe": moe}


def _qwen2_moe_problems(m, moe) -> list[str]:
    out = gqa_problems(m, qkv_bias=None, out_bias=False) + softmax_problems(moe, shared=True, gate=True)
    if moe.num_shared_experts == 0:
        out.append("no shared expert (Qwen2-MoE always has a gated one)")
    return out


def _qwen2_moe_out(m, moe) -> dict:
    hf = write_common(m, "qwen2_moe", "Qwen2MoeForCausalLM")
    dense = [i for i in range(m.num_layers) if i not in moe_layers(m, moe)]
    hf.update(intermediate_size=m.ffn_dim, moe_intermediate_size=moe.expert_ffn_dim, num_experts=moe.num_experts,
              num_experts_per_tok=moe.top_k, norm_topk_prob=moe.renormalize, qkv_bias=m.qkv_bias,
              shared_expert_intermediate_size=moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim),
              decoder_sparse_step=1, mlp_only_layers=dense, use_sliding_window=False)
    if m.head_dim and m.head_dim * m.num_heads != m.d_model:
        hf["head_dim"] = m.head_dim  # read with getattr(config, "head_dim", hidden // heads)
    return hf


FAMILY = Family("qwen2_moe", "Qwen2MoeForCausalLM", _qwen2_moe_in, _qwen2_moe_problems, _qwen2_moe_out)
