"""Decoder-only MoE transformer: pre-norm blocks of RoPE attention (GQA or MLA, models/attention.py)
and a SwiGLU FFN that is an MoE layer or dense depending on the layer index.

Builds on the meta device (nothing data-dependent runs in a way that needs real storage), so
huge presets can be counted without memory; `model.to_empty(device=...)` followed by
`model.init_weights()` then gives a usable model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import build_attention, rope_dim, rope_tables
from models.config import is_moe_layer, moe_layer_config
from models.ffn import FeedForward
from models.moe import MoE


def configure_moe_layers(moe_ffns: list, moe_cfg) -> None:
    """Per-layer settings the layers cannot know from their own config: their index among the
    model's MoE layers, and their dynamic-skipping β (moe.skip_beta)."""
    for k, layer in enumerate(moe_ffns):
        layer.moe_index = k
        if moe_cfg.skip_beta:
            layer.router.skip_beta = moe_cfg.skip_beta[k]


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg, moe_cfg):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if is_moe_layer(layer_id, moe_cfg):
            self.ffn: nn.Module = MoE(cfg.d_model, moe_layer_config(layer_id, moe_cfg))
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))

    def init_weights(self, std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attn.init_weights(std, out_std)
        self.ffn.init_weights(std, out_std)


class MoETransformer(nn.Module):
    """tokens [B, S] -> logits [B, S, V] (fp32).

    Args:
        cfg: a `models.config.ModelConfig`.
        moe_cfg: a `models.config.MoEConfig` (num_experts 0: every FFN is dense).
    """

    def __init__(self, cfg, moe_cfg):
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.rope_dim = rope_dim(cfg)  # channels per head that RoPE rotates
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # A dict keyed by the layer index ("0", "1", ...): the same state-dict keys as a list, and
        # a pipeline stage can hold any subset of the layers under their original names.
        self.layers = nn.ModuleDict({str(i): Block(i, cfg, moe_cfg) for i in range(cfg.num_layers)})
        configure_moe_layers([block.ffn for block in self.layers.values() if isinstance(block.ffn, MoE)], moe_cfg)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # Tied: the head reads tok_embeddings.weight in forward instead of sharing a Parameter
        # object, because to_empty()/_apply re-create parameters per module and would untie them.
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Derived from the config, never saved; recomputed by init_weights after to_empty().
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, self.rope_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, self.rope_dim // 2), persistent=False)
        self.init_weights()

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one place where weights are set: N(0, init_std) for every matrix (router and
        experts included), ones for norms, RoPE tables recomputed."""
        std = self.cfg.init_std
        # Each block adds two residual branches; scaling their output projections by
        # 1/sqrt(2·num_layers) keeps the residual stream's variance from growing with depth.
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        cos, sin = rope_tables(self.rope_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers.values():
            block.init_weights(std, out_std)
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        S = tokens_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        h_BSD = self.tok_embeddings(tokens_BS)
        for block in self.layers.values():
            h_BSD = block(h_BSD, cos, sin)
        return F.linear(self.norm(h_BSD), self.output_weight).float()

    def pipeline_io(self, microbatch: int, seq_len: int) -> tuple[tuple, tuple, torch.Tensor]:
        """Meta tensors of one pipeline microbatch at the stage boundaries (parallel/pipeline.py):
        (first stage inputs, what each stage hands the next, the last stage's output):
        tokens [mb, S] -> fp32 hidden states [mb, S, D] -> fp32 logits [mb, S, V]."""
        meta, D, V = torch.device("meta"), self.cfg.d_model, self.cfg.vocab_size
        # The boundary is the fp32 residual stream (bf16 autocast promotes it back at each add).
        return ((torch.empty(microbatch, seq_len, dtype=torch.long, device=meta),),
                (torch.empty(microbatch, seq_len, D, dtype=torch.float32, device=meta),),
                torch.empty(microbatch, seq_len, V, dtype=torch.float32, device=meta))

    def pipeline_stage(self, layer_ids: list[int], first: bool, last: bool) -> "TransformerStage":
        """A module that runs layers `layer_ids` (ascending) of this model, sharing its parameters.

        The stage keeps the full model's parameter names ("layers.5.attn.wq.weight"), so a stage's
        state dict is the matching slice of the model's. The first stage also embeds tokens, the
        last also applies the final norm and the output head.
        """
        if last and self.output is None:
            raise ValueError("pipeline stages need untied embeddings (model.tie_embeddings=false): "
                             "the first and the last stage would share one weight")
        return TransformerStage(self, layer_ids, first, last)


class TransformerStage(nn.Module):
    """A contiguous slice of a `MoETransformer` (see `MoETransformer.pipeline_stage`).

    forward: tokens [B, S] (first stage) or hidden states [B, S, D] -> hidden states [B, S, D],
    or fp32 logits [B, S, V] (last stage).
    """

    def __init__(self, model: MoETransformer, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.layer_ids, self.first, self.last = list(layer_ids), first, last
        self.max_seq_len = model.cfg.max_seq_len
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        # The model's RoPE tables, shared (not copied): init_weights on the model refreshes them.
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.shape[1]
        if S > self.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.max_seq_len}")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        h_BSD = self.tok_embeddings(x) if self.first else x
        for block in self.layers.values():
            h_BSD = block(h_BSD, cos, sin)
        if not self.last:
            return h_BSD
        return F.linear(self.norm(h_BSD), self.output.weight).float()
