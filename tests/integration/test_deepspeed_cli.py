"""`sparseforge run --launcher deepspeed`: the deepspeed launcher starts the ranks (train.engine=deepspeed,
ZeRO-2, ep=2 on 2 CPU ranks), the run stops at a checkpoint and the same command resumes it."""
import json
import os

import pytest

from tests.integration.test_cli import RECIPE, SMALL, sparseforge

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.integration


@pytest.mark.parametrize("args, message", [
    (["--launcher", "deepspeed", "--nnodes", "2"], "--launcher deepspeed with --nnodes > 1 needs --hostfile"),
    (["--hostfile", "hosts"], "--hostfile is an option of --launcher deepspeed"),
    (["--launcher", "deepspeed", "--nnodes", "2", "--nproc-per-node", "4", "--hostfile", "hosts"],
     "host b has fewer slots than --nproc-per-node 4"),
    (["--launcher", "deepspeed", "--set", "train.engine=deepspeed", "train.zero_stage=3"],
     "ZeRO-3 would partition the expert parameters"),
])
def test_bad_deepspeed_input_fails_fast_with_one_line(tmp_path, args, message):
    (tmp_path / "hosts").write_text("a slots=4\nb slots=2  # a comment\n")
    args = [str(tmp_path / a) if a == "hosts" else a for a in args]
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(tmp_path / "run"), *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_deepspeed_launcher_runs_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--launcher", "deepspeed", "--nproc-per-node", "2", "--run-dir", str(run_dir), "--set", *SMALL,
              "logging.wandb=false", "train.steps=4", "checkpoint.every=2", "train.engine=deepspeed", "parallel.ep=2"]
    proc, _ = sparseforge("run", RECIPE, *common, "train.stop_at_step=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed.launcher.launch" in proc.stderr + proc.stdout  # the runner started the ranks
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (ckpt / ".metadata").exists() and (ckpt / "deepspeed" / "mp_rank_00_model_states.pt").exists()
    proc, _ = sparseforge("run", RECIPE, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_00000002 at step 2" in proc.stdout
    assert "final: step 4, val loss" in proc.stdout
    with open(run_dir / "metrics.jsonl") as f:
        losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000002", "step_00000004"]
    # Its checkpoints hold ZeRO's optimizer state: the native engine refuses them before starting.
    proc, _ = sparseforge("run", RECIPE, *[a for a in common if a not in ("train.engine=deepspeed", "deepspeed",
                                                                          "--launcher")], "train.steps=6")
    assert proc.returncode == 2 and "step_00000004: written by train.engine=deepspeed" in proc.stderr, proc.stderr
