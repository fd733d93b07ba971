"""`sparseforge run --launcher slurm`: the sbatch script, its copy in docs/deepspeed_slurm.md, and
the script run end to end with fake srun / scontrol / sbatch executables on PATH (srun starts the
command once per "node" on this machine, so two torchrun agents meet at the c10d rendezvous the
script names)."""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from launch.cli import main as sparseforge_main
from tests.integration.test_cli import RECIPE, ROOT, SMALL, sparseforge

pytestmark = pytest.mark.integration

# Records its arguments as one JSON line in $FAKE_SLURM_LOG/<name>.jsonl, then acts like the tool.
_FAKE_HEAD = """#!{python}
import json, os, subprocess, sys, time
args = sys.argv[1:]
with open(os.path.join(os.environ["FAKE_SLURM_LOG"], "{name}.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
"""
FAKES = {
    # srun [--opt=value ...] CMD...: CMD once per node (--nodes), in parallel; the highest exit code.
    # FAKE_SRUN_SLEEP=S: sleep S seconds instead (a job that is still running).
    "srun": """
i = 0
while args[i].startswith("-"):
    i += 1
nodes = int(next(a for a in args[:i] if a.startswith("--nodes=")).split("=")[1])
if os.environ.get("FAKE_SRUN_SLEEP"):
    time.sleep(float(os.environ["FAKE_SRUN_SLEEP"]))
    sys.exit(0)
procs = [subprocess.Popen(args[i:], env={**os.environ, "SLURM_NODEID": str(n)}) for n in range(nodes)]
sys.exit(max(p.wait() for p in procs))
""",
    "scontrol": """
if args[:2] == ["show", "hostnames"]:
    print("\\n".join(os.environ["FAKE_SLURM_HOSTS"].split()))
""",
    "sbatch": """
print("Submitted batch job 4242")
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    """(bin dir, log dir, env for running a job script under the fakes)."""
    bin_dir, log_dir = tmp_path / "fakebin", tmp_path / "slurm_log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(_FAKE_HEAD.format(python=sys.executable, name=name) + body)
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log_dir),
           "FAKE_SLURM_HOSTS": "127.0.0.1 127.0.0.1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[0-1]",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("PYTHONPATH", None)  # the script sets its own: the snapshot
    return bin_dir, log_dir, env


def _calls(log_dir, name):
    path = log_dir / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(capsys, run_dir, *args, recipe=RECIPE):
    """`sparseforge run RECIPE --launcher slurm ...` in this process (no second torch import)."""
    start = time.perf_counter()
    code = sparseforge_main(["run", recipe, "--launcher", "slurm", "--run-dir", str(run_dir), *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    script = run_dir / "slurm" / "job.sbatch"
    assert out.strip().splitlines()[-1] == f"sbatch script: {script}"
    return script, time.perf_counter() - start


def test_script_for_two_nodes(tmp_path, capsys):
    run_dir = tmp_path / "tiny_2node"
    script, seconds = _generate(capsys, run_dir, "--nnodes", "2", "--nproc-per-node", "8", "--partition", "gpu",
                                "--account", "proj", "--time", "04:00:00", "--cpus-per-task", "64",
                                "--sbatch-arg=--qos=high", "--master-port", "29601")
    text = script.read_text()
    sbatch = [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert sbatch == ["--job-name=tiny_2node", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                      "--cpus-per-task=64", "--partition=gpu", "--account=proj", "--time=04:00:00",
                      "--signal=B:USR1@120", "--requeue", "--open-mode=append",
                      f"--output={run_dir}/slurm/job-%j.out", "--qos=high"]
    assert f"RUN_DIR={run_dir}\n" in text and f"PYTHON={sys.executable}\n" in text
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in text
    assert 'trap requeue USR1' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "checkpoint.every" in text  # the comment on what a requeue costs
    flat = text.replace(" \\\n    ", " ")
    assert ('srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run '
            '--nproc-per-node=8 --nnodes=2 --rdzv-backend=c10d "--rdzv-endpoint=$HEAD_NODE:29601" '
            '"--rdzv-id=$SLURM_JOB_ID" -m trainer.entry --config "$RUN_DIR/slurm/config.yaml" '
            '--run-dir "$RUN_DIR" &') in flat
    assert "--resume" not in flat  # each start resumes from the latest checkpoint by itself
    subprocess.run(["bash", "-n", str(script)], check=True)
    # The snapshot: the resolved config (also the run directory's) and the packages.
    code = run_dir / "slurm" / "code"
    for pkg in ("launch", "trainer", "models", "parallel"):
        assert (code / pkg / "__init__.py").exists()
    assert (code / "trainer" / "loop.py").read_text() == open(os.path.join(ROOT, "trainer", "loop.py")).read()
    assert not list(code.rglob("__pycache__"))
    assert "git revision: " in (code / "SNAPSHOT.txt").read_text()
    assert (run_dir / "slurm" / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    assert f"run_dir: {run_dir}" in (run_dir / "slurm" / "config.yaml").read_text()
    assert seconds < 20


def _docs_slurm_example():
    """(the command, the script) of the SLURM section of docs/deepspeed_slurm.md."""
    with open(os.path.join(ROOT, "docs", "deepspeed_slurm.md")) as f:
        section = f.read().split("\n## SLURM\n", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"^sparseforge run recipes/\S+ --launcher slurm .*$", section, re.M).group(0)
    script = re.search(r"```bash\n(#!/bin/bash\n.*?)```", section, re.S).group(1)
    return command, script


def test_readme_script_is_what_the_generator_writes(tmp_path, capsys, monkeypatch):
    command, docs_script = _docs_slurm_example()
    # The documented paths live under /shared; here under tmp_path (the interpreter: this one).
    args = command.replace("/shared", str(tmp_path)).split()[2:]
    assert args[0] == "recipes/llm/pretrain_tiny.yaml" and args[-2] == "--run-dir"
    monkeypatch.chdir(ROOT)
    script, _ = _generate(capsys, pathlib.Path(args[-1]), *args[1:-2], recipe=args[0])
    generated = script.read_text()
    generated = generated.replace(f"PYTHON={sys.executable}", "PYTHON=/shared/venv/bin/python")
    assert generated.replace(str(tmp_path), "/shared") == docs_script


def test_script_runs_under_fake_slurm_and_a_rerun_resumes(tmp_path, capsys, fake_slurm):
    """2 nodes x 1 rank: the first start stops after its step-1 checkpoint (as a job killed by its
    time limit would end), the rerun of the same script (a requeue) resumes and finishes."""
    _, log_dir, env = fake_slurm
    run_dir = tmp_path / "run"
    port = _free_port()
    script, _ = _generate(capsys, run_dir, "--nnodes", "2", "--nproc-per-node", "1", "--gpus-per-node", "0",
                          "--master-port", str(port), "--set", *SMALL, "eval.every=0", "logging.wandb=false",
                          "train.steps=2", "checkpoint.every=1", "train.stop_at_step=1")
    first = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    out = first.stdout + first.stderr  # the ranks' lines reach either, as torchrun passes them on
    assert first.returncode == 0, out[-4000:]
    assert f"job 4242: 2 nodes x 1 ranks, rendezvous 127.0.0.1:{port}" in out
    assert "stopping at step 1" in out
    assert _calls(log_dir, "scontrol") == [["show", "hostnames", "node[0-1]"]]
    # What srun ran on every node: the torchrun command, variables expanded by the job.
    assert _calls(log_dir, "srun") == [[
        "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node=1", "--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=4242", "-m", "trainer.entry", "--config", f"{run_dir}/slurm/config.yaml", "--run-dir", str(run_dir)]]
    # The ranks ran the snapshot, not this checkout.
    with open(run_dir / "run_info.json") as f:
        assert json.load(f)["argv"][0] == f"{run_dir}/slurm/code/trainer/entry.py"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000001"]

    second = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"resumed from {run_dir}/checkpoints/step_00000001 at step 1" in out
    assert "final: step 2" in out
    with open(run_dir / "metrics.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == [1, 2]


def test_usr1_requeues_the_job(tmp_path, capsys, fake_slurm):
    _, log_dir, env = fake_slurm
    script, _ = _generate(capsys, tmp_path / "run", "--nnodes", "2", "--nproc-per-node", "2")
    job = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**env, "FAKE_SRUN_SLEEP": "3"}, cwd=tmp_path)
    deadline = time.time() + 30
    while not _calls(log_dir, "srun") and time.time() < deadline:  # srun starts after the trap is set
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=30)
    # Requeued, and the script still waited for srun (on SLURM the requeue ends the job itself).
    assert job.returncode == 0, err
    assert "job 4242: USR1, requeueing; it resumes from the latest checkpoint in" in out
    assert ["requeue", "4242"] in _calls(log_dir, "scontrol")


def test_submit_calls_sbatch(tmp_path, fake_slurm, monkeypatch):
    bin_dir, log_dir, _ = fake_slurm
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log_dir))
    run_dir = tmp_path / "run"
    assert sparseforge_main(["run", RECIPE, "--launcher", "slurm", "--nnodes", "2", "--run-dir", str(run_dir),
                             "--submit"]) == 0
    assert _calls(log_dir, "sbatch") == [[str(run_dir / "slurm" / "job.sbatch")]]


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="sbatch is installed here")
def test_submit_without_sbatch_is_one_line(tmp_path, capsys):
    assert sparseforge_main(["run", RECIPE, "--launcher", "slurm", "--run-dir", str(tmp_path / "run"), "--submit"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--submit: sbatch not found on PATH" in lines[0], lines


@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "--partition is an option of --launcher slurm"),
    (["--sbatch-arg=--qos=high"], "--sbatch-arg is an option of --launcher slurm"),
    (["--launcher", "slurm", "--rdzv-endpoint", "h:1"], "--rdzv-endpoint: with --launcher slurm the script"),
    (["--launcher", "slurm", "--resume", "x"], "--resume is not taken with --launcher slurm"),
    (["--launcher", "slurm", "--nnodes", "2", "--set", "parallel.ep=4"],
     "parallel.ep=4 does not divide the data-parallel size 2"),  # validated for nnodes x nproc, as run
])
def test_bad_slurm_arguments_fail_fast(tmp_path, args, message):
    run_dir = tmp_path / "run"
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(run_dir), *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (run_dir / "slurm").exists()


def test_relative_data_paths_are_pinned(tmp_path, capsys, monkeypatch):
    """The job runs inside the snapshot: a corpus given relative to here must still be found."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 2000)
    _generate(capsys, tmp_path / "run", "--set", "data.source=corpus.txt")
    with open(tmp_path / "run" / "slurm" / "config.yaml") as f:
        assert f"source: {tmp_path / 'corpus.txt'}\n" in f.read()


def test_torchrun_restarts_reach_the_script(tmp_path, capsys):
    script, _ = _generate(capsys, tmp_path / "run", "--nnodes", "2", "--set", "train.max_restarts=2")
    text = script.read_text()
    assert "--max-restarts=2" in text and "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n" in text
    subprocess.run(["bash", "-n", str(script)], check=True)
