"""Process-level helpers of the fault drills (tests/integration/test_faults.py and
benchmarks/fault_drills.py): start the real CLI, find its rank processes, watch the run directory,
signal ranks, and check that nothing is left behind."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
        os.makedirs(os.path.dirname(self.run_dir), exist_ok=True)
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
            cmdline = child.cmdline()
            if "trainer.entry" in cmdline and "torch.distributed.run" not in cmdline:  # a rank, not torchrun
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


# ---------------------------------------------------------------------------------------------
# The drills. Each runs one fault for real and returns what it saw: "did" (what it did), "result"
# (what happened), "passed", and the numbers the tests check. benchmarks/fault_drills.py prints them.

STEPS, EVERY = 24, 8  # the drills' runs: 24 steps, a checkpoint every 8


def run_args(*extra: str, nproc: int = 2) -> list[str]:
    return ["--nproc-per-node", str(nproc), "--set", *TINY, f"train.steps={STEPS}", f"checkpoint.every={EVERY}",
            "checkpoint.keep_last=0", *extra]


def drill_reference(base: str) -> dict:
    """An uninterrupted 2-rank run: the reference trajectory and final weights."""
    run = Run(os.path.join(base, "reference"), run_args())
    code = run.wait(900)
    return {"did": f"trained {STEPS} steps on 2 ranks, uninterrupted", "result": f"exit {code}",
            "passed": code == 0, "run_dir": run.run_dir, "stderr": run.stderr[-3000:]}


def drill_determinism(base: str, reference: dict) -> dict:
    """The same command again: the loss trajectory must be identical, bit for bit."""
    run = Run(os.path.join(base, "determinism"), run_args())
    code = run.wait(900)
    want, got = losses(reference["run_dir"]), losses(run.run_dir)
    differing = [s for s in want if got.get(s) != want[s]]
    return {"did": f"the same {STEPS}-step run again (same seed, same 2-rank layout)",
            "result": f"exit {code}; {len(want) - len(differing)}/{len(want)} losses identical",
            "passed": code == 0 and len(want) == STEPS and not differing, "differing_steps": differing,
            "stderr": run.stderr[-3000:]}


def drill_kill_and_restart(base: str, reference: dict) -> dict:
    """SIGKILL rank 1 mid-interval in a run started with --resume of the reference's step-8
    checkpoint and train.max_restarts=1: torchrun restarts both ranks, which resume from this run's
    own step-16 checkpoint (not --resume's), and finish with the reference's final weights."""
    start_ckpt = checkpoint_dir(reference["run_dir"], EVERY)
    run_dir = os.path.join(base, "killed")
    run = Run(run_dir, ["--resume", start_ckpt, *run_args("train.max_restarts=1")])
    kill_after = 2 * EVERY + 1  # one step into the third interval
    try:
        ranks = wait_for(lambda: len(run.ranks()) == 2 and run.ranks(), 600, "2 rank processes")
        wait_for(lambda: has_checkpoint(run_dir, 2 * EVERY) and last_step(run_dir) >= kill_after
                 or run.proc.poll() is not None, 600, f"step {kill_after}")
        if run.proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {run.proc.returncode}) before the kill")
        ranks[1].send_signal(signal.SIGSTOP)  # freeze it, read how far the job got, then kill it
        reached = last_step(run_dir)
        ranks[1].send_signal(signal.SIGKILL)
        killed_pid = ranks[1].pid
        code = run.wait(900)
    except BaseException:
        run.kill_all()
        raise
    resumed = [line for line in run.stdout.splitlines() if line.startswith("resumed from")]
    want_resume = f"resumed from {checkpoint_dir(run_dir, 2 * EVERY)} at step {2 * EVERY}"
    resumed_step = 2 * EVERY if resumed and resumed[-1] == want_resume else None
    final = checkpoint_dir(run_dir, STEPS)
    diff = max_weight_diff(weights(final), weights(checkpoint_dir(reference["run_dir"], STEPS))) \
        if has_checkpoint(run_dir, STEPS) else math.inf
    want, got = losses(reference["run_dir"]), losses(run_dir)
    same_losses = all(got.get(s) == want[s] for s in range(EVERY + 1, STEPS + 1))
    lost = reached - 2 * EVERY
    return {"did": f"--resume {os.path.basename(start_ckpt)} of the reference, train.max_restarts=1; SIGKILL "
                   f"rank 1 (pid {killed_pid}) at step {reached}",
            "result": f"exit {code}; restarted and {resumed[-1] if resumed else 'did not resume'}; "
                      f"{lost} step(s) redone; final weights max |diff| vs uninterrupted {diff:.1e}; "
                      f"losses after the resume {'identical' if same_losses else 'DIFFERENT'}",
            "passed": code == 0 and resumed_step is not None and len(resumed) == 2 and diff <= 1e-6
                      and same_losses and 0 <= lost <= EVERY,
            "lost_steps": lost, "max_weight_diff": diff, "resumed": resumed, "stderr": run.stderr[-3000:]}


def drill_hang(base: str, timeout_s: float = 3.0, continue_stopped: bool = False) -> dict:
    """SIGSTOP rank 1 with parallel.timeout_s=3: rank 0's next collective times out and names
    rank 1, rank 0 exits non-zero and torchrun ends the job: SIGTERM to the stopped rank, SIGKILL
    after torchrun's 30 s grace (fixed in torch 2.13 for this path), nothing left running.
    `continue_stopped`: SIGCONT the stopped rank once rank 0 has reported (the pending SIGTERM
    then ends it at once): the CI test's shortcut past the 30 s."""
    import uuid

    tag = uuid.uuid4().hex
    run_dir = os.path.join(base, "hang")
    env = cli_env(FAULT_DRILL_TAG=tag)
    run = Run(run_dir, run_args(f"parallel.timeout_s={timeout_s:g}", "train.steps=100000"), env=env)
    try:
        ranks = wait_for(lambda: len(run.ranks()) == 2 and run.ranks(), 600, "2 rank processes")
        wait_for(lambda: last_step(run_dir) >= 3, 600, "step 3")
        ranks[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        line = wait_for(lambda: next((l for l in run.stderr.splitlines() if "CollectiveError" in l), None),
                        120, "a CollectiveError line")
        error_s = time.monotonic() - stopped_at
        if continue_stopped:
            wait_for(lambda: not ranks[0].is_running() or ranks[0].status() == psutil.STATUS_ZOMBIE, 60,
                     "rank 0 to exit")
            ranks[1].send_signal(signal.SIGCONT)
        code = run.wait(120)
        ended_s = time.monotonic() - stopped_at
    except BaseException:
        run.kill_all()
        raise
    deadline = time.monotonic() + 30  # the launcher has exited; give torchrun's children a moment
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    names_rank = "did not arrive: rank 1 (not responding, dead or stopped" in line
    return {"did": f"SIGSTOP rank 1 at step {last_step(run_dir)} with parallel.timeout_s={timeout_s:g}",
            "result": f"after {error_s:.1f} s: {line.strip()[:400]}; job ended {ended_s:.1f} s after the stop "
                      f"with exit {code}{' (the stopped rank continued by hand)' if continue_stopped else ''}; "
                      f"processes left: {len(left)}",
            "passed": code != 0 and names_rank and error_s < timeout_s + 6 and not left,
            "error_line": line, "error_s": error_s, "exit": code, "stderr": run.stderr[-3000:]}


def drill_nonfinite(base: str) -> dict:
    """A learning rate of 1e30 makes the weights blow up after the first step: every later step is
    non-finite and skipped, the third in a row stops the run naming the step and a parameter."""
    run = Run(os.path.join(base, "nonfinite"), run_args("optim.lr=1e30", "optim.warmup_steps=0",
                                                        "train.max_nonfinite_steps=2", "optim.grad_clip=0"))
    code = run.wait(900)
    skipped = [r["step"] for r in metrics(run.run_dir) if r.get("nonfinite_skipped")]
    line = next((l for l in run.stderr.splitlines() if "NonFiniteError" in l), "")
    return {"did": "optim.lr=1e30, train.max_nonfinite_steps=2",
            "result": f"exit {code}; skipped steps {skipped}; {line.strip()[:400]}",
            "passed": code != 0 and len(skipped) == 2 and "first parameter with a non-finite gradient:" in line,
            "stderr": run.stderr[-3000:]}


SAVE_CHILD = """
import sys, torch
from parallel import build_mesh
from trainer.checkpoint import save_checkpoint
from trainer.recipe import load_config
from trainer.optim import build_optimizer, build_scheduler

class Data:  # the data position a checkpoint saves
    def state_dict(self):
        return {"position": 0}

cfg = load_config(None)
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)])  # ~200 MB with AdamW state
optimizer = build_optimizer(model, cfg.optim)
model(torch.randn(2, 2048)).sum().backward()
optimizer.step()
scheduler = build_scheduler(optimizer, 10, cfg.optim)
mesh = build_mesh(cfg.parallel, torch.device("cpu"))
step = 1
while True:
    save_checkpoint(sys.argv[1], step, model, optimizer, scheduler, Data(), cfg, mesh)
    print("saved", step, flush=True)
    step += 1
"""


def drill_kill_mid_save(base: str) -> dict:
    """A process saving ~200 MB checkpoints in a loop is SIGKILLed while step 2 is being written:
    step 1 stays intact and is the one a restart resumes from."""
    from trainer.checkpoint_files import checkpoint_problem, latest_checkpoint

    run_dir = os.path.join(base, "mid_save")
    proc = subprocess.Popen([sys.executable, "-c", SAVE_CHILD, run_dir], env=cli_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp, final = checkpoint_dir(run_dir, 2) + ".tmp", checkpoint_dir(run_dir, 2)
    try:  # killed once the save of step 2 has written 16 MiB of its ~200
        wait_for(lambda: _dir_bytes(tmp) > 16 * 2**20 or proc.poll() is not None, 300, "the step-2 save",
                 interval=0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    except BaseException:
        proc.kill()
        raise
    partial = _dir_bytes(tmp)
    first = checkpoint_dir(run_dir, 1)
    intact, chosen = checkpoint_problem(first) is None, latest_checkpoint(run_dir)
    return {"did": "SIGKILL during the save of step 2 (~200 MB, the previous save complete)",
            "result": f"step_00000002 {'published' if os.path.isdir(final) else 'not published'}, "
                      f"{partial / 2**20:.0f} MiB left in its .tmp; step_00000001 {'intact' if intact else 'DAMAGED'}; "
                      f"resume picks {os.path.basename(chosen or 'nothing')}",
            "passed": not os.path.isdir(final) and os.path.isdir(tmp) and intact and chosen == first,
            "tmp_bytes": partial}


def _dir_bytes(path: str) -> int:
    try:
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    except OSError:  # not there yet, or a file renamed away while listed
        return 0


def drill_corrupt_checkpoint(base: str, reference: dict) -> dict:
    """The reference's last checkpoint, copied, loses half of a shard: it is skipped with a warning
    naming it, and the resume (trainer.checkpoint.latest_checkpoint, as the ranks call it) picks
    the one before."""
    import contextlib
    import io
    import shutil

    from trainer.checkpoint_files import latest_checkpoint

    run_dir = os.path.join(base, "corrupt")
    shutil.copytree(os.path.join(reference["run_dir"], "checkpoints"), os.path.join(run_dir, "checkpoints"))
    last = checkpoint_dir(run_dir, STEPS)
    shard = os.path.join(last, sorted(n for n in os.listdir(last) if n.endswith(".distcp"))[0])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        chosen = latest_checkpoint(run_dir)
    warning = err.getvalue().strip()
    want = checkpoint_dir(run_dir, STEPS - EVERY)
    return {"did": f"truncated {os.path.basename(shard)} of step_{STEPS:08d} to half",
            "result": f"{warning[:400]}; resume picks {os.path.basename(chosen or 'nothing')}",
            "passed": chosen == want and last in warning and "manifest.json says" in warning,
            "chosen": chosen, "warning": warning}


def drill_bad_inputs(base: str) -> dict:
    """A few bad recipes through the real CLI: one line each, exit 2, fast, nothing left."""
    import uuid

    os.makedirs(base, exist_ok=True)
    empty = os.path.join(base, "empty.txt")
    open(empty, "w").close()
    cases = {"unknown key": ["--set", "train.stpes=5"], "negative size": ["--set", "model.d_model=-8"],
             "layout vs world": ["--nproc-per-node", "3", "--set", "parallel.pp=2"],
             "empty data": ["--set", f"data.source={empty}"], "peft without base": ["--set", "peft.method=lora"]}
    failures, worst = [], 0.0
    for name, args in cases.items():
        tag = uuid.uuid4().hex
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "launch.cli", "run", RECIPE, "--run-dir",
                               os.path.join(base, "bad_run"), *args], capture_output=True, text=True,
                              env=cli_env(FAULT_DRILL_TAG=tag), cwd=ROOT, timeout=120)
        seconds = time.monotonic() - start
        worst = max(worst, seconds)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if proc.returncode != 2 or len(lines) != 1 or tagged_processes(tag):
            failures.append(name)
    return {"did": f"{len(cases)} bad recipes ({', '.join(cases)}) through the real CLI",
            "result": f"{len(cases) - len(failures)}/{len(cases)} refused with one line and exit 2, "
                      f"slowest {worst:.1f} s, no process left",
            "passed": not failures, "failures": failures}
