"""AdamW with no-decay groups and the learning-rate schedules of a recipe."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainer.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, no_decay_params=(), params=None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, vectors (norm gains, biases) do not,
    as in nanoGPT/Megatron.

    Embeddings and expert weights are matrices and decay like any other weight. `no_decay_params`
    never decay either: ESFT's expert tensors, whose frozen rows get zero gradients and must not
    move (zero gradient and zero moments make a zero AdamW update only without decay).
    `params`: some of the model's parameters only (default all; the DeepSpeed engine splits them).
    """
    forced = {id(p) for p in no_decay_params}
    decay, no_decay = [], []
    for param in model.parameters() if params is None else params:
        if param.requires_grad:
            (decay if param.ndim >= 2 and id(param) not in forced else no_decay).append(param)
    # Empty groups left out (LoRA has matrices only): checkpoint state dicts cannot hold them.
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **kernel_choice(cfg.implementation, [p for g in groups for p in g["params"]]))


def kernel_choice(implementation: str, params: list[torch.Tensor]) -> dict:
    """AdamW's keyword for `optim.implementation`: auto = fused where every parameter is a floating
    CUDA tensor (one kernel launch per dtype group instead of a dozen foreach passes over the
    moments: the update is memory-bound), torch's default elsewhere."""
    if implementation == "auto":
        on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        return {"fused": True} if on_cuda else {}
    if implementation == "fused":
        return {"fused": True}
    return {"foreach": implementation == "foreach"}


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Linear warmup over `warmup_steps`, then: cosine to `min_lr_ratio`; warmup-stable-decay (flat,
    then a linear decay over the last `decay_fraction` of the steps); or constant.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(total_steps * cfg.decay_fraction))
    decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
