"""The task of a run, by model family: what it trains on, its loss and its evaluation."""
from __future__ import annotations

import torch

from trainer.config import Config


def build_task(cfg: Config, mesh, device: torch.device):
    """LMTask (trainer/lm/task.py) or DiffusionTask (trainer/diffusion/task.py)."""
    if cfg.model.family == "dit":
        from trainer.diffusion.task import DiffusionTask

        return DiffusionTask(cfg, mesh, device)
    from trainer.lm.task import LMTask

    return LMTask(cfg, mesh, device)
