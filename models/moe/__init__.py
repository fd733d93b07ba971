"""Mixture-of-Experts building blocks and whole-model helpers.

Helpers over a model (any nn.Module containing `MoE` layers):
    moe_layers(model)              the MoE layers, in module order
    set_aux_loss_scale(model, s)   gradient given to every layer's aux loss (1/grad_accum_steps)
    pop_router_stats(model)        scalar router statistics since the last pop, then reset
    pop_step_loads(model)          tokens per expert per layer since the last call ([L, E];
                                   rows zero-padded to the widest layer in a pruned model)
    update_aux_free_bias(model, loads_LE)   aux-loss-free balancing step (after optimizer.step)
    expert_parameters(model)       (name, param) of routed experts (sharded by expert parallel)
    is_recomputing()               a forward is activation checkpointing's re-run (count nothing)
"""
from __future__ import annotations

import torch
from torch import nn

from models.moe.capacity import DROP_POLICIES, expert_capacity, keep_within_capacity
from models.moe.dispatcher import Dispatcher, LocalDispatcher, padded_slots, permute, unpermute_combine
from models.moe.experts import BACKENDS, GroupedExperts, is_expert_param, resolve_backend
from models.moe.layer import LOSS_NAMES, MoE, AttachAuxLoss
from models.moe.losses import (expert_balance_loss, load_balancing_loss, router_entropy, router_z_loss,
                               sequence_load_balancing_loss)
from models.moe.recompute import is_recomputing
from models.moe.router import (ROUTINGS, SCORE_FUNCS, ExpertChoiceRouter, RouterOutput, Routing,
                               TopKRouter, build_router)

__all__ = [
    "AttachAuxLoss", "BACKENDS", "DROP_POLICIES", "Dispatcher", "ExpertChoiceRouter", "GroupedExperts",
    "LOSS_NAMES", "LocalDispatcher", "MoE", "ROUTINGS", "RouterOutput", "Routing", "SCORE_FUNCS",
    "TopKRouter", "build_router", "expert_balance_loss", "expert_capacity", "expert_parameters",
    "is_expert_param", "is_recomputing", "keep_within_capacity", "load_balancing_loss", "moe_layer_indices",
    "moe_layers", "padded_slots", "permute", "pop_router_stats", "pop_step_loads", "resolve_backend",
    "router_entropy", "router_z_loss", "sequence_load_balancing_loss", "set_aux_loss_scale", "unpermute_combine",
    "update_aux_free_bias",
]


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of `model`, in `model.modules()` order (layer i of the stats keys)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_layer_indices(model: nn.Module) -> list[int]:
    """Index of each of `moe_layers(model)` among the MoE layers of the whole model (its
    `moe_index`; the position in `model` for layers built on their own)."""
    return [i if layer.moe_index is None else layer.moe_index for i, layer in enumerate(moe_layers(model))]


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
        moe/aux_loss, moe/seq_aux_loss, moe/z_loss, moe/expert_balance_loss
                                      mean over layers of the per-forward mean of the value
                                      attached (coefficient included, aux_loss_scale not);
                                      a key is absent when its coefficient is 0 (the balance
                                      losses are also absent under expert choice)
        moe/load_max_over_mean        mean over layers of max/mean tokens per expert (1 = balanced)
        moe/router_entropy            mean over layers of the mean routing entropy (nats)
        moe/dropped_fraction          mean over layers of the dropped share: (token, slot)
                                      assignments over capacity (token choice), tokens no expert
                                      picked (expert choice); 0 when dropless
        moe/aux_free_bias_abs_mean, moe/aux_free_bias_abs_max   mean and max of |bias| over the
                                      aux-free layers (current values); only with moe.aux_free
        moe/layer{i}/load_max_over_mean, moe/layer{i}/router_entropy   per MoE layer i (index
                                      among the whole model's MoE layers, `moe_layer_indices`);
                                      moe/layer{i}/dropped_fraction only for layers that can drop
    Loads count the router's choice before capacity drops. Layers without a training forward
    since the last pop are skipped; {} if none had one. With `with_loads=True`, returns
    `(scalars, loads_LE)`: tokens routed per expert summed over the forwards, float [L, E] on CPU,
    for expert-load heatmaps (None when no layer had stats). When the layers have different expert
    counts (a pruned model), E is the largest and a layer's row is NaN past its own count.
    """
    layers = moe_layers(model)
    names = moe_layer_indices(model)
    per_layer = [(i, s) for i, layer in enumerate(layers) if (s := layer.pop_stats())]
    if not per_layer:
        return ({}, None) if with_loads else {}
    values: dict[str, torch.Tensor] = {}  # stacked and read back in one host sync
    for name in LOSS_NAMES:
        if found := [s[name] for _, s in per_layer if name in s]:
            values[f"moe/{name}"] = torch.stack(found).mean()
    ratios = [_max_over_mean(s["tokens_per_expert"]) for _, s in per_layer]
    values["moe/load_max_over_mean"] = torch.stack(ratios).mean()
    values["moe/router_entropy"] = torch.stack([s["entropy"] for _, s in per_layer]).mean()
    values["moe/dropped_fraction"] = torch.stack([s["dropped_fraction"] for _, s in per_layer]).mean()
    biases = [b.detach().float().abs() for layer in layers if (b := layer.expert_bias_E) is not None]
    if biases:
        values["moe/aux_free_bias_abs_mean"] = torch.stack([b.mean() for b in biases]).mean()
        values["moe/aux_free_bias_abs_max"] = torch.stack([b.max() for b in biases]).max()
    for (i, s), r in zip(per_layer, ratios):
        values[f"moe/layer{names[i]}/load_max_over_mean"] = r
        values[f"moe/layer{names[i]}/router_entropy"] = s["entropy"]
        if layers[i].can_drop:
            values[f"moe/layer{names[i]}/dropped_fraction"] = s["dropped_fraction"]
    device = ratios[0].device
    flat = torch.stack([v.to(device=device, dtype=torch.float32) for v in values.values()]).tolist()
    scalars = dict(zip(values, flat))
    loads_LE = None
    loads = [s["tokens_per_expert"].float().cpu() for _, s in per_layer]
    width = max(t.numel() for t in loads)
    loads_LE = torch.stack([torch.nn.functional.pad(t, (0, width - t.numel()), value=float("nan")) for t in loads])
    return (scalars, loads_LE) if with_loads else scalars


def pop_step_loads(model: nn.Module) -> torch.Tensor:
    """Tokens per expert chosen by each MoE layer's router in training forwards since the last
    call (before capacity drops), and reset.

    Returns float [L, E] on the model's device (L = len(moe_layers(model)); a layer without a
    forward gives a row of zeros), ready for a data-parallel all-reduce(SUM) before
    `update_aux_free_bias`. Independent of `pop_router_stats`. Empty [0, 0] without MoE layers.
    When the layers have different expert counts (a pruned model), E is the largest and a
    layer's row is zero past its own count.
    """
    layers = moe_layers(model)
    if not layers:
        return torch.zeros(0, 0)
    rows = [layer.pop_step_loads() for layer in layers]
    width = max(r.numel() for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])


@torch.no_grad()
def update_aux_free_bias(model: nn.Module, loads_LE: torch.Tensor) -> None:
    """Aux-loss-free balancing, once per optimizer step: on every MoE layer with moe.aux_free,
    bᵢ ← bᵢ + u·sign(mean load − loadᵢ) with that layer's row of `loads_LE` (from
    `pop_step_loads`, summed over data-parallel ranks so every rank applies the same update).
    No-op on other layers; rows of zeros leave the bias unchanged."""
    layers = moe_layers(model)
    if loads_LE.shape[0] != len(layers):
        raise ValueError(f"loads_LE has {loads_LE.shape[0]} rows for {len(layers)} MoE layers")
    for layer, load_E in zip(layers, loads_LE):
        if isinstance(layer.router, TopKRouter):
            layer.router.update_expert_bias(load_E[:layer.router.num_experts])  # drop the row's padding
