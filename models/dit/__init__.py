"""Class-conditional diffusion transformer with dense or MoE FFNs (DiT, DiT-MoE).

    DiT(model_cfg, moe_cfg)               (x_BCHW, t_B, y_B) -> [B, C_out, H, W]
    DiT.forward_with_cfg(x, t, y, scale)  classifier-free guidance in one forward of 2B
    DiT.pipeline_stage(ids, first, last)  a slice sharing the model's parameters
"""
from models.dit.embed import (LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d_pos_embed,
                              timestep_embedding, unpatchify)
from models.dit.model import DiT, DiTBlock, DiTStage, FinalLayer, SelfAttention, modulate

__all__ = ["DiT", "DiTBlock", "DiTStage", "FinalLayer", "LabelEmbedder", "PatchEmbed", "SelfAttention",
           "TimestepEmbedder", "modulate", "sincos_2d_pos_embed", "timestep_embedding", "unpatchify"]
