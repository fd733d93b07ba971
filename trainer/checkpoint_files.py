"""A run's checkpoints on disk: names, completeness, which one to resume, the manifest and
keep_last. Only os and json: the launcher's preflight and the recipe loader use it without torch.

    RUN_DIR/checkpoints/step_XXXXXXXX/   final name: published by one rename once complete
    RUN_DIR/checkpoints/step_XXXXXXXX.tmp/  being written (or left by a crash): never loaded
    manifest.json                       every file with its size, and the launch that wrote it

Saving and loading the state itself is trainer/checkpoint.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

from trainer.atomic import fsync_path as fsync_dir  # noqa: F401 - a directory: its renames become durable

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
# Set by the launcher (launch/spawn.py) for one `sparseforge run`; torchrun's restarts inherit it.
LAUNCH_ID_ENV = "SPARSEFORGE_LAUNCH_ID"
_warned: set[str] = set()


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def is_step_dir(path: str) -> bool:
    """Named like a checkpoint directory: step_XXXXXXXX."""
    return _STEP_DIR.match(os.path.basename(path.rstrip("/"))) is not None


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete checkpoint, in a few words; None when it is one.

    Complete: final name, DCP metadata and rank 0's extra state present, and every file that
    manifest.json lists present with its size (checkpoints without a manifest, written before
    manifests or by import-hf, are checked by the first three only)."""
    if not is_step_dir(path):
        return "not named step_XXXXXXXX"
    for name in (".metadata", "extra_rank0.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        return None
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, {MANIFEST} says {size}"
    return None


def is_complete(path: str) -> bool:
    """Final name, DCP metadata, rank 0's extra state, and every file of the manifest intact."""
    return checkpoint_problem(path) is None


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run directory, oldest first. A final-named directory that is not
    complete (a file lost or truncated after it was published) is skipped with a warning."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(n for n in os.listdir(root) if _STEP_DIR.match(n)):
        path = os.path.join(root, name)
        problem = checkpoint_problem(path)
        if problem is None:
            found.append(path)
        elif path not in _warned:  # once per process: this is called at every save
            _warned.add(path)
            print(f"warning: checkpoint {path} is incomplete or corrupt ({problem}); skipped, an earlier one is used",
                  file=sys.stderr, flush=True)
    return found


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _launch_of(path: str) -> str | None:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f).get("launch_id")
    except (OSError, ValueError, AttributeError):
        return None


def choose_resume(run_dir: str, resume_from: str | None) -> str | None:
    """The checkpoint a starting rank loads: `resume_from` (--resume), else the run directory's latest.

    torchrun restarts a failed job by running the same command again, --resume included; a restart
    must continue from what this launch saved since, not go back to where the launch began. So the
    newest checkpoint written by this launch (LAUNCH_ID_ENV, in its manifest) wins over
    --resume; older ones of the same run directory (say, a trajectory --resume rolled back from)
    do not. Without a launch id (torchrun started by hand), a restart takes the latest checkpoint
    when it is newer than --resume.
    """
    if resume_from is None:
        return latest_checkpoint(run_dir)
    launch = os.environ.get(LAUNCH_ID_ENV)
    found = list_checkpoints(run_dir)
    if launch:
        own = [path for path in found if _launch_of(path) == launch]
        return own[-1] if own else resume_from
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    newer = [path for path in found if checkpoint_step(path) > checkpoint_step(resume_from)]
    return newer[-1] if restarted and newer else resume_from


def checkpoint_step(path: str) -> int:
    """The step of a step_XXXXXXXX directory (-1 for another name)."""
    match = _STEP_DIR.match(os.path.basename(path.rstrip("/")))
    return int(match.group(1)) if match else -1


def write_manifest(tmp: str, step: int) -> None:
    """manifest.json of a checkpoint written to `tmp`: every file with its size (DCP shards of
    every rank included: checkpoints live on a file system all ranks share), and the launch."""
    files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))
             if os.path.isfile(os.path.join(tmp, name))}
    manifest = {"step": step, "launch_id": os.environ.get(LAUNCH_ID_ENV), "files": files}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _written_at(path: str) -> int:
    """When a checkpoint was published: its manifest's mtime (written just before the rename), or
    the directory's for a checkpoint from before manifests."""
    manifest = os.path.join(path, MANIFEST)
    return os.stat(manifest if os.path.isfile(manifest) else path).st_mtime_ns


def prune_checkpoints(run_dir: str, keep_last: int, just_saved: str | None = None) -> None:
    """Delete all but the `keep_last` most recently written checkpoints, never `just_saved`.

    Write order, not step order: after `--resume` rolled a run back to an earlier step, the
    abandoned trajectory's higher steps would otherwise outrank every new save, and keep_last=1
    would delete the checkpoint that was just written."""
    if keep_last <= 0:
        return
    found = sorted(list_checkpoints(run_dir), key=lambda path: (_written_at(path), checkpoint_step(path)))
    for old in found[:-keep_last]:
        if old != just_saved:
            shutil.rmtree(old, ignore_errors=True)
