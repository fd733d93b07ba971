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
def olmoe_2b_16e() -> dict:
    """OLMoE-1B-7B's shapes with 16 experts of width 1024 top-2 instead of 64 top-8 (the same
    1/8 of them active): 2.09B total, 0.68B active, so weights, gradients and AdamW fit one GPU
    (the GPU suite's LLM, docs/gpu.md). OLMoE's q/k RMSNorm; its dropless softmax top-k without
    renormalisation, balance loss 0.01 and z-loss 0.001."""
    return {
        "model": dict(family="llm", vocab_size=50304, d_model=2048, num_layers=16, num_heads=16,
                      num_kv_heads=16, head_dim=128, ffn_dim=8192, max_seq_len=4096,
                      rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, qk_norm=True),
        "moe": dict(num_experts=16, top_k=2, expert_ffn_dim=1024, moe_every=1, first_k_dense=0,
                    num_shared_experts=0, renormalize=False, aux_loss_coeff=0.01, z_loss_coeff=0.001),
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


# -- DiT (model.family dit) --------------------------------------------------------------------
# DiT norms use eps 1e-6. num_kv_heads = num_heads: DiT attention has no grouped KV heads (the
# field is unused by DiT; set so the config's GQA divisibility check reads naturally). The dense
# FFN is our SwiGLU (3 matrices) where DiT has a GELU MLP (2): at the published ffn 4·D a dense
# preset has 4·D² more parameters per layer than the paper's model, but its FFN is exactly one
# DiT-MoE expert (SwiGLU, 4·D), so a dense dit_XL upcycles into dit_moe_XL_8E2A with G = 1.


def _dit(d_model: int, num_layers: int, num_heads: int, *, image_size: int = 32, in_channels: int = 4,
         num_classes: int = 1000, patch_size: int = 2) -> dict:
    """A dense DiT of the paper's shapes (default: 256² ImageNet through the SD VAE, 32² x 4 latents)."""
    return {
        "model": dict(family="dit", d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_heads, head_dim=0, ffn_dim=4 * d_model, norm_eps=1e-6,
                      init_std=0.02, image_size=image_size, patch_size=patch_size,
                      in_channels=in_channels, num_classes=num_classes, class_dropout_prob=0.1,
                      learn_sigma=True),
        "moe": dict(num_experts=0),
    }


def _dit_moe(moe: dict) -> dict:
    """DiT-MoE routing: softmax top-k without renormalisation, only the expert-level balance
    loss (α = 0.01; no Switch aux loss, no z-loss), token choice, dropless."""
    defaults = dict(routing="token_choice", score_func="softmax", renormalize=False, moe_every=1,
                    first_k_dense=0, aux_loss_coeff=0.0, z_loss_coeff=0.0, expert_balance_loss_coeff=0.01,
                    capacity_factor=0.0)
    return {**defaults, **moe}


@register
def dit_tiny_moe() -> dict:
    """CPU-sized DiT-MoE for 8x8 digits: 16 tokens of 2x2 patches, MoE on every layer."""
    p = _dit(128, 4, 4, image_size=8, in_channels=1, num_classes=10)
    p["model"]["ffn_dim"] = 256  # unused: every layer is MoE
    p["moe"] = _dit_moe(dict(num_experts=8, top_k=2, expert_ffn_dim=128, num_shared_experts=1,
                             shared_expert_ffn_dim=128))
    return p


@register
def dit_tiny_dense() -> dict:
    """dit_tiny_moe without experts; ffn_dim = top_k × expert_ffn_dim + shared width = 384, so
    the FFN parameters active per token match (the MoE model also has its router, 8·128 per layer)."""
    p = dit_tiny_moe()
    p["moe"]["num_experts"] = 0
    p["model"]["ffn_dim"] = 2 * 128 + 128
    return p


@register
def dit_S() -> dict:
    """DiT-S/2 shapes (paper: 33M params with a GELU MLP)."""
    return _dit(384, 12, 6)


@register
def dit_B() -> dict:
    """DiT-B/2 shapes (paper: 130M)."""
    return _dit(768, 12, 12)


@register
def dit_L() -> dict:
    """DiT-L/2 shapes (paper: 458M)."""
    return _dit(1024, 24, 16)


@register
def dit_XL() -> dict:
    """DiT-XL/2 shapes (paper: 675M)."""
    return _dit(1152, 28, 16)


@register
def dit_moe_XL_8E2A() -> dict:
    """DiT-MoE-XL/2-8E2A: DiT-XL/2 with every FFN an MoE of 8 SwiGLU experts of width 4·D, top-2,
    and 2 shared experts of width D (one SwiGLU of 2·D, "shared width 2D"); ≈4.2B total,
    ≈1.5B active. Shapes from the DiT-MoE release (models.py: experts mlp_ratio·D, shared
    n_shared·D with n_shared = 2), which give DiT-MoE-G/2-16E2A (D 1408, 40 layers, 16 experts)
    its published 16.5B parameters."""
    p = _dit(1152, 28, 16)
    p["moe"] = _dit_moe(dict(num_experts=8, top_k=2, expert_ffn_dim=4 * 1152, num_shared_experts=2,
                             shared_expert_ffn_dim=1152))
    return p
