"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint:
    RUN_DIR/checkpoints/step_XXXXXXXX/
        .metadata, __*.distcp     model + optimizer (DCP; each rank writes its shards). Keys and
                                  shapes are the unsharded model's whatever the ep size: expert
                                  tensors [E, ...] are stored as row chunks, each expert once
                                  (parallel/checkpoint_adapter.py), and load onto any ep size
        extra_rank{R}.pt          per-rank state DCP does not hold: RNG, data position, scheduler
                                  (and `run_state`, e.g. the ESFT expert selection)
        config.yaml               the resolved config that produced it
Frozen parameters are never saved: they come from elsewhere (peft.base), so a PEFT checkpoint holds
only what is trained (adapters, their optimizer state) and is a small fraction of its base.
A checkpoint is written under `step_XXXXXXXX.tmp` and renamed once every rank has finished, so a
directory with the final name is always complete; a `.tmp` left by a crash is never loaded.
Before the rename rank 0 writes manifest.json (every file and its size, and the launch that wrote
it): a final-named directory that lost or truncated a file later (a disk filling up, a copy cut
short) is detected, skipped with a warning naming it, and the previous checkpoint is used.
"""
from __future__ import annotations

import os
import random
import json
import re
import shutil
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from parallel import ParallelMesh, barrier, unwrap
from parallel.checkpoint_adapter import from_checkpoint, to_checkpoint
from trainer.config import Config, save_config

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
# Set by the launcher (launch/spawn.py) for one `sparseforge run`; torchrun's restarts inherit it.
LAUNCH_ID_ENV = "SPARSEFORGE_LAUNCH_ID"
_warned: set[str] = set()


def _sd_options(model) -> StateDictOptions:
    """How `get_state_dict` / `set_state_dict` see a model and its optimizer.

    Optimizer state is flattened to one key per (parameter FQN, field), param-group settings
    included: a pipeline stage holds other parameters than its neighbours, and the nested format's
    list of param groups would be one object that every stage writes differently. Flat keys load
    onto any pp (and ep) layout, as torchtitan does. Frozen parameters are left out (a PEFT run's
    base, loaded from peft.base rather than from the run's own checkpoints) and loading then does
    not ask for them; a no-op for ordinary runs, where every parameter is trained.
    """
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=frozen, strict=not frozen)


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


def resume_point(run_dir: str, resume_from: str | None) -> str | None:
    """`choose_resume` decided by rank 0 and broadcast: ranks on other nodes were started by
    other launchers (other launch ids) and must load the same checkpoint."""
    choice = choose_resume(run_dir, resume_from)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    return choice


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _wrapped_extra(target, extra_state: dict | None, mesh: ParallelMesh) -> dict:
    """Shallow copies of the extra state dicts ({fqn: tensor} per name, e.g. the EMA weights) with
    expert shards wrapped as DTensors, like the model's own (parallel/checkpoint_adapter.py)."""
    out = {}
    for name, sd in (extra_state or {}).items():
        sd = dict(sd)
        to_checkpoint(target, sd, {}, mesh)
        out[name] = sd
    return out


def save_checkpoint(run_dir: str, step: int, model, optimizer, scheduler, data, cfg: Config,
                    mesh: ParallelMesh, extra_state: dict | None = None, run_state: dict | None = None,
                    engine=None) -> str:
    """Write step `step` atomically on every rank; returns the final directory.

    `extra_state`: more {parameter name: tensor} dicts saved beside the model under their own
    name (the DiT's EMA weights), sharded and resharded like the parameters.
    `run_state`: small picklable values saved in extra_rank{R}.pt (`read_run_state` reads them).
    `engine`: train.engine=deepspeed's (trainer/adapt/ds_engine.py): `optimizer` is then the optimizer of
    the parameters outside ZeRO (or ()), and ZeRO's partitioned state goes into a subdirectory.
    """
    final = os.path.join(checkpoint_root(run_dir), f"step_{step:08d}")
    tmp = final + ".tmp"
    # 1. rank 0 clears a stale temporary directory (a previous crash mid-save), all ranks wait.
    if mesh.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    # 2. every rank writes its DCP shards (collective: DCP plans the write across ranks).
    #    Expert shards go in as DTensors over the ep group: each expert is stored once.
    target = unwrap(model)
    model_sd, optim_sd = get_state_dict(target, optimizer, options=_sd_options(target))
    to_checkpoint(target, model_sd, optim_sd, mesh)
    dcp.save({"model": model_sd, "optim": optim_sd, **_wrapped_extra(target, extra_state, mesh)}, checkpoint_id=tmp)
    if engine is not None:  # collective: every rank writes its ZeRO partition
        engine.save(tmp)
    # 3. every rank writes the state that is its own.
    extra = {"step": step, "scheduler": scheduler.state_dict(), "data": data.state_dict(),
             "rng": _rng_state(), "world_size": mesh.world_size, "run_state": run_state or {}}
    torch.save(extra, os.path.join(tmp, f"extra_rank{mesh.rank}.pt"))
    if mesh.is_main:
        save_config(cfg, os.path.join(tmp, "config.yaml"))
    barrier()
    # 4. rank 0 lists what every rank wrote (the manifest: a file lost or cut short later is
    #    detected), publishes it with one rename, then prunes the oldest beyond keep_last.
    if mesh.is_main:
        _write_manifest(tmp, step)
        if os.path.isdir(final):  # re-saving the same step (a rerun): replace the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(os.path.dirname(final))
        _prune(run_dir, cfg.checkpoint.keep_last, just_saved=final)
    barrier()
    return final


def _write_manifest(tmp: str, step: int) -> None:
    """manifest.json of a checkpoint written to `tmp`: every file with its size (DCP shards of
    every rank included: checkpoints live on a file system all ranks share), and the launch."""
    files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))
             if os.path.isfile(os.path.join(tmp, name))}
    manifest = {"step": step, "launch_id": os.environ.get(LAUNCH_ID_ENV), "files": files}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _written_at(path: str) -> int:
    """When a checkpoint was published: its manifest's mtime (written just before the rename), or
    the directory's for a checkpoint from before manifests."""
    manifest = os.path.join(path, MANIFEST)
    return os.stat(manifest if os.path.isfile(manifest) else path).st_mtime_ns


def _prune(run_dir: str, keep_last: int, just_saved: str | None = None) -> None:
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


def load_checkpoint(path: str, model, optimizer, scheduler, data, mesh: ParallelMesh,
                    extra_state: dict | None = None, engine=None) -> int:
    """Restore everything a checkpoint holds into live objects; returns its step. The tensors of
    `extra_state` (as given to `save_checkpoint`) are overwritten in place. `engine`: as saved."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"not a complete checkpoint directory: {path} ({problem})")
    if engine is None and os.path.isdir(os.path.join(path, "deepspeed")):
        raise ValueError(f"{path}: written by train.engine=deepspeed (its optimizer state is ZeRO's); resume it "
                         f"with train.engine=deepspeed")
    target = unwrap(model)
    options = _sd_options(target)
    model_sd, optim_sd = get_state_dict(target, optimizer, options=options)
    # Expert shards are read as the rows of the experts this rank holds now, whatever the ep size
    # of the run that saved them.
    to_checkpoint(target, model_sd, optim_sd, mesh)
    extras = _wrapped_extra(target, extra_state, mesh)
    state = {"model": model_sd, "optim": optim_sd, **extras}
    dcp.load(state, checkpoint_id=path)
    for name, live in (extra_state or {}).items():
        for key, tensor in live.items():
            loaded = state[name][key]
            loaded = loaded.to_local() if hasattr(loaded, "to_local") else loaded
            if loaded is not tensor:
                tensor.copy_(loaded)
    from_checkpoint(state["model"], state["optim"])
    set_state_dict(target, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    if engine is not None:  # after the weights: ZeRO's fp32 master weights and moments (collective)
        engine.load(path)
    own = os.path.join(path, f"extra_rank{mesh.rank}.pt")
    same_layout = os.path.isfile(own)
    extra = torch.load(own if same_layout else os.path.join(path, "extra_rank0.pt"), weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    data.load_state_dict(extra["data"])
    if same_layout and extra.get("world_size") == mesh.world_size:
        _set_rng_state(extra["rng"])  # RNG streams are per rank: only meaningful on the same layout
    if dist.is_initialized():
        dist.barrier()
    return int(extra["step"])


def read_run_state(path: str) -> dict:
    """The `run_state` saved with checkpoint `path` (rank 0's copy; {} for older checkpoints)."""
    extra = torch.load(os.path.join(path, "extra_rank0.pt"), weights_only=False)
    return extra.get("run_state") or {}


def _model_metadata(reader: FileSystemReader, section: str = "model") -> dict[str, TensorStorageMetadata]:
    # save_checkpoint stores {"model": ..., "optim": ..., extra state...}; DCP flattens it to dotted keys.
    prefix = section + "."
    return {fqn[len(prefix):]: meta for fqn, meta in reader.read_metadata().state_dict_metadata.items()
            if fqn.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}


def model_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> global shape of every model tensor of checkpoint `path`, from its DCP metadata
    (no tensor is read; expert tensors have their unsharded [E, ...] shape)."""
    return {name: tuple(meta.size) for name, meta in _model_metadata(FileSystemReader(path)).items()}


def read_model_state(path: str, names=None, section: str = "model") -> dict[str, torch.Tensor]:
    """The model tensors of checkpoint `path` (those in `names`, default all) on the CPU, whole
    (expert tensors unsharded, whatever the ep size that saved them), without a process group.
    `section`: another state saved beside the model (`extra_state` of save_checkpoint, e.g. "ema").

    The tensors are allocated from the DCP metadata (stored shapes and dtypes), so no model is
    built; the optimizer state is not read. Every rank may call it on its own (no collectives).
    """
    reader = FileSystemReader(path)
    model_sd = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
                for name, meta in _model_metadata(reader, section).items() if names is None or name in names}
    if model_sd:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is the intent
            dcp.load({section: model_sd}, storage_reader=reader, no_dist=True)
    return model_sd
