"""Reliability drills at scale (tests/integration/test_reliability.py and benchmarks/fault_drills.py
run them): asynchronous checkpoints against synchronous ones, kill -9 while a background write is
in flight, a full disk, and the stall a save costs the step loop. The process helpers are
tests/helpers/faults.py's."""
from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import time

from tests.helpers import faults as fh

STEPS, EVERY = 12, 4
# A model whose checkpoint (~100 MB with AdamW) takes a visible time to write.
WIDE = ["model.d_model=256", "moe.expert_ffn_dim=256", "model.num_layers=2"]


def args(*extra: str, nproc: int = 2) -> list[str]:
    return ["--nproc-per-node", str(nproc), "--set", *fh.TINY, *WIDE, f"train.steps={STEPS}",
            f"checkpoint.every={EVERY}", "checkpoint.keep_last=0", *extra]


def _tensors(checkpoint: str) -> dict:
    """Every tensor a checkpoint holds (model, optimizer, extras), by key."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(checkpoint), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    return flat(state)


def drill_async_equals_sync(base: str) -> dict:
    """The same 2-rank run with synchronous and with background saves: identical losses and
    checkpoints with the same tensors, bit for bit."""
    runs = {}
    for mode in ("sync", "async"):
        run = fh.Run(os.path.join(base, mode), args(f"checkpoint.async_save={mode == 'async'}"))
        runs[mode] = (run, run.wait(900))
    (sync, sync_code), (asy, async_code) = runs["sync"], runs["async"]
    differing = []
    for step in range(EVERY, STEPS + 1, EVERY):
        a, b = _tensors(fh.checkpoint_dir(sync.run_dir, step)), _tensors(fh.checkpoint_dir(asy.run_dir, step))
        differing += [f"{step}:{k}" for k in sorted(set(a) | set(b))
                      if k not in a or k not in b or not _same(a[k], b[k])]
        count = len(a)
    same_losses = fh.losses(sync.run_dir) == fh.losses(asy.run_dir)
    return {"did": f"{STEPS} steps on 2 ranks, a checkpoint every {EVERY}, saved synchronously and in the background",
            "result": f"exit {sync_code}/{async_code}; {count} tensors per checkpoint, {len(differing)} differing; "
                      f"losses {'identical' if same_losses else 'DIFFERENT'}",
            "passed": sync_code == 0 and async_code == 0 and not differing and same_losses,
            "run_dir": sync.run_dir, "differing": differing[:5], "stderr": asy.stderr[-3000:]}


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def drill_kill_during_background_write(base: str, reference: dict) -> dict:
    """checkpoint.async_save with train.max_restarts=0: every rank SIGKILLed while a background
    write is in flight (its .tmp directory being filled while steps go on). The previous checkpoint
    stays the latest; the rerun resumes from it and its losses equal the reference's."""
    run_dir = os.path.join(base, "killed_async")
    run = fh.Run(run_dir, args("checkpoint.async_save=true"))
    target = 2 * EVERY
    tmp = fh.checkpoint_dir(run_dir, target) + ".tmp"
    try:
        ranks = fh.wait_for(lambda: len(run.ranks()) == 2 and run.ranks(), 600, "2 rank processes")
        fh.wait_for(lambda: _has_shard(tmp) or run.proc.poll() is not None, 600, f"the step-{target} write",
                    interval=0.002)
        if run.proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {run.proc.returncode}) before the kill")
        reached = fh.last_step(run_dir)
        for p in ranks.values():
            p.send_signal(signal.SIGKILL)
        code = run.wait(300)
    except BaseException:
        run.kill_all()
        raise
    from trainer.checkpoint_files import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    published = os.path.isdir(fh.checkpoint_dir(run_dir, target))
    rerun = fh.Run(run_dir + "_rerun_log", ["--run-dir", run_dir, *args("checkpoint.async_save=true")])
    rerun_code = rerun.wait(900)
    resumed = [line for line in rerun.stdout.splitlines() if line.startswith("resumed from")]
    want, got = fh.losses(reference["run_dir"]), fh.losses(run_dir)
    same = sorted(got) == list(range(1, STEPS + 1)) and all(got[s] == want[s] for s in want)
    attempts = list(fh.steps_by_attempt(run_dir).values())  # the killed launch, then the rerun
    lost = len(set(attempts[0]) & set(attempts[1])) if len(attempts) == 2 else -1
    return {"did": f"async saves; SIGKILL of both ranks while step {target}'s background write was in flight "
                   f"(training had reached step {reached}); then the same command again",
            "result": f"exit {code}; step {target} {'published' if published else 'not published'}; latest "
                      f"{os.path.basename(latest or 'none')}; rerun exit {rerun_code}, "
                      f"{resumed[-1] if resumed else 'did not resume'}; {lost} step(s) computed twice "
                      f"(steps.log); "
                      f"losses {'equal the reference' if same else 'DIFFERENT'}",
            "passed": code != 0 and latest == fh.checkpoint_dir(run_dir, EVERY) and rerun_code == 0 and same
                      and bool(resumed) and 0 <= lost <= 2 * EVERY,
            "redone_steps": [lost], "stderr": rerun.stderr[-3000:]}


def drill_kill_mid_save_ranks(base: str, reference: dict) -> dict:
    """The default synchronous save on 2 real ranks (train.max_restarts=0): rank 1 SIGKILLed while
    step 8's checkpoint is being written (its step_X.tmp holds shards, not renamed); rank 0 may
    finish its own writes. The half-written checkpoint is never published nor chosen; the same
    command again resumes from step 4 and its losses equal the uninterrupted `reference`'s."""
    from trainer.checkpoint_files import latest_checkpoint

    run_dir = os.path.join(base, "killed_mid_save")
    run = fh.Run(run_dir, args())
    target = 2 * EVERY
    tmp, final = fh.checkpoint_dir(run_dir, target) + ".tmp", fh.checkpoint_dir(run_dir, target)
    try:
        ranks = fh.wait_for(lambda: len(run.ranks()) == 2 and run.ranks(), 600, "2 rank processes")
        fh.wait_for(lambda: _has_shard(tmp) or run.proc.poll() is not None, 600, f"the step-{target} write",
                    interval=0.002)
        ranks[1].send_signal(signal.SIGKILL)
        at_kill = _shards(tmp)  # what the save had written when rank 1 died
        published_at_kill = os.path.isdir(final)
        code = run.wait(300)
    except BaseException:
        run.kill_all()
        raise
    published, latest = os.path.isdir(final), latest_checkpoint(run_dir)
    rerun = fh.Run(run_dir + "_rerun_log", ["--run-dir", run_dir, *args()])
    rerun_code = rerun.wait(900)
    resumed = [line for line in rerun.stdout.splitlines() if line.startswith("resumed from")]
    want, got = fh.losses(reference["run_dir"]), fh.losses(run_dir)
    same = sorted(got) == list(range(1, STEPS + 1)) and all(got[s] == want[s] for s in want)
    shards = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sorted(at_kill.items())) or "none"
    attempts = list(fh.steps_by_attempt(run_dir).values())  # the killed launch, then the rerun
    lost = len(set(attempts[0]) & set(attempts[1])) if len(attempts) == 2 else -1
    return {"did": f"synchronous saves on 2 ranks; SIGKILL of rank 1 while step {target}'s checkpoint was written "
                   f"(its .tmp then held: {shards}); then the same command again",
            "result": f"exit {code}; step {target} {'PUBLISHED' if published else 'not published'}; latest "
                      f"{os.path.basename(latest or 'none')}; rerun exit {rerun_code}, "
                      f"{resumed[-1] if resumed else 'did not resume'}; {lost} step(s) computed twice "
                      f"(steps.log); losses {'equal the uninterrupted run' if same else 'DIFFERENT'}",
            "passed": code != 0 and bool(at_kill) and not published_at_kill and not published
                      and latest == fh.checkpoint_dir(run_dir, EVERY) and rerun_code == 0 and same
                      and 0 <= lost <= EVERY and resumed == [f"resumed from {fh.checkpoint_dir(run_dir, EVERY)} at step {EVERY}"],
            "shards_at_kill": at_kill, "published": published, "latest": latest, "resumed": resumed,
            "redone_steps": [lost],
            "stderr": run.stderr[-1500:] + rerun.stderr[-1500:]}


def _shards(tmp: str) -> dict[str, int]:
    """{name: bytes} of the DCP shard files in `tmp` now."""
    try:
        return {name: os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp) if name.endswith(".distcp")}
    except OSError:
        return {}


def _has_shard(tmp: str) -> bool:
    try:
        return any(name.endswith(".distcp") and os.path.getsize(os.path.join(tmp, name)) > 0
                   for name in os.listdir(tmp))
    except OSError:
        return False


# --------------------------------------------------------------------------- a full disk


def full_disk_unavailable() -> str | None:
    """Why a size-limited tmpfs cannot be mounted here (None: it can)."""
    if os.geteuid() != 0:
        return "mounting a size-limited tmpfs needs root"
    return None


@contextlib.contextmanager
def small_disk(path: str, megabytes: int):
    """A tmpfs of `megabytes` MB mounted at `path` (root), unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", path], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def _fill(path: str, leave_bytes: int) -> str:
    """A file that takes all but `leave_bytes` of the file system at `path`: written until the
    disk is full (the run goes on writing meanwhile), then cut back by `leave_bytes`."""
    import errno

    filler = os.path.join(path, "filler.bin")
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    size = os.path.getsize(filler)
    os.truncate(filler, max(size - leave_bytes, 0))
    return filler


def drill_full_disk(base: str, on_error: str = "stop") -> dict:
    """A run on a 640 MB tmpfs whose disk is filled after the step-4 checkpoint: the step-8 save
    fails for lack of space. One line names the path and the bytes; the partial save is removed;
    step 4 stays the latest and resumes once there is room (on_error=stop), or the run trains on
    (on_error=skip)."""
    from trainer.checkpoint_files import latest_checkpoint

    disk = os.path.join(base, f"disk_{on_error}")
    with small_disk(disk, 640):
        run_dir = os.path.join(disk, "run")
        run = fh.Run(run_dir, args(f"checkpoint.on_error={on_error}", "checkpoint.async_save=true"))
        try:
            ranks = fh.wait_for(lambda: len(run.ranks()) == 2 and run.ranks(), 600, "2 rank processes")
            fh.wait_for(lambda: fh.has_checkpoint(run_dir, EVERY) or run.proc.poll() is not None, 600,
                        "the step-4 checkpoint")
            for p in ranks.values():  # held still while the disk fills, so the next save is step 8's
                p.send_signal(signal.SIGSTOP)
            try:
                filler = _fill(disk, 256 * 1024)  # room for log lines, not for a ~90 MB checkpoint
            finally:
                for p in ranks.values():
                    p.send_signal(signal.SIGCONT)
            code = run.wait(600)
        except BaseException:
            run.kill_all()
            raise
        lines = [line for line in run.stderr.splitlines() if "checkpoint save of step" in line]
        leftovers = [n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.endswith(".tmp")]
        latest = latest_checkpoint(run_dir)
        result = {"did": f"disk filled after the step-{EVERY} checkpoint (checkpoint.on_error={on_error})",
                  "error_line": lines[0] if lines else None, "exit": code, "latest": latest, "leftovers": leftovers}
        if on_error == "stop":
            os.unlink(filler)
            rerun = fh.Run(run_dir + "_rerun", ["--run-dir", run_dir, *args()])
            rerun_code = rerun.wait(900)
            resumed = any(line.startswith(f"resumed from {fh.checkpoint_dir(run_dir, EVERY)}")
                          for line in rerun.stdout.splitlines())
            passed = (code != 0 and len(lines) == 1 and "No space left on device" in lines[0] and "MB free" in lines[0]
                      and latest == fh.checkpoint_dir(run_dir, EVERY) and not leftovers and rerun_code == 0
                      and resumed)
            result["result"] = (f"exit {code}; {len(lines)} line(s): {lines[0] if lines else '-'}; no .tmp left: "
                                f"{not leftovers}; latest {os.path.basename(latest or 'none')}; after freeing the "
                                f"disk the rerun {'resumed from it' if resumed else 'DID NOT RESUME'} (exit {rerun_code})")
        else:
            passed = code == 0 and len(lines) >= 1 and latest == fh.checkpoint_dir(run_dir, EVERY) and not leftovers
            result["result"] = (f"exit {code}; {len(lines)} warning(s), first: {lines[0] if lines else '-'}; "
                                f"latest {os.path.basename(latest or 'none')}; no .tmp left: {not leftovers}")
        result["passed"] = passed
        result["stderr"] = run.stderr[-3000:]
        return result


# --------------------------------------------------------------------------- the stall


def measure_save_stall(steps: int = 9, every: int = 3) -> dict:
    """In this process, one rank of the tiny recipe with a checkpoint large enough to see
    (~150 MB with AdamW): the time the step loop is blocked by each save (the call, and any wait
    for the previous background write), synchronous vs background, medians over the saves."""
    import tempfile

    from trainer.loop import Trainer
    from trainer.metrics import MetricsLogger
    from trainer.recipe import load_config

    out = {}
    for mode in ("sync", "async"):
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = load_config(fh.RECIPE, fh.TINY + ["model.d_model=320", "moe.expert_ffn_dim=320",
                                                    f"train.steps={steps}", f"checkpoint.async_save={mode == 'async'}"])
            trainer = Trainer(cfg, run_dir)
            log = MetricsLogger(run_dir, cfg, True, 0, steps)
            batches = trainer.data.train_batches()
            stalls, step_s = [], []
            for step in range(1, steps + 1):
                start = time.perf_counter()
                trainer.stepper(batches, step)
                step_s.append(time.perf_counter() - start)
                trainer.step = step
                if step % every == 0:
                    start = time.perf_counter()
                    trainer._save(log)
                    stalls.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer._wait_for_save(log)
            stalls[-1] += time.perf_counter() - start  # the run's end waits for the last write
            trainer.watchdog.stop()
            log.close()
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(run_dir) for f in fs
                       if "checkpoints" in d)
            out[mode] = {"stall_s": statistics.median(stalls), "step_s": statistics.median(step_s),
                         "checkpoint_mb": size / 1e6 / (steps // every)}
    out["async_vs_sync"] = out["async"]["stall_s"] / out["sync"]["stall_s"]
    return out


# --------------------------------------------------------------------------- a lost node


def drill_lost_node(base: str, steps: int = 16, every: int = 4) -> dict:
    """Two namespace hosts, one rank each, c10d rendezvous at host 0, train.max_restarts=2. After
    the step-4 checkpoint, host 1 is lost (every process SIGKILLed, its link cut); host 0's rank
    fails, its torchrun agent restarts and waits in the rendezvous; a replacement host 1 (the same
    command, the link back) joins; both resume from the latest checkpoint and finish. The steps
    computed before the loss and again after it have equal losses, and every loss equals a
    one-node run's (2 local ranks: the same global batch and layout)."""
    import sys

    from tests.helpers.cluster_box import ClusterBox, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return {"did": "lost node", "result": f"skipped: {reason}", "passed": True, "skipped": reason}
    common = ["--set", *fh.TINY, f"train.steps={steps}", f"checkpoint.every={every}", "checkpoint.keep_last=0",
              "train.max_restarts=2", "parallel.timeout_s=30"]
    reference = fh.Run(os.path.join(base, "one_node"), ["--nproc-per-node", "2", *common])
    ref_code = reference.wait(900)
    run_dir = os.path.join(base, "lost_node")
    env = {"PYTHONPATH": fh.ROOT, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    with ClusterBox(num_hosts=2) as box:
        argv = [sys.executable, "-m", "launch.cli", "run", fh.RECIPE, "--run-dir", run_dir, "--nnodes", "2",
                "--nproc-per-node", "1", "--rdzv-endpoint", f"{box.hosts[0].addr}:29400", *common]
        logs = [open(os.path.join(base, f"host{h}.log"), "w") for h in range(2)]
        host0 = box.popen(0, argv, env, cwd=fh.ROOT, stdout=logs[0], stderr=subprocess.STDOUT)
        box.popen(1, argv, env, cwd=fh.ROOT, stdout=logs[1], stderr=subprocess.STDOUT)
        fh.wait_for(lambda: fh.has_checkpoint(run_dir, every) and fh.last_step(run_dir) >= every + 2
                    or host0.poll() is not None, 600, f"the step-{every} checkpoint and step {every + 2}")
        before = fh.losses(run_dir)
        lost_at = max(before, default=0)
        box.take_down(1)
        lost_time = time.monotonic()
        time.sleep(2)
        box.bring_up(1)
        replacement = box.popen(1, argv, env, cwd=fh.ROOT, stdout=logs[1], stderr=subprocess.STDOUT)
        try:
            code0, code1 = host0.wait(900), replacement.wait(900)
        except subprocess.TimeoutExpired:
            code0 = code1 = None
        recovered_s = time.monotonic() - lost_time
        for log in logs:
            log.close()
    host_logs = []
    for h in range(2):
        with open(os.path.join(base, f"host{h}.log")) as f:
            host_logs.append(f.read())
    host0_log = host_logs[0]
    # Global rank 0 prints it, on whichever host the new rendezvous made node 0.
    resumed = [line for log in host_logs for line in log.splitlines() if line.startswith("resumed from")]
    after = fh.losses(run_dir)
    want = fh.losses(reference.run_dir)
    redone = [s for s in before if s in after and s > every]
    redone_equal = all(after[s] == before[s] for s in redone)
    rel = max((abs(after[s] - want[s]) / abs(want[s]) for s in want if s in after), default=float("inf"))
    attempts = list(fh.steps_by_attempt(run_dir).values())  # before the loss, after the restart
    twice = len(set(attempts[0]) & set(attempts[-1])) if len(attempts) >= 2 else -1
    passed = (ref_code == 0 and code0 == 0 and code1 == 0 and bool(resumed) and sorted(after) == list(range(1, steps + 1))
              and redone_equal and rel <= 1e-5 and 0 <= twice <= every)
    return {"did": f"2 hosts x 1 rank, c10d, train.max_restarts=2; host 1 lost at step {lost_at} (processes killed, "
                   f"link cut), a replacement started 2 s later",
            "result": f"exit {code0}/{code1} after {recovered_s:.0f} s; {resumed[-1] if resumed else 'did not resume'}; "
                      f"{twice} step(s) computed twice (steps.log), the logged ones "
                      f"{'equal' if redone_equal else 'DIFFERENT'}; losses vs "
                      f"one node: max rel diff {rel:.1e}",
            "passed": passed, "redone_steps": [twice], "recovered_s": recovered_s,
            "stderr": host0_log[-3000:]}
