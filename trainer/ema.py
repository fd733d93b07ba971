"""Exponential moving average of the weights (DiT sampling uses the EMA model, as DiT does).

Kept per rank for the trainable parameters this rank holds (its expert shard under expert
parallelism, its stages under pipeline parallelism), under the model's parameter names, so it is
checkpointed and resharded exactly like the parameters (trainer/checkpoint.py `extra_state`).
Frozen parameters (a PEFT run's base) never change, so their average is themselves: a PEFT run
keeps and checkpoints the EMA of its adapters only.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from parallel.fsdp import local_tensor


class EMA:
    """shadow ← d·shadow + (1 − d)·param after every optimizer step.

    d = min(decay, (1 + n) / (10 + n)) at update n: the usual warmup, so that a short run's EMA is
    not dominated by the random initial weights (with decay 0.999 the first ~1000 steps would be).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}
        self.num_updates = torch.zeros((), dtype=torch.long)  # a tensor: checkpointed with the shadow

    @torch.no_grad()
    def update(self) -> None:
        n = int(self.num_updates)
        d = min(self.decay, (1 + n) / (10 + n))
        # On the local shards (FSDP: the shadow has the parameter's sharding; the EMA is elementwise).
        shadows = [local_tensor(s) for s in self.shadow.values()]
        torch._foreach_lerp_(shadows, [local_tensor(self.params[k].detach()) for k in self.shadow], 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Live tensors (a checkpoint load writes into them in place)."""
        return {**self.shadow, "num_updates": self.num_updates}

    @contextlib.contextmanager
    def applied(self):
        """Run the model with the EMA weights inside the block; the trained weights come back after."""
        with torch.no_grad():
            saved = {k: local_tensor(p.detach()).clone() for k, p in self.params.items()}
            for k, p in self.params.items():
                local_tensor(p.detach()).copy_(local_tensor(self.shadow[k]))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    local_tensor(p.detach()).copy_(saved[k])
