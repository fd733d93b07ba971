"""The Qwen3-MoE family (model_type "qwen3_moe"): GQA with an RMSNorm over each head's q and k
channels, an explicit head_dim, softmax top-k, dense layers by index, no shared expert, and
transformers' sliding window (every layer, when use_sliding_window)."""
from __future__ import annotations

from models.hf.family_base import (Family, gqa_problems, HFFormatError, moe_keys, moe_layers, read_common,
                                   softmax_problems, write_common)


def sparse_layers(hf: dict, num_layers: int, num_experts: int, where: str) -> tuple[int, int]:
    """(first MoE layer, every k-th) of Qwen's decoder_sparse_step / mlp_only_layers rule."""
    step, dense_only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or [])
    sparse = [i for i in range(num_layers) if i not in dense_only and num_experts > 0 and (i + 1) % step == 0]
    if not sparse:
        raise HFFormatError(f"{where}: no MoE layer (num_experts={num_experts}, mlp_only_layers, "
                            f"decoder_sparse_step={step})")
    first, every = sparse[0], (sparse[1] - sparse[0] if len(sparse) > 1 else 1)
    if sparse != list(range(first, num_layers, every)):
        raise HFFormatError(f"{where}: MoE layers {sparse} (mlp_only_layers={sorted(dense_only)}, decoder_sparse_"
                            f"step={step}) are not 'every k-th after the first k dense', which is all we express")
    return first, every


def _qwen3_moe_in(hf: dict, where: str) -> dict:
    d = dict(vocab_size=151936, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
             hidden_act="silu", rope_theta=1e4)
    model = read_common(hf, d, where)
    E = hf.get("num_experts") or hf.get("num_local_experts") or 128
    first, every = sparse_layers(hf, model["num_layers"], E, where)
    bias = bool(hf.get("attention_bias", False))
    model.update(head_dim=hf.get("head_dim") or 0, ffn_dim=hf.get("intermediate_size", 6144), qkv_bias=bias,
                 attn_out_bias=bias, qk_norm_per_head=True)
    if hf.get("use_sliding_window"):  # transformers then masks every layer with sliding_window
        model.update(sliding_window=int(hf.get("sliding_window") or 4096), sliding_window_layers=[])
    moe = moe_keys(num_experts=E, top_k=hf.get("num_experts_per_tok", 8),
                   expert_ffn_dim=hf.get("moe_intermediate_size", 768), first_k_dense=first, moe_every=every,
                   renormalize=bool(hf.get("norm_topk_prob", False)))
    return {"model": model, "moe": moe}


def _qwen3_moe_problems(m, moe) -> list[str]:
    out = gqa_problems(m, qkv_bias=None, out_bias=None, qk_norm_per_head=True, window=True) + softmax_problems(moe)
    if m.qkv_bias != m.attn_out_bias:
        out.append("model.qkv_bias != model.attn_out_bias (Qwen3-MoE has one attention_bias)")
    if m.sliding_window and m.sliding_window_layers and sorted(m.sliding_window_layers) != list(range(m.num_layers)):
        out.append(f"a sliding window on some layers only (model.sliding_window_layers={m.sliding_window_layers})")
    return out


def _qwen3_moe_out(m, moe) -> dict:
    hf = write_common(m, "qwen3_moe", "Qwen3MoeForCausalLM")
    dense = [i for i in range(m.num_layers) if i not in moe_layers(m, moe)]
    hf.update(head_dim=m.resolved_head_dim, intermediate_size=m.ffn_dim, moe_intermediate_size=moe.expert_ffn_dim,
              num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, norm_topk_prob=moe.renormalize,
              attention_bias=m.qkv_bias, decoder_sparse_step=1, mlp_only_layers=dense,
              use_sliding_window=bool(m.sliding_window), sliding_window=m.sliding_window or None)
    return hf


FAMILY = Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_in, _qwen3_moe_problems, _qwen3_moe_out)
