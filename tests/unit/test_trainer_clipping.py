"""The Trainer clips: a check against a reference outside the Stepper. The parity tests compare the
Trainer with itself on one process, so a Stepper that stopped clipping would pass them; here the
later losses under `optim.grad_clip` must differ from the unclipped run's when the norms exceed
the clip, and a clip above every norm must change nothing. (AdamW divides out a constant scale,
so the first update is the same either way: it is the per-step scales, each gradient brought to
the clip, that move the later steps.)"""
import json
import os

import pytest
import torch

from trainer.loop import Trainer
from trainer.recipe import load_config

SMALL = ["data.max_bytes=100000", "data.seq_len=32", "model.d_model=32", "model.num_layers=2", "moe.expert_ffn_dim=32",
         "train.micro_batch_size=2", "train.steps=4", "train.log_every=1", "eval.every=0", "checkpoint.enabled=false",
         "logging.wandb=false", "logging.progress_bar=false", "logging.heatmap_every=0", "optim.warmup_steps=0",
         "optim.lr=0.01"]


def _records(tmp_path, name, clip):
    run_dir = tmp_path / name
    os.makedirs(run_dir)
    torch.set_num_threads(1)
    Trainer(load_config("recipes/llm/pretrain_tiny.yaml", SMALL + [f"optim.grad_clip={clip}"]), str(run_dir)).run()
    with open(run_dir / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_the_trainer_clips_the_update(tmp_path):
    free = _records(tmp_path, "free", 0)
    norm = free[1]["grad_norm"]
    assert norm > 0.2
    clipped = _records(tmp_path, "clipped", norm / 4)
    above = _records(tmp_path, "above", 1e6)
    assert clipped[1]["loss"] == free[1]["loss"] and clipped[1]["grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert all(free[s]["grad_norm"] > norm / 4 for s in free)  # every step is clipped
    assert max(abs(clipped[s]["loss"] - free[s]["loss"]) for s in (3, 4)) > 1e-3
    assert max(abs(above[s]["loss"] - free[s]["loss"]) for s in (3, 4)) < 1e-6  # a clip above every norm
