"""A prune run's evaluation before and after compression: the loop's evaluation (validation loss,
then the task's own: DiT samples, class accuracy and FD) on the whole model, before any
parallelism, with the lines and sample grids tagged by phase."""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from models.moe import pop_router_stats
from parallel import all_reduce_mean
from trainer.config import Config


class _NoEMA:
    """The model already holds the weights to sample with (the checkpoint's EMA)."""

    @staticmethod
    def applied():
        return contextlib.nullcontext()


@dataclass
class _EvalView:
    """The attributes of a Trainer that a task's `evaluate_extra` reads."""

    unwrapped_model: nn.Module
    run_dir: str
    pipeline: object = None
    ema: _NoEMA = field(default_factory=_NoEMA)
    step: int = 0


class _EvalLog:
    """A MetricsLogger stand-in for `evaluate_extra`: prints tagged lines on rank 0 and keeps the
    sample grid under its own name (plots/prune_<tag>_samples.png)."""

    def __init__(self, enabled: bool, run_dir: str, tag: str):
        self.enabled, self.run_dir, self.tag = enabled, run_dir, tag
        self.renamed: dict[str, str] = {}

    def print(self, message: str) -> None:
        if self.enabled:
            for old, new in self.renamed.items():
                message = message.replace(old, new)
            print(f"prune ({self.tag}): {message}", file=sys.stderr, flush=True)

    def log_image(self, key: str, path: str, step: int) -> None:
        if self.enabled and os.path.isfile(path):
            self.renamed[path] = os.path.join(os.path.dirname(path), f"prune_{self.tag}_{key}.png")
            os.replace(path, self.renamed[path])


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, task, mesh, run_dir: str, tag: str) -> tuple[dict, dict]:
    """The loop's evaluation on the whole model: validation loss over eval.batches per dp rank
    (mean over dp), then the task's own evaluation (DiT: samples, class accuracy and FD).

    Returns:
        ({"val_loss": ..., "ppl" | "acc", "fd", ...}, the task's eval/* dict (rank 0 only for DiT)).
    """
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bf16")
    losses = []
    for index, batch in enumerate(task.data.val_batches(cfg.eval.batches)):
        with autocast:
            losses.append(task.eval_loss(model, task.to_device(batch), index).float())
    pop_router_stats(model)  # evaluation routing is not training routing
    val_loss = all_reduce_mean(torch.stack(losses).mean(), mesh.dp_group).item()
    out = {"val_loss": val_loss}
    if cfg.model.family == "llm":
        out["ppl"] = math.exp(min(val_loss, 50.0))
    extra = task.evaluate_extra(_EvalView(model, run_dir), _EvalLog(mesh.is_main, run_dir, tag))
    pop_router_stats(model)
    model.eval()
    out.update({k.split("/", 1)[1]: v for k, v in extra.items()})
    if mesh.is_main:
        print(f"prune ({tag}): val loss {val_loss:.4f}", file=sys.stderr, flush=True)
    return out, extra
