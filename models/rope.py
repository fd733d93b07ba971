"""RoPE frequencies and their context-extension scalings (`model.rope_scaling`), computed as
transformers' `modeling_rope_utils` does, so imported models keep their tables exactly:

    none     inv_freq_i = theta^(-2i/dim)
    linear   inv_freq / factor (position interpolation)
    dynamic  NTK-aware: for a window of S > original_max_seq_len tokens theta grows to
             theta·(factor·S/original - (factor - 1))^(dim/(dim - 2)); shorter windows use the
             plain tables (transformers recomputes per forward in the same way)
    yarn     per-frequency blend of interpolation and extrapolation over the band set by
             beta_fast / beta_slow, and cos/sin multiplied by the attention factor
             (0.1·ln(factor) + 1, or its mscale / mscale_all_dim ratio)

`mla_softmax_scale` is DeepSeek's extra correction of MLA's softmax scale under YaRN (mscale_all_dim).
Pure torch, no config import: `RopeScaling.from_config` reads the `model.rope_*` keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """One model's RoPE scaling. original_max_seq_len 0: the model's max_seq_len. mscale,
    mscale_all_dim, attention_factor 0: unset (as transformers' None)."""

    kind: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float = 0.0
    truncate: bool = True

    @classmethod
    def from_config(cls, cfg) -> "RopeScaling":
        """From a `models.config.ModelConfig` (its rope_* keys)."""
        return cls(cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_seq_len or cfg.max_seq_len,
                   cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_mscale, cfg.rope_mscale_all_dim,
                   cfg.rope_attention_factor, cfg.rope_truncate)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's 0.1·mscale·ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _plain_inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def _yarn(dim: int, theta: float, s: RopeScaling, device=None) -> tuple[torch.Tensor, float]:
    attention_factor = s.attention_factor or (
        yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim) if s.mscale and s.mscale_all_dim
        else yarn_mscale(s.factor))

    def correction_dim(num_rotations: float) -> float:  # the dim whose wavelength fits num_rotations times
        return dim * math.log(s.original_max_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = 1.0 / (s.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, float(attention_factor)


def inv_freq_and_scale(dim: int, theta: float, scaling: RopeScaling, num_positions: int = 0,
                       device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim // 2] fp32, the factor cos and sin are multiplied by) for windows of
    `num_positions` tokens (only `dynamic` depends on it)."""
    kind = scaling.kind
    if kind == "none":
        return _plain_inv_freq(dim, theta, device), 1.0
    if kind == "linear":
        return _plain_inv_freq(dim, theta, device) / scaling.factor, 1.0
    if kind == "dynamic":
        seq_len = max(num_positions, scaling.original_max_seq_len)
        f = scaling.factor
        base = theta * ((f * seq_len / scaling.original_max_seq_len) - (f - 1)) ** (dim / (dim - 2))
        return _plain_inv_freq(dim, base, device), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, device)
    raise ValueError(f"model.rope_scaling={kind!r} is not one of {', '.join(ROPE_SCALINGS)}")


def rope_tables(dim: int, num_positions: int, theta: float, scaling: RopeScaling | None = None,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of positions 0..num_positions-1, each [num_positions, dim // 2], fp32."""
    inv_freq, scale = inv_freq_and_scale(dim, theta, scaling or RopeScaling(), num_positions, device)
    angles = torch.outer(torch.arange(num_positions, device=device, dtype=torch.float32), inv_freq)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def mla_softmax_scale(qk_head_dim: int, scaling: RopeScaling) -> float:
    """MLA's softmax scale: 1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)² under
    YaRN with mscale_all_dim (DeepSeek-V2/V3, transformers' `yarn_apply_mscale`)."""
    scale = qk_head_dim ** -0.5
    if scaling.kind != "none" and scaling.mscale_all_dim:
        m = yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        scale = scale * m * m
    return scale
