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
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from parallel import ParallelMesh, barrier, unwrap
from parallel.checkpoint_adapter import from_checkpoint, to_checkpoint
from trainer.checkpoint_save import (PendingSave, SaveFailed, all_ok, checkpoint_group, failure_message,
                                     local_state_bytes, total_bytes)
from trainer.checkpoint_files import (checkpoint_problem, checkpoint_root, choose_resume, fsync_dir,
                                      prune_checkpoints, write_manifest)
from trainer.config import Config, ConfigError
from trainer.recipe import save_config


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
    expert shards wrapped as DTensors, like the model's own (parallel/checkpoint_adapter.py). The
    wrappers share the live tensors' storage: a load fills the live tensors in place."""
    out = {}
    for name, sd in (extra_state or {}).items():
        sd = dict(sd)
        to_checkpoint(target, sd, {}, mesh)
        out[name] = sd
    return out


def save_checkpoint(run_dir: str, step: int, model, optimizer, scheduler, data, cfg: Config,
                    mesh: ParallelMesh, extra_state: dict | None = None, run_state: dict | None = None,
                    engine=None, background: bool = False):
    """Write step `step` atomically on every rank (the phases: trainer/checkpoint_save.py); returns
    the final directory, or with `background` a `PendingSave` whose `wait()` returns it. A failed
    save raises `SaveFailed` on every rank, its partial directory removed.

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
    target = unwrap(model)
    model_sd, optim_sd = get_state_dict(target, optimizer, options=_sd_options(target))
    # Expert shards go in as DTensors over the ep group: each expert is stored once.
    to_checkpoint(target, model_sd, optim_sd, mesh)
    state = {"model": model_sd, "optim": optim_sd, **_wrapped_extra(target, extra_state, mesh)}
    needed = total_bytes(local_state_bytes(state))
    # 2. every rank writes the state that is its own, before any shard: a background write is
    #    then published only after these exist. All ranks agree that they succeeded.
    extra = {"step": step, "scheduler": scheduler.state_dict(), "data": data.state_dict(),
             "rng": _rng_state(), "world_size": mesh.world_size, "run_state": run_state or {}}
    error: BaseException | None = None
    try:
        torch.save(extra, os.path.join(tmp, f"extra_rank{mesh.rank}.pt"))
        if mesh.is_main:
            save_config(cfg, os.path.join(tmp, "config.yaml"))
    except Exception as e:  # noqa: BLE001 - a full disk or any I/O error: reported as one line below
        error = e
    if not all_ok(error is None):
        _fail(mesh, step, tmp, error or "another rank's write failed", needed)

    def publish() -> None:
        # 4. rank 0 lists what every rank wrote (the manifest: a file lost or cut short later is
        #    detected), publishes it with one rename, then prunes the oldest beyond keep_last.
        write_manifest(tmp, step)
        if os.path.isdir(final):  # re-saving the same step (a rerun): replace the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(os.path.dirname(final))
        prune_checkpoints(run_dir, cfg.checkpoint.keep_last, just_saved=final)

    # 3. the shards (collective: DCP plans the write across ranks).
    if background:
        future = dcp.async_save(state, checkpoint_id=tmp, process_group=checkpoint_group())
        return PendingSave(step, tmp, final, future, publish, mesh.is_main, needed)
    try:
        dcp.save(state, checkpoint_id=tmp)
        if engine is not None:  # collective: every rank writes its ZeRO partition
            engine.save(tmp)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises on every rank when any rank's write failed
        error = e
    if not all_ok(error is None):
        _fail(mesh, step, tmp, error or "another rank's write failed", needed)
    barrier()
    if mesh.is_main:
        publish()
    barrier()
    return final


def _fail(mesh: ParallelMesh, step: int, tmp: str, error, needed: int) -> None:
    """Remove the partial save (rank 0) and raise SaveFailed on every rank."""
    if mesh.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    raise SaveFailed(failure_message(step, tmp, error, needed))


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
    originals = to_checkpoint(target, model_sd, optim_sd, mesh)
    extras = _wrapped_extra(target, extra_state, mesh)
    state = {"model": model_sd, "optim": optim_sd, **extras}
    dcp.load(state, checkpoint_id=path)
    from_checkpoint(state["model"], state["optim"], originals)
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


def load_model_weights(path: str, model, mesh: ParallelMesh | None, section: str = "model",
                       names=None) -> list[str]:
    """Read the weights of checkpoint `path` into this rank's share of `model`, in place: only the
    rows and shards this rank holds are read (DCP reshards to any ep / pp / FSDP layout).

    Args:
        model: this rank's module (unwrapped or DDP), materialised.
        mesh: the run's mesh (None: one process).
        section: "model", or another state saved beside it ("ema": a DiT's EMA weights).
        names: which of the model's tensors to read (default: all it has); each must be stored.
    Returns:
        The names read. Collective: every rank of the job calls it.
    """
    target = unwrap(model)
    stored = {k: tuple(m.size) for k, m in _model_metadata(FileSystemReader(path), section).items()}
    sd = get_model_state_dict(target, options=StateDictOptions(ignore_frozen_params=False))
    wanted = set(sd) if names is None else set(names)
    if missing := sorted(wanted - set(stored)):
        raise ConfigError(f"{path} has no tensor {missing[0]}, which this model needs")
    sd = {k: v for k, v in sd.items() if k in wanted}
    originals = to_checkpoint(target, sd, {}, mesh) if mesh is not None else {}
    for key, value in sd.items():  # global shapes (expert and FSDP shards seen whole)
        if tuple(value.shape) != stored[key]:
            raise ConfigError(f"{key}: {path} has shape {list(stored[key])}, this model needs {list(value.shape)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: no_dist
        dcp.load({section: sd}, checkpoint_id=path, no_dist=not (dist.is_initialized() and dist.get_world_size() > 1))
    from_checkpoint(sd, {}, originals)
    set_model_state_dict(target, sd, options=StateDictOptions(strict=False))
    return sorted(sd)


def write_weights_checkpoint(final: str, cfg: Config, state: dict[str, torch.Tensor], extra: dict,
                             planner=None) -> str:
    """Write model weights alone as checkpoint directory `final` (step_XXXXXXXX) from one process
    without a process group, atomically (a .tmp directory, then one rename); returns `final`.

    Such a checkpoint (import-hf, merge-peft) loads as model.init_from, peft.base and export-hf;
    it holds no optimizer or data state, so --resume refuses it. `extra`: rank 0's extra state
    (at least "step"). `planner`: a DCP SavePlanner that makes the tensors while they are written
    (import-hf's: `state` then holds meta tensors, and one tensor at a time is in memory); it
    writes one file per tensor, because DCP keeps every tensor of a file until the file is done."""
    tmp = final.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is the intent
        writer = FileSystemWriter(tmp, single_file_per_rank=planner is None)
        dcp.save({"model": state}, storage_writer=writer, no_dist=True, planner=planner)
    torch.save({"world_size": 1, "run_state": {}, **extra}, os.path.join(tmp, "extra_rank0.pt"))
    save_config(cfg, os.path.join(tmp, "config.yaml"))
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def is_weights_only(path: str) -> bool:
    """True for a checkpoint without optimizer state (import-hf, merge-peft): it cannot resume."""
    keys = FileSystemReader(path).read_metadata().state_dict_metadata
    return not any(key.startswith("optim.") for key in keys)


def read_run_state(path: str) -> dict:
    """The `run_state` saved with checkpoint `path` (rank 0's copy; {} for older checkpoints)."""
    extra = torch.load(os.path.join(path, "extra_rank0.pt"), weights_only=False)
    return extra.get("run_state") or {}


def _model_metadata(reader: FileSystemReader, section: str = "model") -> dict[str, TensorStorageMetadata]:
    # save_checkpoint stores {"model": ..., "optim": ..., extra state...}; DCP flattens it to dotted keys.
    prefix = section + "."
    return {fqn[len(prefix):]: meta for fqn, meta in reader.read_metadata().state_dict_metadata.items()
            if fqn.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}


def check_stored_shapes(key: str, path: str, expected: dict[str, tuple[int, ...]], hint: str = "") -> None:
    """Checkpoint `path` holds exactly the tensors `expected` (name -> shape), by its DCP metadata
    (no tensor is read); else one ConfigError line naming `key`, the first tensor and `hint`."""
    stored = model_tensor_shapes(path)
    for name, shape in expected.items():
        if name not in stored:
            raise ConfigError(f"{key}: {path} has no tensor {name}, which this model needs{hint}")
        if stored[name] != shape:
            raise ConfigError(f"{key}: {name} is {list(stored[name])} in {path}, {list(shape)} in this model{hint}")
    if extra := sorted(set(stored) - set(expected)):
        raise ConfigError(f"{key}: {path} holds {extra[0]}, which this model does not have{hint}")


def stored_tensor_names(path: str, section: str = "model") -> list[str]:
    """Names of the tensors of `section` that checkpoint `path` holds (from its DCP metadata)."""
    return sorted(_model_metadata(FileSystemReader(path), section))


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
