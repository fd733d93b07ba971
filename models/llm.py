"""Decoder-only MoE transformer: pre-norm blocks of RoPE attention (GQA or MLA, models/attention.py)
and a SwiGLU FFN that is an MoE layer or dense depending on the layer index.

Builds on the meta device (nothing data-dependent runs in a way that needs real storage), so
huge presets can be counted without memory; `model.to_empty(device=...)` followed by
`models.init.initialize(model, seed)` then gives a usable model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import RotaryTables, build_attention, rope_dim
from models.config import is_moe_layer, moe_layer_config
from models.doc_mask import document_positions_and_mask
from models.ffn import FeedForward
from models.init import Init, initialize, seed_from_global_rng
from models.moe import MoE
from models.rope import RopeScaling


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
        self.attn = build_attention(cfg, layer_id)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if is_moe_layer(layer_id, moe_cfg):
            self.ffn: nn.Module = MoE(cfg.d_model, moe_layer_config(layer_id, moe_cfg))
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask_B1SS: torch.Tensor | None = None) -> torch.Tensor:
        """cos, sin: RoPE tables [S, h] or per token [B, S, h]; mask_B1SS: a document mask or None
        (causal), both from `MoETransformer.forward`."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, mask_B1SS)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))

    def init_weights(self, std: float, out_std: float, init: Init) -> None:
        init.ones(self.attn_norm.weight)
        init.ones(self.ffn_norm.weight)
        self.attn.init_weights(std, out_std, init)
        self.ffn.init_weights(std, out_std, init)


class MoETransformer(nn.Module):
    """tokens [B, S] (and optional document ids [B, S]) -> logits [B, S, V] (fp32).

    Args:
        cfg: a `models.config.ModelConfig`.
        moe_cfg: a `models.config.MoEConfig` (num_experts 0: every FFN is dense).
        seed: of the initial weights (models/init.py); None: from torch's global generator.
            On the meta device nothing is set.
    """

    def __init__(self, cfg, moe_cfg, seed: int | None = None):
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
        self.rope = RotaryTables(self.rope_dim, cfg.max_seq_len, cfg.rope_theta, RopeScaling.from_config(cfg))
        if not self.norm.weight.is_meta:
            initialize(self, seed_from_global_rng() if seed is None else seed)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @torch.no_grad()
    def init_weights(self, init: Init) -> None:
        """The one place where weights are set (models/init.py draws them by name): N(0, init_std)
        for every matrix (router and experts included), ones for norms, RoPE tables recomputed."""
        std = self.cfg.init_std
        # Each block adds two residual branches; scaling their output projections by
        # 1/sqrt(2·num_layers) keeps the residual stream's variance from growing with depth.
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        self.rope.init_buffers()
        init.normal(self.tok_embeddings.weight, std)
        for block in self.layers.values():
            block.init_weights(std, out_std, init)
        init.ones(self.norm.weight)
        if self.output is not None:
            init.normal(self.output.weight, std)


    def forward(self, tokens_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
        """doc_ids_BS: document id of every token of packed windows (non-decreasing along S), or
        None. Given, attention stays inside each document and positions restart at 0 in each
        (models/doc_mask.py); the mask is built here once for all layers."""
        cos, sin = self.rope.first(tokens_BS.shape[1])
        mask_B1SS = None
        if doc_ids_BS is not None:
            cos, sin, mask_B1SS = document_positions_and_mask(doc_ids_BS, cos, sin)
        h_BSD = self.tok_embeddings(tokens_BS)
        for block in self.layers.values():
            h_BSD = block(h_BSD, cos, sin, mask_B1SS)
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
    or fp32 logits [B, S, V] (last stage). Always causal over the whole window: stages pass only
    hidden states, so document masking (data.document_mask) is refused with parallel.pp > 1.
    """

    def __init__(self, model: MoETransformer, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.layer_ids, self.first, self.last = list(layer_ids), first, last
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.rope = model.rope  # the model's tables module, shared (not copied)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope.first(x.shape[1])
        h_BSD = self.tok_embeddings(x) if self.first else x
        for block in self.layers.values():
            h_BSD = block(h_BSD, cos, sin)
        if not self.last:
            return h_BSD
        return F.linear(self.norm(h_BSD), self.output.weight).float()
