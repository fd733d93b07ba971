"""Expert parallelism through the Trainer against one process: 20 AdamW steps of `trainer.loop.train`
with the MoE aux and z losses on and clipping on, every `parallel.ep_overlap` strategy.

Everything under test is the Trainer's own (trainer/step.py Stepper): the micro steps, DDP's
reduction on the last of them, `sync_expert_grads`, the global gradient norm, clipping by it, and
the aux-loss scale set at construction (trainer/build.py). The test only writes recipes and reads
metrics.jsonl; tests/distributed/test_expert_parallel.py checks the dispatcher and those functions
one by one.

Layouts, one spawn per world size running every strategy in turn:
    ep=2 on 2 ranks (dp=2): 2 accumulation micro steps of 2 sequences per rank
    ep=4 on 4 ranks (dp=4): 1 micro step of 2 sequences per rank
    ep=2 on 4 ranks (dp=4, combinable only): the only layout whose expert-data-parallel group has
        more than one rank, so `sync_expert_grads` all-reduces, not only divides
Every strategy applies at ep 2 and 4 (a shared expert is added so that shared_expert overlaps
something). The reference is one process with micro batch 2 and 4 accumulation steps: the data
stream is cut into global micro-batches in order (trainer/sampler.py), so every layout's forwards
see the same pairs of sequences as the reference's, and the per-forward aux losses agree.

Tolerances as the other parity tests (fp32, EP and DDP only change summation order; AdamW
amplifies rounding over the steps): loss rtol 1e-4, gradient norm rtol 1e-3, the logged aux and
z losses rtol 1e-3. optim.grad_clip=0.5 lies below every step's norm (asserted), so each step clips.
The aux and z coefficients are 10x the recipes' (0.1, 0.01): at 0.01 an aux gradient off by a
factor 2 (the accumulation left out of its scale) moves the step-1 norm by 1.2e-3, at the edge of
the tolerance (tests/distributed/test_pipeline.py measures the same for pp).
"""
import json
import os

import pytest
import torch

from parallel.config import EP_OVERLAPS
from tests.helpers.dist import run_distributed
from trainer.recipe import load_config

pytestmark = pytest.mark.distributed

SMALL = ["data.max_bytes=300000", "data.seq_len=32", "model.d_model=64", "model.num_layers=4",
         "moe.expert_ffn_dim=64", "moe.num_experts=4", "moe.num_shared_experts=1", "logging.wandb=false",
         "logging.progress_bar=false", "logging.heatmap_every=0", "train.log_every=1", "eval.every=0",
         "eval.batches=1", "optim.warmup_steps=2", "optim.grad_clip=0.5", "moe.aux_loss_coeff=0.1",
         "moe.z_loss_coeff=0.01", "checkpoint.enabled=false", "train.micro_batch_size=2", "parallel.ep_chunks=3"]
STEPS, CLIP = 20, 0.5
# world size -> runs of its spawn: (name, overrides); every run's step sees the same 8 sequences.
LAYOUTS = {
    2: [(f"ep2 {s}", ["parallel.ep=2", f"parallel.ep_overlap={s}", "train.grad_accum_steps=2"]) for s in EP_OVERLAPS],
    4: [(f"ep4 {s}", ["parallel.ep=4", f"parallel.ep_overlap={s}"]) for s in EP_OVERLAPS]
       + [("ep2 dp4 combinable", ["parallel.ep=2", "parallel.ep_overlap=combinable"])],
}
REFERENCE = ["train.grad_accum_steps=4"]


def _cfg(overrides, world_size):
    return load_config("recipes/llm/pretrain_tiny.yaml", SMALL + [f"train.steps={STEPS}", *overrides],
                       world_size=world_size)


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _train_layouts(rank, world_size, out):
    from trainer.loop import train

    for name, overrides in LAYOUTS[world_size]:
        train(_cfg(overrides, world_size), os.path.join(out, name.replace(" ", "_")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from trainer.loop import train

    run_dir = str(tmp_path_factory.mktemp("ep_trainer_ref"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as each rank: the cores are shared with the spawned ranks
    try:
        train(_cfg(REFERENCE, 1), run_dir)
    finally:
        torch.set_num_threads(threads)
    history = _history(run_dir)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert min(r["grad_norm"] for r in history.values()) > CLIP  # every step clips
    assert history[STEPS]["loss"] < history[1]["loss"] - 1.0  # and it learns
    return history


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_expert_parallel_training_through_the_trainer_matches_one_process(tmp_path, reference, world_size):
    run_distributed(_train_layouts, world_size, str(tmp_path), timeout_s=240)
    for name, _ in LAYOUTS[world_size]:
        history = _history(str(tmp_path / name.replace(" ", "_")))
        assert sorted(history) == list(range(1, STEPS + 1)), name
        for step in range(1, STEPS + 1):
            got, want = history[step], reference[step]
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), f"{name}: loss at step {step}"
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3), f"{name}: grad norm at step {step}"
            for key in ("moe/aux_loss", "moe/z_loss"):
                assert got[key] == pytest.approx(want[key], rel=1e-3), f"{name}: {key} at step {step}"
