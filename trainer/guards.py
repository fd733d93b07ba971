"""Guards of the training loop: non-finite steps skipped (then stopped), routing collapse warned.

Non-finite guard. A step whose loss or gradient norm is not finite does not reach the optimizer:
gradients are zeroed, the scheduler, EMA and aux-free bias stay where they are, and the step is
counted (`nonfinite_skipped` in metrics.jsonl, a line on stderr). After train.max_nonfinite_steps
such steps in a row the run stops, naming the step and the first parameter (model order) whose
gradient is not finite. The decision is taken on values every rank holds identically — the loss
averaged over dp (and sent from the last pipeline stage) and the global gradient norm (summed over
ep and pp) — so all ranks skip or step together and none runs ahead alone.

Collapse monitor. At each log step, from the router loads the loop has just summed over dp: a MoE
layer in which one expert took more than train.collapse_share of the routed tokens for
train.collapse_steps log intervals in a row gets a warning naming the layer and the expert.
"""
from __future__ import annotations

import math
import re

import torch

from parallel.fsdp import local_tensor

_LAYER_KEY = re.compile(r"^moe/layer(\d+)/load_max_over_mean$")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: training stops."""


def first_nonfinite_grad(model: torch.nn.Module) -> str | None:
    """The name of the first parameter (model order) whose gradient holds a NaN or an inf."""
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(local_tensor(param.grad)).all():
            return name
    return None


class NonFiniteGuard:
    """Counts non-finite steps; `check` says whether the optimizer may step (see the module docstring).

    Args:
        max_in_row: train.max_nonfinite_steps (0: stop at the first non-finite step).
    """

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.skipped_since_log = 0

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, model: torch.nn.Module) -> bool:
        """True: step. False: skip this step (the caller zeroes the gradients). Raises NonFiniteError
        past the limit. `loss`, `grad_norm`: reduced values, identical on every rank; `model`: this
        rank's (unwrapped) parameters, before clipping (a clipped gradient would all be NaN)."""
        loss_value, norm_value = float(loss), float(grad_norm)
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped_since_log += 1
        if self.in_row > self.max_in_row:
            name = first_nonfinite_grad(model)
            raise NonFiniteError(
                f"step {step}: loss {loss_value}, gradient norm {norm_value}: not finite for {self.in_row} step(s) in a "
                f"row (train.max_nonfinite_steps={self.max_in_row}); first parameter with a non-finite gradient: "
                f"{name or 'none on this rank (the loss itself is not finite)'}")
        return False

    def describe_skip(self, step: int, loss: float, grad_norm: float) -> str:
        return (f"warning: step {step}: loss {loss}, gradient norm {grad_norm}: not finite; optimizer step skipped "
                f"({self.in_row} in a row, train.max_nonfinite_steps={self.max_in_row})")

    def pop_metrics(self) -> dict:
        """{"nonfinite_skipped": steps skipped since the previous log step}, or {} when none was."""
        count, self.skipped_since_log = self.skipped_since_log, 0
        return {"nonfinite_skipped": count} if count else {}


class CollapseMonitor:
    """Per MoE layer, how many log intervals in a row one expert took more than `share` of the tokens.

    Args:
        share: train.collapse_share; intervals: train.collapse_steps (0: off).
        num_experts: the experts of each MoE layer (moe.layer_num_experts, or moe.num_experts for
            all), for the share when the per-expert loads are not logged (logging.expert_loads
            false: the expert is not named then).
    """

    def __init__(self, share: float, intervals: int, num_experts: list[int] | int):
        self.share, self.intervals, self.num_experts = share, intervals, num_experts
        self.in_row: dict[int, int] = {}

    @classmethod
    def from_config(cls, cfg) -> "CollapseMonitor":
        moe = cfg.moe
        return cls(cfg.train.collapse_share, cfg.train.collapse_steps if moe.num_experts > 0 else 0,
                   list(moe.layer_num_experts) or moe.num_experts)

    def _experts_of(self, layer: int) -> int:
        return self.num_experts[layer] if isinstance(self.num_experts, list) else self.num_experts

    def update(self, step: int, record: dict) -> list[str]:
        """Read one metrics record (after `_router_stats`); returns the warnings it raises."""
        if not self.intervals:
            return []
        layer_ids = sorted(int(m.group(1)) for m in map(_LAYER_KEY.match, record) if m)
        loads = record.get("moe/tokens_per_expert")
        warnings = []
        for row, layer in enumerate(layer_ids):
            if loads is not None and row < len(loads) and sum(loads[row]) > 0:
                counts = loads[row]
                expert, top = max(enumerate(counts), key=lambda pair: pair[1])
                share, who = top / sum(counts), f"expert {expert}"
            else:  # max/mean over E experts = E x the top expert's share
                share = record[f"moe/layer{layer}/load_max_over_mean"] / self._experts_of(layer)
                who = "one expert (set logging.expert_loads=true to name it)"
            self.in_row[layer] = self.in_row.get(layer, 0) + 1 if share > self.share else 0
            if self.in_row[layer] == self.intervals:  # once per streak
                warnings.append(
                    f"warning: step {step}: routing collapse in MoE layer {layer}: {who} took {share:.0%} of its "
                    f"tokens for {self.intervals} log intervals in a row (train.collapse_share={self.share:g}, "
                    f"train.collapse_steps={self.intervals})")
        return warnings


def clip_with_norm(model: torch.nn.Module, max_norm: float, grad_norm: torch.Tensor) -> None:
    """Scale the gradients as `parallel.clip_grad_norm(model, mesh, max_norm)` does, given the norm
    it measured (max_norm 0: no clipping); the guard reads the gradients in between. As torch's
    clip_grads_with_norm_: by max_norm / (norm + 1e-6) when that is below 1, here on the local
    shards (FSDP gradients live on several meshes, which one foreach over DTensors refuses)."""
    if max_norm > 0:
        grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, (max_norm / (grad_norm.to(grads[0].device) + 1e-6)).clamp(max=1.0))
