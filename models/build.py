"""Build a model from its config, and count its parameters.

    build_model(model_cfg, moe_cfg, seed) -> nn.Module   by model_cfg.family: "llm" MoETransformer,
                                                     "dit" DiT; honours the current default
                                                     device (meta ok)
    param_counts(model, moe_cfg) -> (total, active)  active: each layer's routed experts count
                                                     top_k/E of that layer
"""
from __future__ import annotations

from torch import nn

from models.moe import moe_layers


def build_model(model_cfg, moe_cfg, seed: int | None = None) -> nn.Module:
    """Build the model named by `model_cfg.family`, its weights set from `seed`.

    Args:
        seed: the weights' seed (models/init.py: the same seed gives the same weights on any
            layout); None: drawn from torch's global generator, so torch.manual_seed decides.
    Under `with torch.device("meta"):` nothing is allocated and nothing set; then
    `model.to_empty(device=...)` (or parallel/'s per-rank materialisation) and
    `models.init.initialize(model, seed)`.
    """
    if model_cfg.family == "llm":
        from models.llm import MoETransformer

        return MoETransformer(model_cfg, moe_cfg, seed)
    if model_cfg.family == "dit":
        from models.dit import DiT

        return DiT(model_cfg, moe_cfg, seed)
    raise ValueError(f"unknown model family {model_cfg.family!r}; known: llm, dit")


def param_counts(model: nn.Module, moe_cfg) -> tuple[int, int]:
    """(total, active per token). Shared parameters count once; each routed expert is active for
    top_k of E tokens, so routed-expert parameters count top_k/E of their size, with each MoE
    layer's own top_k and E (they differ between the layers of a pruned model, see
    moe_cfg.layer_num_experts). Count before expert parallelism shards the experts."""
    total = sum(p.numel() for p in model.parameters())  # a Parameter shared by modules once
    routed_by_share: dict[tuple[int, int], int] = {}  # (top_k, E) -> routed parameters
    for layer in moe_layers(model):
        key = (layer.top_k, layer.num_experts)
        routed_by_share[key] = routed_by_share.get(key, 0) + sum(p.numel() for p in layer.experts.parameters())
    active = total
    for (top_k, E), routed in routed_by_share.items():
        active += routed * top_k // E - routed
    return total, active
