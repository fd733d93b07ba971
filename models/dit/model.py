"""Class-conditional diffusion transformer (DiT, Peebles & Xie 2023) whose FFNs may be MoE layers
(DiT-MoE, Fei et al. 2024).

Shape legend (suffixes on tensor names):
    B  images     C  channels     H, W  image height, width
    T  tokens (patches)     D  model dim     P  values per output patch (p·p·C_out)

    x_BCHW --patchify + fixed 2D sin-cos positions--> h_BTD
    t_B, y_B --timestep MLP + label table--> c_BD = t_emb + y_emb
    h_BTD --N adaLN-Zero blocks (attention, then a dense or MoE FFN), each modulated by c_BD-->
    --final adaLN + linear--> [B, T, P] --unpatchify--> [B, C_out, H, W] (fp32)

Parameter names follow the DiT code (x_embedder, t_embedder, y_embedder, adaLN_modulation,
final_layer) except `layers.{i}` for its `blocks.{i}` and `ffn` for its `mlp`: the names the LLM
uses, which expert parallelism, checkpoints and upcycling rely on.

Builds on the meta device; `model.to_empty(device=...)` then `models.init.initialize(model,
seed)` gives a usable model (init_weights is the one place where weights and the position table
are set).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.dit.embed import (LabelEmbedder, PatchEmbed, SinCosPositions, TimestepEmbedder,
                              unpatchify)
from models.ffn import FeedForward
from models.init import Init, initialize, seed_from_global_rng
from models.config import is_moe_layer, moe_layer_config
from models.llm import configure_moe_layers
from models.moe import MoE


def modulate(x_BTD: torch.Tensor, shift_B1D: torch.Tensor, scale_B1D: torch.Tensor) -> torch.Tensor:
    # 1 + scale: a zero-initialised modulation leaves the normalised input unchanged.
    return x_BTD * (1 + scale_B1D) + shift_B1D


def _ada_ln(d_model: int, num_outputs: int) -> nn.Sequential:
    """SiLU -> Linear(D, num_outputs·D): per-image shift/scale/gate vectors from c (as DiT)."""
    return nn.Sequential(nn.SiLU(), nn.Linear(d_model, num_outputs * d_model))


def _zero_linear(linear: nn.Linear, init: Init) -> None:
    init.zeros(linear.weight)
    init.zeros(linear.bias)


class SelfAttention(nn.Module):
    """Non-causal multi-head self-attention over all patches; qkv and output biases as DiT."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(d_model, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o_BHTd = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(o_BHTd.transpose(1, 2).reshape(B, T, -1))

    def init_weights(self, init: Init) -> None:
        for linear in (self.qkv, self.proj):
            init.xavier_uniform(linear.weight)
            init.zeros(linear.bias)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate · f(LN(x)·(1 + scale) + shift) for f = attention, then FFN.

    The FFN is `MoE(D, moe_cfg)` on MoE layers (`is_moe_layer`), else a dense SwiGLU of ffn_dim.
    """

    def __init__(self, layer_id: int, cfg, moe_cfg):
        super().__init__()
        D = cfg.d_model
        # No affine parameters: the per-image shift/scale from c replace them.
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = SelfAttention(D, cfg.num_heads, cfg.head_dim or D // cfg.num_heads)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        if is_moe_layer(layer_id, moe_cfg):
            self.ffn: nn.Module = MoE(D, moe_layer_config(layer_id, moe_cfg))
        else:
            self.ffn = FeedForward(D, cfg.ffn_dim)
        self.adaLN_modulation = _ada_ln(D, 6)

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        mods = self.adaLN_modulation(c_BD)[:, None, :].chunk(6, dim=-1)  # each [B, 1, D]
        shift_attn, scale_attn, gate_attn, shift_ffn, scale_ffn, gate_ffn = mods
        x_BTD = x_BTD + gate_attn * self.attn(modulate(self.norm1(x_BTD), shift_attn, scale_attn))
        return x_BTD + gate_ffn * self.ffn(modulate(self.norm2(x_BTD), shift_ffn, scale_ffn))

    def init_weights(self, std: float, out_std: float, init: Init) -> None:
        self.attn.init_weights(init)
        self.ffn.init_weights(std, out_std, init)
        # adaLN-Zero: zero gates make every block the identity at init, so the untrained network
        # is the identity map up to the (also zero) final layer, which DiT found trains best.
        _zero_linear(self.adaLN_modulation[-1], init)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear(D, P): tokens -> output patches [B, T, P]."""

    def __init__(self, d_model: int, patch_values: int, eps: float):
        super().__init__()
        self.norm_final = nn.LayerNorm(d_model, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(d_model, patch_values)
        self.adaLN_modulation = _ada_ln(d_model, 2)

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BD)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x_BTD), shift, scale))

    def init_weights(self, init: Init) -> None:
        # Zero output: the model predicts 0 at init (DiT's adaLN-Zero, applied to the head too).
        _zero_linear(self.adaLN_modulation[-1], init)
        _zero_linear(self.linear, init)


# The model and its pipeline stages run the same code over the same attribute names.
def _embed(m, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h_BTD = m.x_embedder(x_BCHW) + m.positions.table
    c_BD = m.t_embedder(t_B) + m.y_embedder(y_B)
    return h_BTD, c_BD


def _decode(m, h_BTD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
    # fp32 out, so that the diffusion loss under bf16 autocast is computed in fp32 (like logits).
    return unpatchify(m.final_layer(h_BTD, c_BD), m.patch_size, m.out_channels).float()


class DiT(nn.Module):
    """(x [B, C, H, W], t [B] float, y [B] int) -> [B, C_out, H, W] fp32.

    C_out = 2·in_channels with learn_sigma (the noise prediction, then the variance
    interpolation v), else in_channels. t: float timesteps, integer diffusion steps 0..999 or
    flow time × 1000. y: class labels in [0, num_classes]; num_classes is the null label.

    Args:
        cfg: a `models.config.ModelConfig` with family "dit".
        moe_cfg: a `models.config.MoEConfig` (num_experts 0: every FFN is dense).
        seed: of the initial weights (models/init.py); None: from torch's global generator.
    """

    def __init__(self, cfg, moe_cfg, seed: int | None = None):
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe_cfg
        D = cfg.d_model
        if D % 4:
            raise ValueError(f"DiT needs d_model divisible by 4 (2D sin-cos positions), got {D}")
        self.patch_size = cfg.patch_size
        self.out_channels = 2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels
        self.x_embedder = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Keyed by the layer index, as MoETransformer: the same state-dict keys as a list, and a
        # pipeline stage holds any subset of the layers under their original names.
        self.layers = nn.ModuleDict({str(i): DiTBlock(i, cfg, moe_cfg) for i in range(cfg.num_layers)})
        configure_moe_layers([block.ffn for block in self.layers.values() if isinstance(block.ffn, MoE)], moe_cfg)
        self.final_layer = FinalLayer(D, cfg.patch_size ** 2 * self.out_channels, cfg.norm_eps)
        self.positions = SinCosPositions(D, self.x_embedder.grid_size)  # fixed, never saved
        if not self.positions.table.is_meta:  # seed: as MoETransformer's
            initialize(self, seed_from_global_rng() if seed is None else seed)

    @property
    def output_weight(self) -> torch.Tensor:
        """The head's weight (its size is the last pipeline stage's extra cost per token)."""
        return self.final_layer.linear.weight

    @torch.no_grad()
    def init_weights(self, init: Init) -> None:
        """The one place where weights are set, as DiT's initialize_weights: xavier-uniform for
        attention and the patch embedding, N(0, 0.02) for the label table and the timestep MLP,
        zeros for every adaLN modulation and the output linear, the FFNs (dense or MoE: router,
        experts, shared experts) N(0, init_std); the position table recomputed."""
        std = self.cfg.init_std
        # As MoETransformer: each block has two residual branches; 1/sqrt(2·num_layers) on the
        # FFN output projections keeps the residual stream's variance from growing with depth.
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        self.positions.init_buffers()
        self.x_embedder.init_weights(init)
        self.t_embedder.init_weights(init)
        self.y_embedder.init_weights(init)
        for block in self.layers.values():
            block.init_weights(std, out_std, init)
        self.final_layer.init_weights(init)


    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        h_BTD, c_BD = _embed(self, x_BCHW, t_B, y_B)
        for block in self.layers.values():
            h_BTD = block(h_BTD, c_BD)
        return _decode(self, h_BTD, c_BD)

    def forward_with_cfg(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: uncond + cfg_scale · (cond − uncond) over all output channels.

        The conditional and the unconditional (null-label) predictions come from one forward of
        2B images. Call in eval mode: in training mode labels are dropped at random and MoE layers
        record router statistics. Equals two separate forwards when routing is per token
        (token choice without capacity); expert choice or capacity limits see the 2B batch.
        """
        null_B = torch.full_like(y_B, self.cfg.num_classes)
        out_2B = self(torch.cat([x_BCHW, x_BCHW]), torch.cat([t_B, t_B]), torch.cat([y_B, null_B]))
        cond, uncond = out_2B.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    def pipeline_io(self, microbatch: int, seq_len: int = 0) -> tuple[tuple, tuple, torch.Tensor]:
        """Meta tensors of one pipeline microbatch at the stage boundaries (parallel/pipeline.py):
        (x_t [mb, C, H, W], time [mb], labels [mb]) -> (hidden [mb, T, D], conditioning [mb, D])
        -> output [mb, C_out, H, W]. `seq_len` is unused: the tokens are the image's patches."""
        meta, c, D = torch.device("meta"), self.cfg, self.cfg.d_model
        tokens = (c.image_size // c.patch_size) ** 2
        return ((torch.empty(microbatch, c.in_channels, c.image_size, c.image_size, device=meta),
                 torch.empty(microbatch, device=meta), torch.empty(microbatch, dtype=torch.long, device=meta)),
                (torch.empty(microbatch, tokens, D, device=meta), torch.empty(microbatch, D, device=meta)),
                torch.empty(microbatch, self.out_channels, c.image_size, c.image_size, device=meta))

    def pipeline_stage(self, layer_ids: list[int], first: bool, last: bool) -> "DiTStage":
        """A module that runs layers `layer_ids` (ascending) of this model, sharing its parameters
        under the model's names; the first stage also embeds, the last also decodes.

        forward: first stage (x, t, y) -> (h_BTD, c_BD); other stages (h, c) -> (h, c); the last
        stage returns the output [B, C_out, H, W]; a stage that is first and last is the model.
        """
        return DiTStage(self, layer_ids, first, last)


class DiTStage(nn.Module):
    """A slice of a `DiT` (see `DiT.pipeline_stage`). The conditioning c_BD travels with the
    hidden states from stage to stage, so every block sees it and its gradient flows back to the
    embedders on the first stage."""

    def __init__(self, model: DiT, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.layer_ids, self.first, self.last = list(layer_ids), first, last
        self.patch_size, self.out_channels = model.patch_size, model.out_channels
        self.x_embedder = model.x_embedder if first else None
        self.t_embedder = model.t_embedder if first else None
        self.y_embedder = model.y_embedder if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.final_layer = model.final_layer if last else None
        self.positions = model.positions if first else None  # the model's table module, shared

    def forward(self, *inputs: torch.Tensor):
        if self.first:
            h_BTD, c_BD = _embed(self, *inputs)
        else:
            h_BTD, c_BD = inputs
            # A new tensor (not a view: zero-bubble schedules detach stage outputs in place): the
            # stage never returns one of its inputs as an output. [mb, D], a negligible copy.
            c_BD = c_BD.clone()
        for block in self.layers.values():
            h_BTD = block(h_BTD, c_BD)
        if self.last:
            return _decode(self, h_BTD, c_BD)
        return h_BTD.contiguous(), c_BD.contiguous()  # sent to the next stage as they are
