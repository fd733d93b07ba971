"""ESFT: expert-specialised fine-tuning — train only the experts the task routes to.

Shape legend (suffixes on tensor names):
    L  MoE layers (`moe_layers` order)     E  routed experts (global count)

1. `expert_scores`: run the base model on task batches and sum, per layer and expert, the gate
   weights of the kept assignments (gate_mass) or their count / top_k (token_share).
2. `select_experts`: normalise each layer's scores to sum 1; keep the smallest set of experts,
   highest scores first, whose cumulative share reaches top_p.
3. `apply_esft`: everything frozen except the selected experts' rows of the expert tensors (and
   the routers with train_router). A tensor cannot be partially trainable, so the expert tensors
   of a layer with a selection are trainable as a whole and, after every backward,
   `zero_frozen_expert_grads` zeroes the other experts' rows. With weight decay 0 on those
   tensors (`partially_frozen_parameters`), AdamW's moments of the frozen rows stay zero and the
   rows never move, bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from models.config import ESFT_SCORES
from models.moe import moe_layers



@torch.no_grad()
def expert_scores(model: nn.Module, run_forward: Callable[[int], object], num_batches: int,
                  score: str = "gate_mass") -> torch.Tensor:
    """Raw (unnormalised) expert scores on task data.

    Args:
        model: holds the MoE layers (not yet expert-sharded: scores are over global expert ids).
        run_forward: run_forward(i) does forward pass i of the model (its return is ignored).
        num_batches: forwards to run.
        score: "gate_mass" (sum of the kept assignments' gate weights) or "token_share" (count
            of kept assignments / top_k).
    Returns:
        float64 [L, E] on the routers' device, L in `moe_layers` order; the caller sums it over
        data-parallel ranks before `select_experts`.

    Runs in eval mode (no router jitter, no label dropout, and no router statistics or expert
    loads recorded for balancing), then restores every module's mode.
    """
    if score not in ESFT_SCORES:
        raise ValueError(f"esft score {score!r} is not one of {', '.join(ESFT_SCORES)}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("esft: the model has no MoE layers (moe.num_experts = 0)")
    device = layers[0].router.gate.weight.device
    scores_LE = torch.zeros(len(layers), max(layer.num_experts for layer in layers), dtype=torch.float64,
                            device=device)

    def hook_for(i: int, top_k: int):
        def hook(_router, _inputs, out) -> None:
            r = out.routing
            if score == "gate_mass":
                values_N = r.weight_N.double()
            else:
                values_N = torch.full(r.expert_idx_N.shape, 1.0 / top_k, dtype=torch.float64, device=device)
            scores_LE[i].index_add_(0, r.expert_idx_N.to(device), values_N.to(device))
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [layer.router.register_forward_hook(hook_for(i, layer.top_k)) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for i in range(num_batches):
            run_forward(i)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return scores_LE


def select_experts(scores_LE: torch.Tensor, top_p: float) -> list[list[int]]:
    """Per layer, the smallest set of experts (highest normalised score first, ties to the lower
    id) whose cumulative share of the layer's score reaches top_p; ascending ids. A layer whose
    scores are all zero (no token reached it) gets an empty set."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"esft top_p: {top_p} must be in (0, 1]")
    selection = []
    for row in scores_LE.detach().double().cpu().tolist():
        total = sum(row)
        chosen, mass = [], 0.0
        if total > 0:
            for e in sorted(range(len(row)), key=lambda e: (-row[e], e)):
                chosen.append(e)
                mass += row[e] / total
                if mass >= top_p - 1e-12:  # rounding must not add an expert at an exact top_p
                    break
        selection.append(sorted(chosen))
    return selection


def _expert_tensors(experts: nn.Module) -> list[nn.Parameter]:
    return [experts.w1_EFD, experts.w3_EFD, experts.w2_EDF]


def apply_esft(model: nn.Module, selection: list[list[int]], train_router: bool = False) -> None:
    """Freeze everything except the selected experts (and the routers with train_router).

    Args:
        selection: per MoE layer (`moe_layers` order), the global ids of the experts to train.
        train_router: also train the MoE routers.

    Records the trainable rows as `experts.esft_trainable_E` (bool [E] over the global experts,
    a plain attribute: not in the state dict, and not sliced by expert sharding).
    """
    layers = moe_layers(model)
    if len(selection) != len(layers):
        raise ValueError(f"esft selection has {len(selection)} layers, the model {len(layers)} MoE layers")
    model.requires_grad_(False)
    for i, (layer, chosen) in enumerate(zip(layers, selection)):
        experts = layer.experts
        if any(not 0 <= e < layer.num_experts for e in chosen):
            raise ValueError(f"esft selection of MoE layer {i}: {chosen} has ids outside [0, {layer.num_experts})")
        # On the CPU whatever the model's device (meta included): E booleans, read by counts and
        # optimizer grouping on the host; zero_frozen_expert_grads moves its slice to the grads.
        mask_E = torch.zeros(layer.num_experts, dtype=torch.bool)
        mask_E[list(chosen)] = True
        experts.esft_trainable_E = mask_E
        for p in _expert_tensors(experts):
            p.requires_grad_(bool(chosen))
        if train_router:
            layer.router.requires_grad_(True)


def _local_mask(experts: nn.Module) -> torch.Tensor:
    """The trainable rows this module holds: rows [expert_offset, +num_experts) of the global
    mask (`shard_experts` sets expert_offset; 0 when not sharded)."""
    offset = getattr(experts, "expert_offset", 0)
    return experts.esft_trainable_E[offset:offset + experts.num_experts]


@torch.no_grad()
def zero_frozen_expert_grads(model: nn.Module) -> None:
    """Zero the gradient rows of the experts ESFT did not select (call after the last backward,
    before gradient sync and clipping). No-op on models without ESFT."""
    for layer in moe_layers(model):
        experts = layer.experts
        if getattr(experts, "esft_trainable_E", None) is None:
            continue
        frozen_E = ~_local_mask(experts).to(experts.w1_EFD.device)
        for p in _expert_tensors(experts):
            if p.grad is not None:
                p.grad.masked_fill_(frozen_E[:, None, None], 0)


def partially_frozen_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable expert tensors that also hold frozen rows: they need weight decay 0 (decay
    would move the frozen rows). Decided on the global selection, so every ep rank agrees."""
    out = []
    for layer in moe_layers(model):
        experts = layer.experts
        mask_E = getattr(experts, "esft_trainable_E", None)
        if mask_E is not None and bool(mask_E.any()) and not bool(mask_E.all()):
            out.extend(p for p in _expert_tensors(experts) if p.requires_grad)
    return out
