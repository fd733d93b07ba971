"""SLURM: write an sbatch script that runs a validated recipe on N nodes (and submit it).

`sparseforge run RECIPE --launcher slurm --nnodes N --nproc-per-node G ...` writes

    RUN_DIR/slurm/job.sbatch       the script (printed; `--submit` hands it to sbatch)
    RUN_DIR/slurm/config.yaml      the resolved config the job trains with
    RUN_DIR/slurm/code/            a copy of the packages (launch, trainer, models, parallel) and
                                   SNAPSHOT.txt: the git revision and `git diff HEAD` they came from
    RUN_DIR/slurm/job-<id>.out     the job's output (appended to when requeued)

so a job that waits in the queue runs the code and config of the moment it was written, not
later edits. Regenerating replaces the snapshot (a job still queued then runs the new one).

The script runs one task per node (`srun --ntasks-per-node=1`); each task is a torchrun agent
starting G ranks, all meeting at a c10d rendezvous on the allocation's first node with the job
id as rendezvous id. The torchrun command is `launch.spawn.torchrun_command`, the same one
`sparseforge run` uses, with shell variables for what only the allocation knows.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from launch.spawn import DEFAULT_PORT, REPO_ROOT, NodeArgs, torchrun_command
from trainer.config import Config, ConfigError
from trainer.recipe import save_config

PACKAGES = ("launch", "trainer", "models", "parallel")  # pyproject's packages: all the ranks import
SIGNAL_SECONDS = 120  # USR1 this long before the time limit: time to requeue before the kill


@dataclass
class SlurmJob:
    nnodes: int
    nproc_per_node: int
    run_dir: str
    job_name: str
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # HH:MM:SS or any form sbatch --time accepts
    gpus_per_node: int = 0  # 0: no GPU request (CPU partitions)
    cpus_per_task: int | None = None  # the cores of one node's torchrun (all its ranks)
    sbatch_args: list[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. "--qos=high"
    port: int = DEFAULT_PORT  # of the c10d store on the first node
    max_restarts: int = 0  # train.max_restarts: torchrun restarts every rank of the job after a failure
    python: str = sys.executable  # the interpreter on the compute nodes (a shared file system)

    @property
    def slurm_dir(self) -> str:
        return os.path.join(self.run_dir, "slurm")

    @property
    def script_path(self) -> str:
        return os.path.join(self.slurm_dir, "job.sbatch")


def _word(arg: str) -> str:
    """One shell word: a $VARIABLE reference in double quotes (expanded by the job), else quoted."""
    return f'"{arg}"' if "$" in arg else shlex.quote(arg)


def _wrap(words: list[str], indent: str = "    ", width: int = 100) -> str:
    """Words joined into continued lines of at most `width` characters (an option with its value
    stays on one line)."""
    lines, line = [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = indent + w
        else:
            line = f"{line} {w}" if line else w
    lines.append(line)
    return " \\\n".join(lines)


def _pair_words(cmd: list[str]) -> list[str]:
    """Shell words of `cmd`, with `-m MODULE` and `--flag VALUE` kept together."""
    out, i = [], 0
    while i < len(cmd):
        word = _word(cmd[i])
        if cmd[i].startswith("-") and "=" not in cmd[i] and i + 1 < len(cmd) and not cmd[i + 1].startswith("-"):
            word, i = f"{word} {_word(cmd[i + 1])}", i + 1
        out.append(word)
        i += 1
    return out


def render_sbatch(job: SlurmJob) -> str:
    """The text of job.sbatch (a pure function of `job`: the README's copy is checked against it)."""
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nnodes}", "--ntasks-per-node=1"]
    if job.gpus_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        directives.append(f"--cpus-per-task={job.cpus_per_task}")
    for name, value in (("partition", job.partition), ("account", job.account), ("time", job.time)):
        if value:
            directives.append(f"--{name}={value}")
    directives += [f"--signal=B:USR1@{SIGNAL_SECONDS}", "--requeue", "--open-mode=append",
                   f"--output={os.path.join(job.slurm_dir, 'job-%j.out')}", *job.sbatch_args]
    nodes = NodeArgs(job.nproc_per_node, job.nnodes, rdzv_backend="c10d",
                     rdzv_endpoint=f"$HEAD_NODE:{job.port}", rdzv_id="$SLURM_JOB_ID", max_restarts=job.max_restarts)
    # As launch.spawn gives its ranks: a rendezvous store per restart round (pytorch#135712).
    restarts = ("# torchrun restarts (train.max_restarts) need a rendezvous store per round: a restarted round\n"
                "# would read the previous round's addresses from a shared one (pytorch#135712).\n"
                "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n") if job.max_restarts > 0 else ""
    # No --resume: every start, the first and each requeue, resumes from the run directory's
    # latest checkpoint (trainer.loop), which is what a requeued job must do.
    torchrun = torchrun_command(nodes, "$RUN_DIR/slurm/config.yaml", "$RUN_DIR", None,
                                python="$PYTHON", probe=False)
    srun = ["srun", f"--nodes={job.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *torchrun]
    return f"""#!/bin/bash
# Written by `sparseforge run --launcher slurm`; regenerate it rather than edit it.
{chr(10).join(f"#SBATCH {d}" for d in directives)}
set -euo pipefail

RUN_DIR={shlex.quote(job.run_dir)}
PYTHON={shlex.quote(job.python)}
# The code and config snapshot taken when this script was written (not the live checkout):
# running from inside it puts it first on every rank's import path.
cd "$RUN_DIR/slurm/code"
export PYTHONPATH="$RUN_DIR/slurm/code${{PYTHONPATH:+:$PYTHONPATH}}"
{restarts}
# c10d rendezvous on the allocation's first node; the job id names it, the same on every node
# and again after a requeue. (sed, not head: head closes the pipe early, and scontrol's SIGPIPE
# would end the script under pipefail.)
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
echo "job $SLURM_JOB_ID: {job.nnodes} nodes x {job.nproc_per_node} ranks, rendezvous $HEAD_NODE:{job.port}"

# Time limit (USR1 {SIGNAL_SECONDS} s before it, --signal) or preemption: requeue. The job starts again
# from the run directory's latest checkpoint, so everything after that checkpoint is computed
# twice: choose checkpoint.every so that one checkpoint interval is a small part of --time.
# (Sites with PreemptMode=REQUEUE requeue a preempted --requeue job themselves; it resumes alike.)
requeue() {{
  echo "job $SLURM_JOB_ID: USR1, requeueing; it resumes from the latest checkpoint in $RUN_DIR"
  scontrol requeue "$SLURM_JOB_ID"
}}
trap requeue USR1

# One torchrun agent per node; each starts {job.nproc_per_node} ranks. srun runs in the background because
# bash runs a trap only between commands: `wait` returns when USR1 arrives, then waits again.
{_wrap(_pair_words(srun))} &
SRUN_PID=$!
while wait "$SRUN_PID"; STATUS=$?; kill -0 "$SRUN_PID" 2>/dev/null; do :; done
exit "$STATUS"
"""


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def snapshot_code(dest: str) -> None:
    """Copy the packages into `dest` (replaced whole), with SNAPSHOT.txt naming their revision
    and the uncommitted changes on top of it (the copy holds those changes already)."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(REPO_ROOT, pkg), os.path.join(tmp, pkg), ignore=ignore)
    rev = (_git("rev-parse", "HEAD") or "").strip() or "unknown (not a git checkout)"
    diff = _git("diff", "HEAD", "--", *PACKAGES) or ""
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", *PACKAGES) or ""
    with open(os.path.join(tmp, "SNAPSHOT.txt"), "w") as f:
        f.write(f"source: {REPO_ROOT}\ngit revision: {rev}\n")
        f.write(f"untracked files copied: {', '.join(untracked.split()) or 'none'}\n")
        f.write("uncommitted changes (git diff HEAD, included in this copy):\n" + (diff or "none\n"))
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)


def _pin_local_paths(cfg: Config) -> None:
    """The job runs inside the snapshot, not where this command ran: local data and tokenizer
    paths given relative to here become absolute (hub names stay as they are)."""
    from trainer.datasets_io import looks_like_local_path

    for section, key in (("data", "source"), ("data", "tokenizer")):
        value = getattr(getattr(cfg, section), key)
        if value and not os.path.isabs(value) and (looks_like_local_path(value) or os.path.exists(value)):
            setattr(getattr(cfg, section), key, os.path.abspath(os.path.expanduser(value)))


def write_job(cfg: Config, job: SlurmJob) -> str:
    """Write the config and code snapshot and job.sbatch under RUN_DIR/slurm/; returns the
    script's path."""
    os.makedirs(job.slurm_dir, exist_ok=True)
    _pin_local_paths(cfg)
    save_config(cfg, os.path.join(job.run_dir, "config.yaml"))  # the run directory's contract
    save_config(cfg, os.path.join(job.slurm_dir, "config.yaml"))  # what the job reads
    snapshot_code(os.path.join(job.slurm_dir, "code"))
    with open(job.script_path, "w") as f:
        f.write(render_sbatch(job))
    os.chmod(job.script_path, 0o755)
    return job.script_path


def submit(script_path: str) -> int:
    """`sbatch SCRIPT`; its exit code (sbatch prints the job id)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError(f"--submit: sbatch not found on PATH; submit {script_path} from a SLURM login node")
    return subprocess.run([sbatch, script_path]).returncode


# -- the CLI's side (`sparseforge run --launcher slurm`) --------------------------------------------

# Options of `run` that only --launcher slurm reads, as argparse dests.
SLURM_OPTIONS = ("partition", "account", "time", "gpus_per_node", "cpus_per_task", "job_name", "sbatch_args",
                 "submit")
# Options of `run` that the script decides (the allocation's first node, the job id).
_SCRIPT_DECIDES = ("node_rank", "master_addr", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "local_addr")


def add_slurm_args(run) -> None:
    """The SLURM options of `sparseforge run`."""
    g = run.add_argument_group("--launcher slurm")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--time", default=None, help="time limit, e.g. 48:00:00")
    g.add_argument("--gpus-per-node", type=int, default=None, help="default: --nproc-per-node; 0: no GPUs")
    g.add_argument("--cpus-per-task", type=int, default=None, help="cores of one node's torchrun (all its ranks)")
    g.add_argument("--job-name", default=None, help="default: the run directory's name")
    g.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[], metavar="ARG",
                   help='an extra #SBATCH line, e.g. --sbatch-arg="--qos=high" (repeatable)')
    g.add_argument("--submit", action="store_true", help="submit the script with sbatch")


def check_launcher_args(args) -> None:
    """SLURM options only with --launcher slurm; with it, no rendezvous options and no --resume."""
    if getattr(args, "launcher", "torchrun") != "slurm":
        given = [name for name in SLURM_OPTIONS if getattr(args, name, None) not in (None, False, [])]
        if given:
            flag = "--sbatch-arg" if given[0] == "sbatch_args" else "--" + given[0].replace("_", "-")
            raise ConfigError(f"{flag} is an option of --launcher slurm")
        return
    decided = [name for name in _SCRIPT_DECIDES if getattr(args, name, None) is not None]
    if decided:
        raise ConfigError(f"--{decided[0].replace('_', '-')}: with --launcher slurm the script rendezvouses "
                          f"on the allocation's first node (only --master-port is taken, as its port)")
    if getattr(args, "resume", None):
        raise ConfigError("--resume is not taken with --launcher slurm: the job (and every requeue) resumes "
                          "from the run directory's latest checkpoint; copy a checkpoint into "
                          "RUN_DIR/checkpoints to start from it")
    for name in ("gpus_per_node", "cpus_per_task"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def run_slurm(cfg: Config, args, run_dir: str) -> int:
    """Write RUN_DIR/slurm/job.sbatch for a validated config, print its path, maybe submit it."""
    from launch.preflight import preflight

    if any(c.isspace() for c in run_dir):
        raise ConfigError(f"--launcher slurm: the run directory {run_dir!r} has whitespace, which #SBATCH "
                          f"--output cannot hold")
    preflight(cfg, run_dir, None)  # on the login node: a shared file system is assumed
    job = SlurmJob(
        nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, run_dir=run_dir,
        job_name=args.job_name or os.path.basename(run_dir.rstrip(os.sep)) or "sparseforge",
        partition=args.partition, account=args.account, time=args.time,
        gpus_per_node=args.nproc_per_node if args.gpus_per_node is None else args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, sbatch_args=list(args.sbatch_args),
        port=args.master_port or DEFAULT_PORT, max_restarts=cfg.train.max_restarts)
    path = write_job(cfg, job)
    print(f"sbatch script: {path}", flush=True)
    return submit(path) if args.submit else 0
