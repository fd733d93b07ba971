"""Process-level helpers of the fault drills (tests/integration/test_faults.py and
benchmarks/fault_drills.py): start the real CLI, find its rank processes, watch the run directory,
signal ranks, and check that nothing is left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
# A tiny model that still trains for real (two ranks, a checkpoint every few steps, one log line
# per step); no wandb, no heatmaps: the drills time the faults, not the extras.
TINY = ["data.max_bytes=300000", "data.seq_len=32", "model.d_model=64", "model.num_layers=2",
        "moe.expert_ffn_dim=64", "train.micro_batch_size=4", "train.log_every=1", "eval.every=0",
        "eval.batches=1", "optim.warmup_steps=2", "logging.progress_bar=false", "logging.wandb=false",
        "logging.heatmap_every=0"]


def cli_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


class Run:
    """`sparseforge run` in the background, its output in files beside the run directory."""

    def __init__(self, run_dir: str, args: list[str], env: dict | None = None):
        self.run_dir = str(run_dir)
        self.out_path, self.err_path = self.run_dir + ".out", self.run_dir + ".err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "run", RECIPE, "--run-dir", self.run_dir,
                                      *args], stdout=self._out, stderr=self._err, env=env or cli_env(), cwd=ROOT)
        self.launcher = psutil.Process(self.proc.pid)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def kill_all(self) -> None:
        """Clean-up after a failed drill: the launcher and everything under it."""
        procs = [self.launcher] + _children(self.launcher)
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def ranks(self) -> dict[int, psutil.Process]:
        """{RANK: process} of the rank processes (`python -m trainer.entry`) now under the launcher."""
        return rank_processes(self.launcher)

    @property
    def stdout(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    @property
    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def rank_processes(launcher: psutil.Process) -> dict[int, psutil.Process]:
    out = {}
    for child in _children(launcher):
        try:
            if "trainer.entry" in child.cmdline():
                out[int(child.environ().get("RANK", "-1"))] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]  # a line being written is skipped


def losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def last_step(run_dir: str) -> int:
    return max(losses(run_dir), default=0)


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def has_checkpoint(run_dir: str, step: int) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir(run_dir, step), "manifest.json"))


def weights(checkpoint: str) -> dict:
    from trainer.checkpoint import read_model_state

    return read_model_state(checkpoint)


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((x.double() - b[k].double()).abs().max().item() for k, x in a.items())


def python_descendants(pid: int | None = None) -> list[psutil.Process]:
    """Python processes running under `pid` (default: this process); zombies do not count."""
    out = []
    for p in _children(psutil.Process(pid or os.getpid())):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "python" in os.path.basename(p.exe() or p.name()):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment holds FAULT_DRILL_TAG=tag: whatever a launch started, even
    if it was orphaned (re-parented to init) when its parent exited."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and \
                    p.environ().get("FAULT_DRILL_TAG") == tag:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out
