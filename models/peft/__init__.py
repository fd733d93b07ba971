"""Parameter-efficient fine-tuning of our models (LLM and DiT, dense or MoE): LoRA on linear
layers and routed experts, PERFT adapters inside MoE layers, ESFT (train only task experts).

Applied in place to a model that already holds its base weights, before expert parallelism,
pipeline splitting and DDP (those then treat the adapters as any other parameter: expert LoRA
is sharded with its experts, PERFT adapters are replicated). Base parameter names never change,
so a base checkpoint loads into an adapted model with strict=False, only adapter keys missing.

    apply_peft(model, peft_cfg, expert_selection=None) -> str    freeze + inject; a summary line
    apply_lora(model, targets, rank, alpha, dropout) -> names    see lora.py
    apply_perft(model, variant, num_adapters, top_k, rank) -> layers    see perft.py
    expert_scores / select_experts / apply_esft / zero_frozen_expert_grads /
        partially_frozen_parameters                              see esft.py
    merge_adapters(model) -> int          fold LoRA into the base weights, remove its parameters
    count_parameters(model) -> (trainable, total)
    adapter_parameter_names(model) -> names of the trainable parameters (what a PEFT checkpoint holds)
"""
from __future__ import annotations

from torch import nn

from models.config import ESFT_SCORES, PEFT_METHODS, PERFT_VARIANTS
from models.moe import moe_layers
from models.peft.esft import (apply_esft, expert_scores, partially_frozen_parameters,
                              select_experts, zero_frozen_expert_grads)
from models.peft.lora import ExpertLoRA, LoRALinear, apply_lora, merge_lora
from models.peft.perft import PerftAdapters, apply_perft, has_perft


__all__ = [
    "ESFT_SCORES", "ExpertLoRA", "LoRALinear", "PEFT_METHODS", "PERFT_VARIANTS", "PerftAdapters",
    "adapter_parameter_names", "apply_esft", "apply_lora", "apply_peft", "apply_perft",
    "count_parameters", "expert_scores", "merge_adapters", "partially_frozen_parameters",
    "select_experts", "zero_frozen_expert_grads",
]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, adapters included (a shared Parameter counts once).

    ESFT's expert tensors train only their selected rows (the others get zero gradients), so a
    tensor of a module with `esft_trainable_E` counts the selected experts' share of its elements.
    """
    selected_share = {}
    for module in model.modules():
        mask_E = getattr(module, "esft_trainable_E", None)
        if mask_E is not None:
            offset = getattr(module, "expert_offset", 0)
            local_E = mask_E[offset:offset + module.num_experts]
            for p in module.parameters(recurse=False):
                selected_share[id(p)] = int(local_E.sum()) / local_E.numel()
    params = list(model.parameters())
    trainable = sum(round(p.numel() * selected_share.get(id(p), 1.0)) for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters: what a PEFT checkpoint holds besides its base."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_adapters(model: nn.Module) -> int:
    """Fold every LoRA into its base weight in place and remove the LoRA parameters
    (LoRALinear -> nn.Linear, experts.lora -> None); returns how many modules were merged.

    Raises:
        ValueError: the model has PERFT adapters (extra modules, not weight deltas).
    """
    if has_perft(model):
        raise ValueError("merge: PERFT adapters cannot be merged into the base weights "
                         "(they are extra modules beside the experts, not weight deltas)")
    return merge_lora(model)


def _unfreeze_routers(model: nn.Module) -> None:
    for layer in moe_layers(model):
        layer.router.requires_grad_(True)


def apply_peft(model: nn.Module, peft_cfg, expert_selection: list[list[int]] | None = None) -> str:
    """Make `model` a PEFT model as `peft_cfg` (a `trainer.adapt.config.PeftConfig`) asks, in place.

    none: nothing changes; full: everything trainable; lora / perft: the base frozen, adapters
    added (trainable); esft: everything frozen but the experts of `expert_selection` (from
    `select_experts`, required). lora, perft and esft also train the MoE routers with
    peft_cfg.train_router.

    Returns:
        A one-line summary, e.g. "peft lora: 8 modules (rank 8, alpha 16.0); trainable 73,728 of
        3,000,000 parameters (2.46%)".
    """
    c = peft_cfg
    method = c.method
    if method not in PEFT_METHODS:
        raise ValueError(f"peft.method {method!r} is not one of {', '.join(PEFT_METHODS)}")
    if method == "none":
        what = "no adapters, the model unchanged"
    elif method == "full":
        model.requires_grad_(True)
        what = "full fine-tuning"
    elif method == "esft":
        if expert_selection is None:
            raise ValueError("peft esft: needs the expert selection (select_experts on task data)")
        apply_esft(model, expert_selection, c.train_router)
        num_chosen = sum(len(s) for s in expert_selection)
        num_total = sum(layer.num_experts for layer in moe_layers(model))
        what = f"{num_chosen} of {num_total} experts ({c.esft_score}, top_p {c.esft_top_p})"
    else:
        model.requires_grad_(False)
        if method == "lora":
            names = apply_lora(model, list(c.lora_targets), c.lora_rank, c.lora_alpha, c.lora_dropout)
            what = f"{len(names)} modules (rank {c.lora_rank}, alpha {c.lora_alpha})"
        else:
            num_layers = apply_perft(model, c.perft_variant, c.perft_num_adapters, c.perft_top_k, c.perft_rank)
            what = f"variant {c.perft_variant} in {num_layers} MoE layers (rank {c.perft_rank})"
        if c.train_router:
            _unfreeze_routers(model)
    if method in ("lora", "perft", "esft") and c.train_router:
        what += ", routers trained"
    trainable, total = count_parameters(model)
    return (f"peft {method}: {what}; trainable {trainable:,} of {total:,} parameters "
            f"({100.0 * trainable / max(total, 1):.2f}%)")
