"""Data-parallel training on 2 gloo ranks against a single-process reference."""
import json
import os

import pytest
import torch

from tests.helpers.dist import run_distributed
from trainer.recipe import load_config

pytestmark = pytest.mark.distributed

SMALL = ["data.max_bytes=300000", "data.seq_len=32", "model.d_model=64", "model.num_layers=2",
         "moe.expert_ffn_dim=64", "logging.wandb=false", "logging.progress_bar=false",
         "train.log_every=1", "eval.every=0", "eval.batches=2", "optim.warmup_steps=2"]


def _cfg(extra):
    return load_config("recipes/llm/pretrain_tiny.yaml", SMALL + list(extra))


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _train(rank, world_size, overrides, run_dir):
    from trainer.loop import train

    torch.set_num_threads(1)
    result = train(_cfg(overrides), run_dir)
    return result.final_step


def test_two_ranks_match_single_process_gradient_accumulation(tmp_path):
    """dp=2 with micro batch B sees the same global batches as dp=1 with 2 accumulation steps of B:
    losses (LM, with MoE aux losses in the gradient) must agree step by step."""
    common = ["train.steps=6", "train.micro_batch_size=4", "checkpoint.enabled=false"]
    run_distributed(_train, 2, common, str(tmp_path / "dp2"))
    run_distributed(_train, 1, common + ["train.grad_accum_steps=2"], str(tmp_path / "dp1"))
    dp2, dp1 = _losses(tmp_path / "dp2"), _losses(tmp_path / "dp1")
    assert sorted(dp2) == list(range(1, 7))
    for step in dp2:
        assert dp2[step] == pytest.approx(dp1[step], rel=1e-5, abs=1e-5), step
    assert dp2[6] < dp2[1]  # and it learns


def test_resume_on_two_ranks_equals_uninterrupted(tmp_path):
    common = ["train.steps=8", "train.micro_batch_size=4", "checkpoint.every=4"]
    run_distributed(_train, 2, common, str(tmp_path / "straight"))
    stopped = run_distributed(_train, 2, common + ["train.stop_at_step=4"], str(tmp_path / "resumed"))
    assert stopped == [4, 4]
    assert os.path.isdir(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    finished = run_distributed(_train, 2, common, str(tmp_path / "resumed"))
    assert finished == [8, 8]
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == straight[step], step  # bit-exact: same data, RNG, optimizer state
