"""Process-level helpers of the fault drills (tests/integration/test_faults.py and
benchmarks/fault_drills.py): start the real CLI, find its rank processes, watch the run directory,
signal ranks, and check that nothing is left behind."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
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
TORCHRUN_GRACE_S = 30  # torchrun's wait between the SIGTERM and the SIGKILL of the ranks it stops


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


def steps_by_attempt(run_dir: str) -> dict[str, list[int]]:
    """RUN_DIR/steps.log read back: {attempt: the steps it computed, in order}, attempts in the
    order they started (trainer/metrics.py writes it: one line per step, never truncated)."""
    path = os.path.join(run_dir, "steps.log")
    out: dict[str, list[int]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip().endswith("}"):  # a line being written is skipped
                    record = json.loads(line)
                    out.setdefault(record["attempt"], []).append(record["step"])
    return out


def kill_points(seed: int, num_kills: int = 3) -> list[int]:
    """`num_kills` distinct steps after the reference's step-EVERY checkpoint, none on a checkpoint
    step, drawn with random.Random(seed), ascending."""
    candidates = [s for s in range(EVERY + 1, STEPS) if s % EVERY]
    return sorted(random.Random(seed).sample(candidates, num_kills))


def drill_kill_and_restart(base: str, reference: dict, seed: int = 0, num_kills: int = 3) -> dict:
    """--resume of the reference's step-8 checkpoint with train.max_restarts=num_kills; rank 1
    SIGKILLed once the attempt running reaches each of `kill_points(seed)`: torchrun restarts both
    ranks each time, they resume from this launch's newest checkpoint (--resume's until it saved
    one), and finish with the reference's losses and final weights. The work lost is read from the
    run's own steps.log: the steps that an attempt and the one after it both computed."""
    start_ckpt = checkpoint_dir(reference["run_dir"], EVERY)
    run_dir = os.path.join(base, "killed")
    points = kill_points(seed, num_kills)
    run = Run(run_dir, ["--resume", start_ckpt, *run_args(f"train.max_restarts={num_kills}")])
    killed_pids: list[int] = []
    try:
        for attempt, point in enumerate(points):
            def reached():
                attempts = list(steps_by_attempt(run_dir).values())
                return len(attempts) > attempt and max(attempts[attempt]) >= point or run.proc.poll() is not None
            wait_for(reached, 600, f"attempt {attempt} at step {point}", interval=0.005)
            if run.proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {run.proc.returncode}) before kill {attempt + 1}")
            rank1 = run.ranks().get(1)
            if rank1 is None or rank1.pid in killed_pids:
                raise RuntimeError(f"no new rank 1 to kill at step {point}")
            rank1.send_signal(signal.SIGKILL)
            killed_pids.append(rank1.pid)
        code = run.wait(900)
    except BaseException:
        run.kill_all()
        raise
    attempts = list(steps_by_attempt(run_dir).values())
    # Per kill: the steps the killed attempt computed that the next attempt computed again.
    redone = [len(set(a) & set(b)) for a, b in zip(attempts, attempts[1:])]
    resumed = [line for line in run.stdout.splitlines() if line.startswith("resumed from")]
    final = checkpoint_dir(run_dir, STEPS)
    diff = max_weight_diff(weights(final), weights(checkpoint_dir(reference["run_dir"], STEPS))) \
        if has_checkpoint(run_dir, STEPS) else math.inf
    want, got = losses(reference["run_dir"]), losses(run_dir)
    same_losses = all(got.get(s) == want[s] for s in range(EVERY + 1, STEPS + 1))
    spread = (min(redone), statistics.median(redone), max(redone)) if redone else None
    return {"did": f"--resume {os.path.basename(start_ckpt)} of the reference, train.max_restarts={num_kills}; "
                   f"SIGKILL rank 1 at steps {points} (random.Random({seed})), pids {killed_pids}",
            "result": f"exit {code}; {len(attempts)} attempts, {len(resumed)} resumed; steps computed twice "
                      f"per kill (steps.log): {redone} (min/median/max {spread}, checkpoint interval {EVERY}); "
                      f"final weights max |diff| vs uninterrupted {diff:.1e}; losses after the resume "
                      f"{'identical' if same_losses else 'DIFFERENT'}",
            "passed": code == 0 and len(attempts) == num_kills + 1 and len(resumed) == num_kills + 1
                      and diff <= 1e-6 and same_losses and all(0 <= n <= EVERY for n in redone),
            "kill_points": points, "redone_steps": redone, "max_weight_diff": diff, "resumed": resumed,
            "stderr": run.stderr[-3000:]}


def hang_end_bound(timeout_s: float) -> float:
    """Seconds from the SIGSTOP by which the job must have ended when the stopped rank stays
    stopped: the collective timeout, up to 6 s for rank 0 to report and exit, torchrun's grace
    between its SIGTERM and its SIGKILL, and 15 s for torchrun to notice, tear down and exit on a
    loaded 2-core machine."""
    return timeout_s + 6 + TORCHRUN_GRACE_S + 15


def drill_hang(base: str, timeout_s: float = 3.0) -> dict:
    """SIGSTOP rank 1 with parallel.timeout_s=3: rank 0's next collective times out and names
    rank 1, rank 0 exits non-zero and torchrun ends the job: SIGTERM to the stopped rank (pending:
    a stopped process does not run its handler), SIGKILL after torchrun's 30 s grace, nothing left
    running, all within `hang_end_bound`."""
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
        code = run.wait(120)
        ended_s = time.monotonic() - stopped_at
    except BaseException:
        run.kill_all()
        raise
    deadline = time.monotonic() + 30  # the launcher has exited; give torchrun's children a moment
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left_s = time.monotonic() - stopped_at
    names_rank = "did not arrive: rank 1 (not responding, dead or stopped" in line
    bound = hang_end_bound(timeout_s)
    return {"did": f"SIGSTOP rank 1 at step {last_step(run_dir)} with parallel.timeout_s={timeout_s:g}",
            "result": f"after {error_s:.1f} s: {line.strip()[:400]}; job ended {ended_s:.1f} s after the stop "
                      f"with exit {code}; "
                      f"processes left: {len(left)} (checked {left_s:.1f} s after the stop; bound {bound:g} s)",
            "passed": code != 0 and names_rank and error_s < timeout_s + 6 and ended_s <= bound and not left,
            "error_line": line, "error_s": error_s, "ended_s": ended_s, "bound_s": bound, "exit": code,
            "stderr": run.stderr[-3000:]}


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


def _tree(path: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `path`."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), path)] = (stat.st_size, stat.st_mtime_ns)
    return out


def drill_corrupt_checkpoint(base: str, reference: dict) -> dict:
    """The reference's checkpoints, copied, and the last one loses half of a shard: the resume
    (trainer.checkpoint_files.latest_checkpoint, as the ranks call it) skips it with a warning
    naming it and picks the one before; `sparseforge run --resume` of it through the real CLI is
    refused before anything starts: one line on stderr naming the file, exit 2, no rank process,
    the run directory untouched."""
    import contextlib
    import io
    import shutil
    import uuid

    from trainer.checkpoint_files import latest_checkpoint

    run_dir = os.path.join(base, "corrupt")
    shutil.copytree(os.path.join(reference["run_dir"], "checkpoints"), os.path.join(run_dir, "checkpoints"))
    last = checkpoint_dir(run_dir, STEPS)
    shard_name = sorted(n for n in os.listdir(last) if n.endswith(".distcp"))[0]
    shard = os.path.join(last, shard_name)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        chosen = latest_checkpoint(run_dir)
    warning = err.getvalue().strip()
    want = checkpoint_dir(run_dir, STEPS - EVERY)
    # The same checkpoint given to --resume: refused by the launcher's preflight.
    tag, before = uuid.uuid4().hex, _tree(run_dir)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "run", RECIPE, "--run-dir", run_dir, "--resume", last,
                           *run_args()], capture_output=True, text=True, env=cli_env(FAULT_DRILL_TAG=tag), cwd=ROOT,
                          timeout=300)
    seconds = time.monotonic() - started
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    spawned = "run directory:" in proc.stdout or bool(tagged_processes(tag))  # printed just before torchrun starts
    changed = sorted(set(_tree(run_dir).items()) ^ set(before.items()))
    refused = proc.returncode == 2 and len(lines) == 1 and shard_name in lines[0] and last in lines[0]
    return {"did": f"truncated {shard_name} of step_{STEPS:08d} to half; then sparseforge run --resume of it",
            "result": f"{warning[:400]}; resume picks {os.path.basename(chosen or 'nothing')}; --resume: exit "
                      f"{proc.returncode} in {seconds:.1f} s, {len(lines)} stderr line(s): {' | '.join(lines)[:400]}; "
                      f"{'SPAWNED' if spawned else 'nothing spawned'}, {len(changed)} file(s) of the run directory "
                      f"changed",
            "passed": chosen == want and last in warning and "manifest.json says" in warning and refused
                      and not spawned and not changed,
            "chosen": chosen, "warning": warning, "cli_exit": proc.returncode, "cli_stderr": lines,
            "changed_files": changed, "stderr": proc.stderr[-3000:]}


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
