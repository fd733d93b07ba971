"""FSDP2 through the Trainer on gloo ranks against one process: 20 AdamW steps with the MoE aux and
z losses and clipping (loss rtol 1e-4, grad norm rtol 1e-3, as the other parity tests), the initial
weights bitwise equal on every layout, and resume across engines and layouts."""
import json
import os

import pytest
import torch

from tests.helpers.dist import run_distributed
from trainer.recipe import load_config

pytestmark = pytest.mark.distributed

SMALL = ["data.max_bytes=300000", "data.seq_len=32", "model.d_model=64", "model.num_layers=4",
         "moe.expert_ffn_dim=64", "moe.num_experts=4", "logging.wandb=false", "logging.progress_bar=false",
         "logging.heatmap_every=0", "train.log_every=1", "eval.every=0", "eval.batches=1",
         "optim.warmup_steps=2", "optim.grad_clip=0.5", "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001"]
STEPS = 20


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _train(rank, world_size, recipe, overrides, run_dir):
    from trainer.loop import train

    torch.set_num_threads(1)
    return train(load_config(recipe, SMALL + list(overrides), world_size=world_size), run_dir).final_step


def _run(tmp_path, name, world, overrides, recipe="recipes/llm/pretrain_tiny.yaml"):
    run_dir = str(tmp_path / name)
    run_distributed(_train, world, recipe, list(overrides), run_dir)
    return _records(run_dir)


def _assert_same_trajectory(records, reference, steps):
    assert sorted(records) == list(steps)
    for step in steps:
        assert records[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4), step
        assert records[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-3), step


LLM = [f"train.steps={STEPS}", "train.micro_batch_size=2", "checkpoint.enabled=false"]


@pytest.fixture(scope="module")
def llm_references(tmp_path_factory):
    """One process, the global batch of 8 sequences as micro steps of 2 or of 4: the MoE aux losses
    are per forward (not linear in the batch), so each layout is compared with the reference whose
    forwards see as many sequences as its own."""
    root = tmp_path_factory.mktemp("fsdp_ref")
    return {2: _run(root, "m2", 1, LLM + ["train.grad_accum_steps=4"]),
            4: _run(root, "m4", 1, LLM + ["train.micro_batch_size=4", "train.grad_accum_steps=2"])}


@pytest.mark.parametrize("name, world, per_forward, overrides", [
    ("fsdp dp=2", 2, 4, ["parallel.data_parallel=fsdp", "train.micro_batch_size=4"]),
    ("hsdp 2x2", 4, 2, ["parallel.data_parallel=fsdp", "parallel.dp_shard=2"]),
    ("fsdp dp=2 ep=2", 2, 4, ["parallel.data_parallel=fsdp", "parallel.ep=2", "train.micro_batch_size=4"]),
    ("fsdp dp=4 ep=2", 4, 2, ["parallel.data_parallel=fsdp", "parallel.ep=2"]),
    ("pp=2 x fsdp dp=2", 4, 2, ["parallel.data_parallel=fsdp", "parallel.pp=2", "train.micro_batch_size=4",
                                "parallel.pp_microbatches=2"]),
    ("fsdp dp=2 ep=2, blocks recomputed", 2, 4, ["parallel.data_parallel=fsdp", "parallel.ep=2",
                                                 "train.micro_batch_size=4", "parallel.activation_checkpoint=block"]),
])
def test_llm_matches_one_process(tmp_path, llm_references, name, world, per_forward, overrides):
    records = _run(tmp_path, "run", world, LLM + overrides)
    _assert_same_trajectory(records, llm_references[per_forward], range(1, STEPS + 1))
    assert records[STEPS]["loss"] < records[1]["loss"]  # and it learns


def test_dit_fsdp_matches_one_process(tmp_path):
    # Label dropout draws from each rank's own RNG stream (per layout); noise does not (per image).
    dit = ["model.d_model=64", "model.num_layers=2", "moe.num_experts=4", "moe.expert_ffn_dim=64",
           "model.class_dropout_prob=0",
           "moe.shared_expert_ffn_dim=64", "train.steps=10", "checkpoint.enabled=false", "eval.every=0",
           "diffusion.num_samples=8", "diffusion.sample_steps=2", "diffusion.sampler=ddim"]
    recipe = "recipes/dit/pretrain_digits_moe.yaml"
    reference = _run(tmp_path, "ref", 1, dit + ["train.micro_batch_size=4", "train.grad_accum_steps=2"], recipe)
    records = _run(tmp_path, "fsdp", 2, dit + ["train.micro_batch_size=4", "parallel.data_parallel=fsdp",
                                               "parallel.ep=2"], recipe)
    _assert_same_trajectory(records, reference, range(1, 11))


def _initial_weights(rank, world_size, overrides, run_dir):
    """Build the Trainer's model and save it as checkpoint step 0 (every layout saves the unsharded
    tensors); the test reads it back whole."""
    from trainer.checkpoint import save_checkpoint
    from trainer.loop import Trainer

    torch.set_num_threads(1)
    cfg = load_config("recipes/llm/pretrain_tiny.yaml", SMALL + ["train.micro_batch_size=4"] + list(overrides),
                      world_size=world_size)
    os.makedirs(run_dir, exist_ok=True)
    t = Trainer(cfg, run_dir)
    return save_checkpoint(run_dir, 0, t.model, t.optimizer, t.scheduler, t.data, cfg, t.mesh)


def test_initial_weights_do_not_depend_on_the_layout(tmp_path):
    from trainer.checkpoint import read_model_state

    layouts = {"1 rank": (1, []), "ep=2": (2, ["parallel.ep=2"]), "pp=2": (2, ["parallel.pp=2"]),
               "fsdp dp=2": (2, ["parallel.data_parallel=fsdp"]),
               "fsdp dp=2 ep=2": (2, ["parallel.data_parallel=fsdp", "parallel.ep=2"])}
    states = {}
    for name, (world, overrides) in layouts.items():
        path = run_distributed(_initial_weights, world, overrides, str(tmp_path / name.replace(" ", "_")))[0]
        states[name] = read_model_state(path)
    reference = states.pop("1 rank")
    for name, state in states.items():
        assert sorted(state) == sorted(reference), name
        for key, value in reference.items():
            assert torch.equal(state[key], value), (name, key)


def _stop_and_resume(tmp_path, first, second):
    """Train 6 steps with `first` (world, overrides), stopping after the step-4 checkpoint, then
    finish with `second` from that checkpoint; returns both trajectories' records."""
    # Without aux losses: a layout change that changes the sequences per forward (2 ranks of 2 ->
    # one of 4) would change them (they are per forward), and this is about the checkpoint.
    common = ["train.steps=6", "checkpoint.every=4", "train.micro_batch_size=2", "moe.aux_loss_coeff=0",
              "moe.z_loss_coeff=0"]
    straight = _run(tmp_path, "straight", first[0], common + first[1])
    _run(tmp_path, "resumed", first[0], common + first[1] + ["train.stop_at_step=4"])
    resumed = _run(tmp_path, "resumed", second[0], common + second[1])
    return straight, resumed


@pytest.mark.parametrize("name, first, second", [
    ("fsdp dp=2 -> ddp 1 process", (2, ["parallel.data_parallel=fsdp"]), (1, ["train.micro_batch_size=4"])),
    ("ddp dp=2 -> fsdp dp=2", (2, []), (2, ["parallel.data_parallel=fsdp"])),
    ("fsdp dp=2 ep=2 -> ep=1", (2, ["parallel.data_parallel=fsdp", "parallel.ep=2"]),
     (2, ["parallel.data_parallel=fsdp"])),
])
def test_resume_across_engines_and_layouts(tmp_path, name, first, second):
    straight, resumed = _stop_and_resume(tmp_path, first, second)
    _assert_same_trajectory({s: resumed[s] for s in (5, 6)}, straight, (5, 6))
