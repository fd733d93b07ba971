"""Model presets: name -> {"model": {...}, "moe": {...}} overrides for the config loader.

Each entry is a small factory; values sit under the recipe's own (a recipe may override any key).
Shapes follow the published configs; what our architecture cannot express is noted inline.
"""
from __future__ import annotations

from typing import Callable

PRESETS: dict[str, Callable[[], dict]] = {}


def register(fn: Callable[[], dict]) -> Callable[[], dict]:
    PRESETS[fn.__name__] = fn
    return fn


def preset_overrides(name: str) -> dict:
    """The {"model": ..., "moe": ...} overrides of preset `name` (a fresh dict each call)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


@register
def tiny() -> dict:
    """CPU-sized MoE for tests and smoke runs."""
    return {
        "model": dict(family="llm", vocab_size=260, d_model=128, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=0, ffn_dim=512, max_seq_len=512),
        "moe": dict(num_experts=8, top_k=2, expert_ffn_dim=256, moe_every=1, first_k_dense=0,
                    num_shared_experts=0),
    }


@register
def tiny_dense() -> dict:
    """tiny without experts; ffn_dim = top_k × expert_ffn_dim = 512 matches tiny's active FFN."""
    p = tiny()
    p["moe"]["num_experts"] = 0
    p["model"]["ffn_dim"] = 2 * 256
    return p


@register
def mixtral_8x7b() -> dict:
    """Mixtral-8x7B: 46.7B total, 12.9B active."""
    return {
        "model": dict(family="llm", vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, ffn_dim=14336, max_seq_len=32768,
                      rope_theta=1e6, norm_eps=1e-5, tie_embeddings=False),
        "moe": dict(num_experts=8, top_k=2, expert_ffn_dim=14336, moe_every=1, first_k_dense=0,
                    num_shared_experts=0, renormalize=True, aux_loss_coeff=0.02),
    }


@register
def qwen2_moe_a2_7b() -> dict:
    """Qwen1.5-MoE-A2.7B shapes: 14.3B total, 2.7B active.

    Not modelled: the q/k/v biases and the sigmoid gate on the shared expert's output.
    """
    return {
        "model": dict(family="llm", vocab_size=151936, d_model=2048, num_layers=24, num_heads=16,
                      num_kv_heads=16, head_dim=128, ffn_dim=5632, max_seq_len=8192,
                      rope_theta=1e6, norm_eps=1e-6, tie_embeddings=False),
        "moe": dict(num_experts=60, top_k=4, expert_ffn_dim=1408, moe_every=1, first_k_dense=0,
                    num_shared_experts=1, shared_expert_ffn_dim=5632, renormalize=False,
                    aux_loss_coeff=0.001),
    }


@register
def deepseek_v3_like() -> dict:
    """DeepSeek-V3 sizes (≈671B total) with our plain blocks.

    Differences: no MLA — plain multi-head attention with head_dim = 7168/128 = 56, whose
    4·D² weights per layer are close to MLA's (≈187M vs 206M); softmax instead of sigmoid
    group-limited routing, no routed_scaling_factor, no aux-free bias, no MTP head; the 4K
    pretraining context (YaRN extension not modelled). The published sequence-wise balance
    coefficient is 1e-4.
    """
    return {
        "model": dict(family="llm", vocab_size=129280, d_model=7168, num_layers=61, num_heads=128,
                      num_kv_heads=128, head_dim=0, ffn_dim=18432, max_seq_len=4096,
                      rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=False),
        "moe": dict(num_experts=256, top_k=8, expert_ffn_dim=2048, moe_every=1, first_k_dense=3,
                    num_shared_experts=1, shared_expert_ffn_dim=2048, renormalize=True,
                    aux_loss_coeff=1e-4),
    }
