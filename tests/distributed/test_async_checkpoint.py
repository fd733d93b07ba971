"""Background checkpoints (checkpoint.async_save) on every parallel layout: on 2 gloo ranks with
ep=2, FSDP2, and pp=2, a run saved in the background writes checkpoints with exactly the tensors of
the same run saved synchronously, and a run resumed from a background save continues with the
uninterrupted losses."""
import json
import os

import pytest
import torch

from tests.helpers.dist import run_distributed
from tests.helpers.reliability_drills import _same, _tensors
from trainer.recipe import load_config

pytestmark = pytest.mark.distributed

SMALL = ["data.max_bytes=200000", "data.seq_len=32", "model.d_model=64", "model.num_layers=4",
         "moe.expert_ffn_dim=64", "moe.num_experts=4", "logging.wandb=false", "logging.progress_bar=false",
         "logging.heatmap_every=0", "train.log_every=1", "eval.every=0", "eval.batches=1", "optim.warmup_steps=2",
         "train.micro_batch_size=2", "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=0"]


def _train(rank, world_size, overrides, run_dir):
    from trainer.loop import train

    torch.set_num_threads(1)
    return train(load_config("recipes/llm/pretrain_tiny.yaml", SMALL + list(overrides), world_size=world_size),
                 run_dir).final_step


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.data_parallel=fsdp", "parallel.ep=2"],
                                    ["parallel.pp=2", "parallel.pp_microbatches=2", "model.tie_embeddings=false"]],
                         ids=["ep2", "fsdp_ep2", "pp2"])
def test_background_saves_equal_synchronous_ones(tmp_path, layout):
    runs = {}
    for mode in ("sync", "async"):
        run_dir = str(tmp_path / mode)
        run_distributed(_train, 2, layout + [f"checkpoint.async_save={mode == 'async'}"], run_dir)
        runs[mode] = run_dir
    for step in (2, 4):
        a, b = (_tensors(os.path.join(runs[m], "checkpoints", f"step_{step:08d}")) for m in ("sync", "async"))
        assert a.keys() == b.keys() and len(a) > 10
        assert [k for k in a if not _same(a[k], b[k])] == [], step
    assert _losses(runs["sync"]) == _losses(runs["async"])
    # A run stopped after a background save resumes from it with the uninterrupted losses.
    resumed = str(tmp_path / "resumed")
    run_distributed(_train, 2, layout + ["checkpoint.async_save=true", "train.stop_at_step=2"], resumed)
    run_distributed(_train, 2, layout + ["checkpoint.async_save=true"], resumed)
    want, got = _losses(runs["sync"]), _losses(resumed)
    assert sorted(got) == [1, 2, 3, 4] and all(got[s] == want[s] for s in (3, 4))
