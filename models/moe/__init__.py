"""Mixture-of-Experts building blocks and whole-model helpers.

Helpers over a model (any nn.Module containing `MoE` layers):
    moe_layers(model)              the MoE layers, in module order
    set_aux_loss_scale(model, s)   gradient given to every layer's aux loss (1/grad_accum_steps)
    pop_router_stats(model)        scalar router statistics since the last pop, then reset
    expert_parameters(model)       (name, param) of routed experts (sharded by expert parallel)
"""
from __future__ import annotations

import torch
from torch import nn

from models.moe.dispatcher import Dispatcher, LocalDispatcher, permute, unpermute_combine
from models.moe.experts import BACKENDS, GroupedExperts, is_expert_param, resolve_backend
from models.moe.layer import MoE, AttachAuxLoss
from models.moe.losses import load_balancing_loss, router_entropy, router_z_loss
from models.moe.router import RouterOutput, TopKRouter

__all__ = [
    "AttachAuxLoss", "BACKENDS", "Dispatcher", "GroupedExperts", "LocalDispatcher", "MoE",
    "RouterOutput", "TopKRouter", "expert_parameters", "is_expert_param", "load_balancing_loss",
    "moe_layers", "permute", "pop_router_stats", "resolve_backend", "router_entropy",
    "router_z_loss", "set_aux_loss_scale", "unpermute_combine",
]


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of `model`, in `model.modules()` order (layer i of the stats keys)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Set the aux-loss gradient of every MoE layer; use 1/grad_accum_steps so that the summed
    micro-step gradients equal those of the mean loss plus the mean aux loss."""
    for layer in moe_layers(model):
        layer.aux_loss_scale = float(scale)


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every routed-expert parameter (dim 0 = expert index)."""
    return [(n, p) for n, p in model.named_parameters() if is_expert_param(n)]


def _max_over_mean(load_E: torch.Tensor) -> torch.Tensor:
    return load_E.max() / load_E.mean().clamp_min(1e-20)


def pop_router_stats(model: nn.Module, with_loads: bool = False):
    """Aggregate the router statistics of all MoE layers since the last pop, and reset them.

    Returns a dict[str, float] with
        moe/aux_loss, moe/z_loss      mean over layers of the per-forward mean of the value
                                      attached (coefficient included, aux_loss_scale not)
        moe/load_max_over_mean        mean over layers of max/mean tokens per expert (1 = balanced)
        moe/router_entropy            mean over layers of the mean routing entropy (nats)
        moe/layer{i}/load_max_over_mean   per MoE layer i (index among MoE layers)
    Layers without a training forward since the last pop are skipped; {} if none had one.
    With `with_loads=True`, returns `(scalars, loads_LE)`: tokens routed per expert summed over
    the forwards, float [L, E] on CPU, for expert-load heatmaps (None when no layer had stats).
    """
    per_layer = [(i, s) for i, layer in enumerate(moe_layers(model)) if (s := layer.pop_stats())]
    scalars: dict[str, float] = {}
    loads_LE = None
    if per_layer:
        ratios = [_max_over_mean(s["tokens_per_expert"]) for _, s in per_layer]
        for key, name in (("aux_loss", "moe/aux_loss"), ("z_loss", "moe/z_loss"),
                          ("entropy", "moe/router_entropy")):
            scalars[name] = torch.stack([s[key] for _, s in per_layer]).mean().item()
        scalars["moe/load_max_over_mean"] = torch.stack(ratios).mean().item()
        for (i, _), r in zip(per_layer, ratios):
            scalars[f"moe/layer{i}/load_max_over_mean"] = r.item()
        loads = [s["tokens_per_expert"] for _, s in per_layer]
        if len({t.numel() for t in loads}) == 1:
            loads_LE = torch.stack(loads).cpu()
    return (scalars, loads_LE) if with_loads else scalars
