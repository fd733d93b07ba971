"""Causal self-attention of the decoder LLM, chosen by `model.attention`:

    gqa  grouped-query attention (Llama/Mixtral), with the options of the families we import:
         q/k/v biases (`qkv_bias`, Qwen2-MoE), an output bias (`attn_out_bias`), RMSNorm over the
         whole q and k projections before RoPE (`qk_norm`, OLMoE) or over each head's channels
         (`qk_norm_per_head`, Qwen3-MoE, GLM-4.5, dots1), clamping of q/k/v (`clip_qkv`, OLMoE),
         RoPE on the first `partial_rotary_factor` of each head's channels (GLM-4.5), learned
         per-head attention sinks (`attn_sinks`, gpt-oss) and a sliding window (`sliding_window`
         keys back, on the layers of `sliding_window_layers`; gpt-oss, Qwen3-MoE, dots1)
    mla  multi-head latent attention (DeepSeek-V2/V3): q through an optional low-rank bottleneck,
         keys and values from one compressed latent per token, RoPE only on a separate slice of
         qk_rope_head_dim channels whose key is shared by all heads

Shape legend (suffixes on tensor names):
    B sequences   S tokens per sequence   D model dim   H heads   K kv heads   d head dim
    L kv latent (mla_kv_lora_rank)   N / R / V the no-RoPE, RoPE and value dims of an MLA head

Both are causal over the window (`is_causal=True`), or, for packed documents, take a boolean
mask that also keeps attention inside each document and per-token RoPE tables (models/doc_mask.py).

RoPE is rotate-half (the Hugging Face Llama layout): channel i pairs with channel i + dim/2.
DeepSeek checkpoints that pair neighbours (rope_interleave) are permuted on import instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.init import Init
from models.rope import RopeScaling, mla_softmax_scale, rope_tables

ATTENTIONS = ("gqa", "mla")


class RotaryTables(nn.Module):
    """The RoPE tables of a model as non-persistent buffers, one module shared by the model and its
    pipeline stages: materialising a stage materialises the tables every stage reads."""

    def __init__(self, dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.dim, self.max_seq_len, self.theta = dim, max_seq_len, theta
        self.scaling = scaling or RopeScaling()  # models/rope.py: none, linear, dynamic, yarn
        self.register_buffer("cos", torch.empty(max_seq_len, dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim // 2), persistent=False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Derived from the config, small: computed whole on every rank (nothing on meta)."""
        if not self.cos.is_meta:
            cos, sin = rope_tables(self.dim, self.max_seq_len, self.theta, self.scaling, self.cos.device)
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def first(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions 0..num_positions-1."""
        if num_positions > self.max_seq_len:
            raise ValueError(f"sequence length {num_positions} exceeds max_seq_len={self.max_seq_len}")
        if self.scaling.kind == "dynamic" and num_positions > self.scaling.original_max_seq_len:
            # Dynamic NTK: the whole window's tables depend on its length (small, computed here).
            return rope_tables(self.dim, num_positions, self.theta, self.scaling, self.cos.device)
        return self.cos[:num_positions], self.sin[:num_positions]


def apply_rope(x_BSHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face Llama/Mixtral layout, so their weights load as-is).

    cos, sin: [S, h], shared by every sequence, or [B, S, h], per token (document masking,
    models/doc_mask.py, where positions restart in each packed document).
    """
    x1, x2 = x_BSHd.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x_BSHd.dtype)


def rope_dim(cfg) -> int:
    """Channels per head that RoPE rotates: the first partial_rotary_factor of the head dim (the
    whole head by default), or MLA's qk_rope_head_dim."""
    if cfg.attention == "mla":
        return cfg.mla_qk_rope_head_dim
    # int(), as transformers truncates head_dim * partial_rotary_factor
    return int((cfg.head_dim or cfg.d_model // cfg.num_heads) * cfg.partial_rotary_factor)


def layer_window(cfg, layer_id: int) -> int:
    """The sliding window of layer `layer_id` (0: full causal attention)."""
    if cfg.sliding_window and (not cfg.sliding_window_layers or layer_id in cfg.sliding_window_layers):
        return cfg.sliding_window
    return 0


def build_attention(cfg, layer_id: int = 0) -> nn.Module:
    """The attention a `models.config.ModelConfig` asks for, in layer `layer_id`."""
    if cfg.attention == "mla":
        return MLAttention(cfg)
    if cfg.attention != "gqa":
        raise ValueError(f"model.attention={cfg.attention!r} is not one of {', '.join(ATTENTIONS)}")
    return Attention(cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim or cfg.d_model // cfg.num_heads,
                     qkv_bias=cfg.qkv_bias, out_bias=cfg.attn_out_bias, qk_norm=cfg.qk_norm,
                     clip_qkv=cfg.clip_qkv, norm_eps=cfg.norm_eps, qk_norm_per_head=cfg.qk_norm_per_head,
                     rotary_dim=rope_dim(cfg), window=layer_window(cfg, layer_id), sinks=cfg.attn_sinks)


def window_mask(num_tokens: int, window: int, mask_B1SS: torch.Tensor | None, device) -> torch.Tensor:
    """Causal attention to the last `window` tokens (self included), as transformers'
    sliding_window_overlay (kv > q - window), and within `mask_B1SS` when one is given."""
    pos = torch.arange(num_tokens, device=device)
    offset_SS = pos[:, None] - pos[None, :]
    band_11SS = ((offset_SS >= 0) & (offset_SS < window))[None, None]
    return band_11SS if mask_B1SS is None else mask_B1SS & band_11SS


def _attend(q_BHSd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor, mask_B1SS: torch.Tensor | None,
            enable_gqa: bool = False, scale: float | None = None) -> torch.Tensor:
    """Causal SDPA, or SDPA under a boolean mask (True: attend) that already holds causality.
    A mask rules out the flash kernel on GPU, so the unmasked path keeps is_causal=True."""
    if mask_B1SS is None:
        return F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, is_causal=True, enable_gqa=enable_gqa,
                                              scale=scale)
    if enable_gqa and k_BHSd.shape[1] != q_BHSd.shape[1]:
        # On CUDA, enable_gqa with a mask leaves only the math kernel (S² scores per head in
        # memory); repeated kv heads keep the memory-efficient kernel available.
        repeats = q_BHSd.shape[1] // k_BHSd.shape[1]
        k_BHSd, v_BHSd = k_BHSd.repeat_interleave(repeats, dim=1), v_BHSd.repeat_interleave(repeats, dim=1)
    return F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, attn_mask=mask_B1SS, scale=scale)


def _attend_with_sinks(q_BHSd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor,
                       mask: torch.Tensor | None, sinks_H: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention whose denominator also holds one learned logit per head (gpt-oss
    attention sinks: a head can attend to "nothing"). Scores and softmax in fp32; mask: boolean
    (True: attend), None: causal."""
    B, H, S, d = q_BHSd.shape
    repeats = H // k_BKSd.shape[1]
    k, v = k_BKSd.repeat_interleave(repeats, dim=1), v_BKSd.repeat_interleave(repeats, dim=1)
    scores_BHSS = torch.matmul(q_BHSd.float(), k.float().transpose(2, 3)) * d ** -0.5
    if mask is None:
        mask = torch.ones(S, S, dtype=torch.bool, device=q_BHSd.device).tril()
    scores_BHSS = scores_BHSS.masked_fill(~mask, float("-inf"))
    sinks = sinks_H.float().view(1, H, 1, 1).expand(B, H, S, 1)
    combined = torch.cat([scores_BHSS, sinks], dim=-1)
    probs = torch.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def _init_linear(linear: nn.Linear, std: float, init: Init) -> None:
    init.normal(linear.weight, std)
    if linear.bias is not None:
        init.zeros(linear.bias)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (num_kv_heads divides num_heads)."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 qkv_bias: bool = False, out_bias: bool = False, qk_norm: bool = False,
                 clip_qkv: float = 0.0, norm_eps: float = 1e-5, qk_norm_per_head: bool = False,
                 rotary_dim: int = 0, window: int = 0, sinks: bool = False):
        super().__init__()
        if qk_norm and qk_norm_per_head:
            raise ValueError("qk_norm (whole projection) and qk_norm_per_head: choose one")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.clip_qkv, self.window = clip_qkv, window
        self.rotary_dim = rotary_dim or head_dim  # RoPE on channels [0, rotary_dim) of each head
        self.wq = nn.Linear(d_model, num_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(d_model, num_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_model, num_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(num_heads * head_dim, d_model, bias=out_bias)
        # Before RoPE. OLMoE: one RMSNorm over all heads' channels at once; Qwen3-MoE (per head):
        # one over head_dim, its weight shared by every head.
        self.qk_norm_per_head = qk_norm_per_head
        q_width, k_width = (head_dim, head_dim) if qk_norm_per_head else (num_heads * head_dim, num_kv_heads * head_dim)
        self.q_norm = nn.RMSNorm(q_width, eps=norm_eps) if qk_norm or qk_norm_per_head else None
        self.k_norm = nn.RMSNorm(k_width, eps=norm_eps) if qk_norm or qk_norm_per_head else None
        # gpt-oss: one learned logit per head that joins every softmax denominator.
        self.sinks = nn.Parameter(torch.empty(num_heads)) if sinks else None

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask_B1SS: torch.Tensor | None = None) -> torch.Tensor:
        """cos, sin: [S, h] or [B, S, h]; mask_B1SS: a document mask (models/doc_mask.py) or None."""
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv > 0:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = q.view(B, S, self.num_heads, self.head_dim), k.view(B, S, self.num_kv_heads, self.head_dim)
        if self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        v = v.view(B, S, self.num_kv_heads, self.head_dim)
        if self.window and S > self.window:
            mask_B1SS = window_mask(S, self.window, mask_B1SS, x_BSD.device)
        if self.sinks is not None:
            o = _attend_with_sinks(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask_B1SS, self.sinks)
        else:
            o = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask_B1SS, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))

    def _rope(self, x_BSHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on the first rotary_dim channels of each head (GLM-4.5's partial
        rotary; all of them by default), the rest passed through."""
        if self.rotary_dim == self.head_dim:
            return apply_rope(x_BSHd, cos, sin)
        rot, rest = x_BSHd.split([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
        return torch.cat([apply_rope(rot, cos, sin), rest], dim=-1)

    def init_weights(self, std: float, out_std: float, init: Init) -> None:
        for w in (self.wq, self.wk, self.wv):
            _init_linear(w, std, init)
        _init_linear(self.wo, out_std, init)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                init.ones(norm.weight)
        if self.sinks is not None:
            init.zeros(self.sinks)  # a sink logit of 0: one virtual key with score 0 at the start


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), causal, without a KV cache.

    q = W_qb · RMSNorm(W_qa · x) (or W_q · x when mla_q_lora_rank is 0), split per head into a
    no-RoPE part [N] and a RoPE part [R]. W_kva · x gives the latent c [L] and one RoPE key [R]
    shared by every head; W_kvb · RMSNorm(c) gives each head's no-RoPE key [N] and value [V].
    Scores are scaled by 1/sqrt(N + R) (times YaRN's mscale² with mscale_all_dim). The latent norms use eps 1e-6, as DeepSeek's code.
    `qkv_bias` puts biases on W_qa and W_kva (DeepSeek's attention_bias), `attn_out_bias` on W_o.
    """

    def __init__(self, cfg):
        super().__init__()
        D, H = cfg.d_model, cfg.num_heads
        self.num_heads = H
        self.q_lora_rank, self.kv_lora_rank = cfg.mla_q_lora_rank, cfg.mla_kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.mla_qk_nope_head_dim, cfg.mla_qk_rope_head_dim, cfg.mla_v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank > 0:
            self.wq_a = nn.Linear(D, self.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_norm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.wq_b = nn.Linear(self.q_lora_rank, H * qk_dim, bias=False)
        else:  # DeepSeek's full-rank q projection has no bias even with attention_bias
            self.wq = nn.Linear(D, H * qk_dim, bias=False)
        self.wkv_a = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_norm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=cfg.attn_out_bias)
        # 1/sqrt(N + R), corrected by YaRN's mscale_all_dim (None: SDPA's default, the same value).
        scale = mla_softmax_scale(qk_dim, RopeScaling.from_config(cfg))
        self.softmax_scale = None if scale == qk_dim ** -0.5 else scale

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask_B1SS: torch.Tensor | None = None) -> torch.Tensor:
        """cos, sin: [S, R/2] or [B, S, R/2]; mask_B1SS: a document mask (models/doc_mask.py) or None."""
        B, S, _ = x_BSD.shape
        H, N, R, V = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim
        q = self.wq_b(self.q_a_norm(self.wq_a(x_BSD))) if self.q_lora_rank > 0 else self.wq(x_BSD)
        q_nope_BSHN, q_rope_BSHR = q.view(B, S, H, N + R).split([N, R], dim=-1)
        c_BSL, k_rope_BSR = self.wkv_a(x_BSD).split([self.kv_lora_rank, R], dim=-1)
        kv = self.wkv_b(self.kv_a_norm(c_BSL)).view(B, S, H, N + V)
        k_nope_BSHN, v_BSHV = kv.split([N, V], dim=-1)
        k_rope_BS1R = apply_rope(k_rope_BSR.view(B, S, 1, R), cos, sin)
        q_BSHd = torch.cat([q_nope_BSHN, apply_rope(q_rope_BSHR, cos, sin)], dim=-1)
        k_BSHd = torch.cat([k_nope_BSHN, k_rope_BS1R.expand(B, S, H, R)], dim=-1)
        # The value dim may differ from the q/k dim; SDPA's default scale is 1/sqrt(N + R).
        o = _attend(q_BSHd.transpose(1, 2), k_BSHd.transpose(1, 2), v_BSHV.transpose(1, 2), mask_B1SS,
                    scale=self.softmax_scale)
        return self.wo(o.transpose(1, 2).reshape(B, S, H * V))

    def init_weights(self, std: float, out_std: float, init: Init) -> None:
        projections = [self.wkv_a, self.wkv_b]
        projections += [self.wq_a, self.wq_b] if self.q_lora_rank > 0 else [self.wq]
        for w in projections:
            _init_linear(w, std, init)
        _init_linear(self.wo, out_std, init)
        init.ones(self.kv_a_norm.weight)
        if self.q_lora_rank > 0:
            init.ones(self.q_a_norm.weight)
