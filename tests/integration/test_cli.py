"""The real CLI: bad input refused before anything starts, the plan, and a 2-rank run + resume."""
import json
import os
import resource
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
SMALL = ["data.max_bytes=300000", "data.seq_len=32", "model.d_model=64", "model.num_layers=2",
         "moe.expert_ffn_dim=64", "train.micro_batch_size=4", "train.log_every=1", "eval.every=3",
         "eval.batches=2", "optim.warmup_steps=2", "logging.progress_bar=false"]


def sparseforge(*args, timeout=300):
    """Run the CLI; (the completed process, wall seconds). `proc.cpu_seconds` is the CPU time the
    command and its children used: "fast" is checked on it, because on a shared, loaded machine
    the wall time of an interpreter start and a torch import varies several-fold."""
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc.cpu_seconds = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("args, message", [
    (["--set", "train.stpes=5"], "unknown config key train.stpes; did you mean train.steps?"),
    (["--set", "train.steps=five"], "train.steps: expected int, got str 'five'"),
    (["--nproc-per-node", "2", "--set", "parallel.dp=4"], "does not match world size 2"),
    (["--set", "moe.num_experts=6", "moe.top_k=7"], "moe.top_k=7 must be between 1 and moe.num_experts=6"),
    (["--set", "data.source=/nonexistent/corpus"], "data.source"),
    (["--set", "data.tokenizer=/nonexistent/tok"], "data.tokenizer"),
    (["--resume", "/nonexistent/step_00000001"], "--resume: checkpoint directory not found"),
])
def test_bad_input_fails_fast_with_one_line(tmp_path, args, message):
    run_dir = tmp_path / "run"
    proc, seconds = sparseforge("run", RECIPE, "--run-dir", str(run_dir), *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("sparseforge: error: ") and message in lines[0], lines
    assert proc.cpu_seconds < 10 and seconds < 30, (proc.cpu_seconds, seconds)
    assert not (run_dir / "config.yaml").exists()  # nothing was spawned


def test_malformed_recipe_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    proc, _ = sparseforge("run", str(bad), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "bad.yaml: malformed YAML" in proc.stderr


def test_dry_run_prints_plan_for_a_production_shape():
    proc, seconds = sparseforge("run", RECIPE, "--set", "model.preset=mixtral_8x7b", "data.seq_len=4096",
                                "train.micro_batch_size=1", "--nproc-per-node", "8", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# resolved config" in out and "world size 8 = pp 1 x dp 8" in out
    assert "46.70G total, 12.88G active per token" in out
    assert out.count("\n7     0     7") == 1  # rank 7: node 0, local rank 7
    assert "memory per rank (estimate): params 186.8" in out  # 46.7e9 fp32 weights
    assert proc.cpu_seconds < 10 and seconds < 30, (proc.cpu_seconds, seconds)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, records


def test_two_rank_run_interrupted_and_rerun_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--nproc-per-node", "2", "--set", *SMALL, "train.steps=6", "checkpoint.every=3"]
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(straight), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final: step 6, val loss" in proc.stdout and "unigram entropy" in proc.stdout
    assert os.path.isdir(straight / "wandb")  # offline wandb run inside the run directory
    assert (straight / "config.yaml").exists() and (straight / "run_info.json").exists()
    assert sorted(os.listdir(straight / "checkpoints")) == ["step_00000003", "step_00000006"]

    # Interrupted after the step-3 checkpoint, then the same command again.
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(resumed), *common, "train.stop_at_step=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(resumed), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout

    want, records = _losses(straight)
    got, _ = _losses(resumed)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        assert got[step] == want[step], step
    keys = set().union(*records)
    assert {"step", "loss", "lr", "tokens_per_s", "eval/loss", "moe/aux_loss", "moe/z_loss"} <= keys


def test_pipelined_run_through_the_cli(tmp_path):
    """pp=2 with the zero-bubble V schedule on 2 ranks, through torchrun, with the default
    balanced stage split; the plan names the stages and the run trains and evaluates."""
    run_dir = tmp_path / "pp"
    pp = ["parallel.pp=2", "parallel.pp_schedule=zbv", "model.num_layers=4", "train.steps=4"]
    proc, seconds = sparseforge("run", RECIPE, "--run-dir", str(run_dir), "--nproc-per-node", "2",
                                "--set", *SMALL, *pp, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipeline: schedule zbv, 4 stages" in proc.stdout
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(run_dir), "--nproc-per-node", "2", "--set", *SMALL, *pp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final: step 4, val loss" in proc.stdout
    losses, records = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    assert any(k.startswith("moe/layer2/") for k in set().union(*records))  # a layer of the second rank


DIT_RECIPE = "recipes/dit/pretrain_digits_moe.yaml"
DIT_SMALL = ["train.steps=12", "train.log_every=1", "train.micro_batch_size=16", "checkpoint.every=6",
             "diffusion.num_samples=40", "diffusion.sample_steps=10", "diffusion.sampler=dpm_solver_pp",
             "logging.progress_bar=false", "logging.heatmap_every=6", "model.num_layers=2", "parallel.ep=2"]


def test_dit_moe_run_with_expert_parallelism_resumes_exactly(tmp_path):
    """The DiT-MoE recipe on 2 ranks with ep=2 through the CLI: it trains, samples with the EMA
    weights, scores and draws the samples; interrupted after the step-6 checkpoint and rerun, it
    ends with the same losses and the same sample scores (EMA weights and RNG restored)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--nproc-per-node", "2", "--set", *DIT_SMALL]
    proc, _ = sparseforge("run", DIT_RECIPE, "--run-dir", str(straight), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = [line for line in proc.stdout.splitlines() if line.startswith("final: step 12")]
    assert final and "class accuracy" in final[0] and "FD" in final[0], proc.stdout[-2000:]
    plots = sorted(os.listdir(straight / "plots"))
    assert "samples_step_00000012.png" in plots and "expert_load_step_00000012.png" in plots, plots

    proc, _ = sparseforge("run", DIT_RECIPE, "--run-dir", str(resumed), *common, "train.stop_at_step=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, _ = sparseforge("run", DIT_RECIPE, "--run-dir", str(resumed), *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    want, records = _losses(straight)
    got, got_records = _losses(resumed)
    assert sorted(got) == list(range(1, 13))
    for step in range(7, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    evals = [{k: r[k] for k in ("eval/loss", "eval/acc", "eval/fd")} for r in records if "eval/fd" in r]
    got_evals = [{k: r[k] for k in ("eval/loss", "eval/acc", "eval/fd")} for r in got_records if "eval/fd" in r]
    assert evals and got_evals[-1] == pytest.approx(evals[-1], rel=1e-5)
    assert {"diffusion/mse", "diffusion/vlb", "moe/expert_balance_loss"} <= set().union(*records)
