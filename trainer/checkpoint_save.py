"""Writing one checkpoint: synchronously, or in the background while training goes on
(checkpoint.async_save), and what happens when a save fails (a full disk, any I/O error).

The phases of a save of step S (every rank; trainer/checkpoint.py names the layout):
    1. rank 0 makes step_S.tmp (removing a stale one); barrier.
    2. every rank writes its own small state (extra_rank{R}.pt; rank 0 config.yaml); the ranks
       agree that every write succeeded (an all-reduce) before any shard is written.
    3. DCP writes the model and optimizer shards: `dcp.save`, or `dcp.async_save`, which copies
       this rank's state to CPU memory (the stall the step sees) and writes it from a thread, over
       a process group of its own so that its collectives never interleave with training's.
    4. rank 0 publishes: manifest.json, the rename to step_S, fsync, keep_last pruning. Sync: after
       a barrier. Async: in rank 0's writer thread, as soon as DCP returns there: DCP's last step
       gathers every rank's write results to rank 0 before it writes .metadata, so by then every
       shard of every rank is on disk (and every extra file, written in phase 2 before it).
At most one save is in flight: the next save, and the end of the run, wait for the previous one.
A failed save (any rank) removes step_S.tmp, so the previous checkpoint stays the latest, and
raises `SaveFailed` (one line: the path, the error, the bytes the save needed and the bytes free)
on every rank; checkpoint.on_error=skip makes the loop warn and train on instead.
"""
from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import Future

import torch
import torch.distributed as dist

from trainer.datasets_io import one_line


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; its partial directory is gone (one line)."""


def local_state_bytes(*state_dicts: dict) -> int:
    """Bytes of this rank's shards of the tensors in these (nested) state dicts."""
    total = 0
    for sd in state_dicts:
        for value in sd.values():
            if isinstance(value, dict):
                total += local_state_bytes(value)
            elif isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def all_ok(ok: bool) -> bool:
    """True when every rank says ok (an all-reduce on the default group; one process: ok)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def total_bytes(local: int) -> int:
    """This save's bytes over all ranks (an all-reduce on the default group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    t = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def describe_error(error: BaseException | str) -> str:
    """One line for a failed write: DCP's CheckpointException gathers every rank's error and says
    only which ranks failed on its first line, so the underlying error (this rank's, else the
    first) is named instead."""
    if isinstance(error, str):
        return error
    failures = getattr(error, "failures", None)
    if failures:
        rank = dist.get_rank() if dist.is_initialized() else 0
        exc, _ = failures.get(rank) or next(iter(failures.values()))
        return f"{one_line(exc)} (on rank{'s' if len(failures) > 1 else ''} {', '.join(map(str, sorted(failures)))})"
    return one_line(error)


def failure_message(step: int, tmp: str, error: BaseException | str, needed: int) -> str:
    root = os.path.dirname(tmp)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = -1
    what = describe_error(error)
    return (f"checkpoint save of step {step} failed: {tmp}: {what}; it needs about {needed / 1e6:,.1f} MB, "
            f"{free / 1e6:,.1f} MB free; the partial save was removed and the previous checkpoint stays the latest")


_CKPT_GROUP = None


def checkpoint_group():
    """A gloo process group for the background writes (created once, collectively, at the first
    async save: every rank saves at the same steps)."""
    global _CKPT_GROUP
    if _CKPT_GROUP is None and dist.is_initialized() and dist.get_world_size() > 1:
        _CKPT_GROUP = dist.new_group(backend="gloo")
    return _CKPT_GROUP


class PendingSave:
    """A save whose shards are being written in the background (phase 3 and 4 of the module
    docstring); `wait()` returns the published directory or raises `SaveFailed`."""

    def __init__(self, step: int, tmp: str, final: str, future: Future, publish, is_main: bool, needed: int):
        self.step, self.tmp, self.final, self.needed = step, tmp, final, needed
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._finish, args=(future, publish, is_main),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _finish(self, future: Future, publish, is_main: bool) -> None:
        try:
            result = future.result()
            if hasattr(result, "upload_completion"):  # torch's AsyncSaveResponse: staging, then the upload
                result.upload_completion.result()
            if is_main:
                publish()
        except BaseException as e:  # noqa: BLE001 - reported by wait() on the main thread
            self._error = e
            if is_main:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> str:
        self._thread.join()
        # Every rank's future failed alike when any rank's write failed (DCP gathers the write
        # results), and rank 0 removed the directory; agree anyway, so that no rank trains on
        # while another stops.
        if not all_ok(self._error is None):
            error = self._error or "another rank's write failed"
            raise SaveFailed(failure_message(self.step, self.tmp, error, self.needed))
        return self.final
