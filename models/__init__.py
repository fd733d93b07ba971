"""Plain torch models. Nothing here imports torch.distributed; parallel/ wraps from outside.

    build_model(model_cfg, moe_cfg) -> nn.Module     by model_cfg.family: "llm" MoETransformer,
                                                     "dit" DiT; honours the current default
                                                     device (meta ok)
    param_counts(model, moe_cfg) -> (total, active)  active: routed experts count top_k/E
"""
from __future__ import annotations

from torch import nn

from models.moe import is_expert_param


def build_model(model_cfg, moe_cfg) -> nn.Module:
    """Build the model named by `model_cfg.family`.

    Under `with torch.device("meta"):` nothing is allocated; then use
    `model.to_empty(device=...); model.init_weights()`.
    """
    if model_cfg.family == "llm":
        from models.llm import MoETransformer

        return MoETransformer(model_cfg, moe_cfg)
    if model_cfg.family == "dit":
        from models.dit import DiT

        return DiT(model_cfg, moe_cfg)
    raise ValueError(f"unknown model family {model_cfg.family!r}; known: llm, dit")


def param_counts(model: nn.Module, moe_cfg) -> tuple[int, int]:
    """(total, active per token). Shared parameters count once; each routed expert is active for
    top_k of num_experts tokens, so routed-expert parameters count top_k/E of their size."""
    total = routed = 0
    for name, p in model.named_parameters():  # yields a Parameter shared by modules once
        total += p.numel()
        if is_expert_param(name):
            routed += p.numel()
    active = total - routed
    if moe_cfg.num_experts > 0:
        active += routed * moe_cfg.top_k // moe_cfg.num_experts
    return total, active
