"""train.engine=deepspeed (trainer/adapt/ds_engine.py) against the native engine on gloo ranks: ZeRO-1/2,
with and without expert parallelism, gradient accumulation and MoE aux losses on; save and resume."""
import json
import os

import pytest
import torch

from tests.helpers.dist import run_distributed
from trainer.recipe import load_config

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed

# Two accumulation steps (DeepSpeed must not rescale the loss or the aux losses attached inside the
# graph), clipping active (grad norms ~2.5 > 1), aux and z losses from the recipe.
SMALL = ["data.max_bytes=300000", "data.seq_len=32", "model.d_model=64", "model.num_layers=2",
         "moe.expert_ffn_dim=64", "logging.wandb=false", "logging.progress_bar=false",
         "train.log_every=1", "eval.every=0", "eval.batches=2", "optim.warmup_steps=2", "train.steps=8",
         "train.micro_batch_size=4", "train.grad_accum_steps=2", "checkpoint.every=4"]
DS = ["train.engine=deepspeed"]
TINY, LORA = "recipes/llm/pretrain_tiny.yaml", "recipes/llm/peft_lora.yaml"
RUNS = {  # name: overrides; each DeepSpeed run is compared with the native run of its layout
    "native": [],
    "zero2": DS,
    "zero1": DS + ["train.zero_stage=1"],
    "native_ep2": ["parallel.ep=2"],
    "zero2_ep2": DS + ["parallel.ep=2"],
    "zero1_ep2": DS + ["parallel.ep=2", "train.zero_stage=1"],
    # bf16: DeepSpeed's bf16 weights (fp32 masters in ZeRO, experts fp32) vs autocast on fp32 weights.
    "native_ep2_bf16": ["parallel.ep=2", "train.dtype=bf16"],
    "zero2_ep2_bf16": DS + ["parallel.ep=2", "train.dtype=bf16"],
}


def _train_all(rank, world_size, root, runs):
    """Several runs one after another in the same ranks (one start-up for all of them)."""
    from trainer.loop import train

    torch.set_num_threads(1)
    for name, overrides in runs:
        recipe, overrides = (overrides[0], overrides[1:]) if overrides[:1] == [LORA] else (TINY, overrides)
        train(load_config(recipe, SMALL + overrides), os.path.join(root, name))
    return True


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    # LoRA (attention and every expert) from a DeepSpeed checkpoint (zero2_ep2's), frozen base, ep=2.
    lora = [LORA, f"peft.base={root}/zero2_ep2/checkpoints/step_00000008", "parallel.ep=2", "checkpoint.enabled=false"]
    # The resumed run stops at step 4 here; the second start (new processes) resumes it.
    more = [("lora_native", lora), ("lora_zero2", lora + DS), ("resumed", DS + ["parallel.ep=2", "train.stop_at_step=4"])]
    run_distributed(_train_all, 2, str(root), list(RUNS.items()) + more)
    run_distributed(_train_all, 2, str(root), [("resumed", DS + ["parallel.ep=2"])])
    return root


@pytest.mark.parametrize("name, reference, rtol", [
    ("zero2", "native", 1e-4), ("zero1", "native", 1e-4), ("zero2_ep2", "native_ep2", 1e-4),
    ("zero1_ep2", "native_ep2", 1e-4), ("lora_zero2", "lora_native", 1e-4),
    ("zero2_ep2_bf16", "native_ep2_bf16", 2e-3)])
def test_deepspeed_matches_native(runs, name, reference, rtol):
    """Per-step loss and gradient norm (clipping included) of ZeRO-1/2 equal the native engine's on
    2 ranks: dp=2 (ZeRO holds the experts), ep=2 (experts outside ZeRO, reduced over edp), LoRA
    (frozen base, adapters on experts outside ZeRO), and bf16 within bf16's rounding."""
    ours, native = _metrics(runs / name), _metrics(runs / reference)
    assert sorted(ours) == list(range(1, 9))
    for step in ours:
        assert ours[step][0] == pytest.approx(native[step][0], rel=rtol), (name, step)
        assert ours[step][1] == pytest.approx(native[step][1], rel=10 * rtol if "bf16" in name else rtol), (name, step)
    if "lora" not in name:
        assert ours[8][0] < ours[1][0] - 0.5  # and it learns


def test_four_ranks_experts_reduced_over_edp(tmp_path):
    """dp=4, ep=2: each expert lives on 2 ranks (its edp group); ZeRO-2 must leave the experts to
    sync_expert_grads (sum over edp, / dp) and still match the native engine step by step."""
    runs = [("native", ["parallel.ep=2", "train.steps=3"]), ("zero2", DS + ["parallel.ep=2", "train.steps=3"])]
    run_distributed(_train_all, 4, str(tmp_path), runs)
    ours, native = _metrics(tmp_path / "zero2"), _metrics(tmp_path / "native")
    assert sorted(ours) == [1, 2, 3]
    for step in ours:
        assert ours[step] == pytest.approx(native[step], rel=1e-4), step


def test_resume_equals_uninterrupted(runs):
    """Stopped at step 4 (checkpoint: DCP model + experts' AdamW, ZeRO partitions in deepspeed/), a
    new start resumes it, and steps 5-8 equal the uninterrupted run exactly."""
    ckpt = runs / "resumed" / "checkpoints" / "step_00000004"
    zero_files = sorted(os.listdir(ckpt / "deepspeed"))
    assert [f for f in zero_files if f.endswith("optim_states.pt")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed, straight = _metrics(runs / "resumed"), _metrics(runs / "zero2_ep2")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == straight[step], step


def test_native_engine_refuses_a_deepspeed_checkpoint(runs):
    from trainer.checkpoint import load_checkpoint

    ckpt = str(runs / "resumed" / "checkpoints" / "step_00000008")
    with pytest.raises(ValueError, match="written by train.engine=deepspeed"):
        load_checkpoint(ckpt, torch.nn.Linear(1, 1), (), None, None, None)
