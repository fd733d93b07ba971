"""Checks of the machine and inputs that run before any process is spawned."""
from __future__ import annotations

import os
import shutil
import tempfile

from models.config import shape_fields
from parallel.config import CPU_OFFLOAD_ON_CPU
from trainer.adapt.config import peft_shape_fields
from trainer.checkpoint_files import checkpoint_problem, latest_checkpoint
from trainer.config import Config, ConfigError
from trainer.recipe import load_config

MIN_FREE_BYTES = 256 * 2**20  # room for a config, metrics and a few small checkpoints


def checkpoint_bytes(cfg: Config) -> int:
    """Estimated size of one checkpoint: fp32 weights and AdamW's two moments (and the DiT's EMA).
    PEFT checkpoints hold the adapters only: not estimated (0)."""
    if cfg.peft.method not in ("none", "full"):
        return 0
    from launch.plan import param_counts

    total, _ = param_counts(cfg)
    return total * (16 if cfg.model.family == "dit" else 12)


def check_run_dir(run_dir: str, min_free_bytes: int = MIN_FREE_BYTES, checkpoint_size: int = 0) -> None:
    """Writable, and room for the larger of `min_free_bytes` and two checkpoints (a save writes the
    new one beside the previous, which is deleted only after the new one is complete)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable: {e.strerror}") from None
    free = shutil.disk_usage(run_dir).free
    needed = max(min_free_bytes, 2 * checkpoint_size)
    if free < needed:
        why = f"; a checkpoint of this model takes ~{checkpoint_size / 2**20:.0f} MiB and a save needs room for two" \
            if needed > min_free_bytes else ""
        raise ConfigError(f"run directory {run_dir} has only {free / 2**20:.0f} MiB free "
                          f"(needs at least {needed / 2**20:.0f} MiB{why})")


def check_resume(path: str | None) -> None:
    if path is None:
        return
    if not os.path.isdir(path):
        raise ConfigError(f"--resume: checkpoint directory not found: {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"--resume: {path} is not a complete checkpoint: {problem}")
    from trainer.checkpoint import is_weights_only

    if is_weights_only(path):
        raise ConfigError(f"--resume: {path} holds model weights only (no optimizer state, e.g. from import-hf); "
                          f"start a run from it with --set model.init_from={path}")


def _shapes(cfg: Config) -> dict[str, object]:
    return {**shape_fields(cfg.model, cfg.moe), **peft_shape_fields(cfg.peft)}


def check_checkpoint_fits(cfg: Config, path: str, key: str) -> None:
    """The checkpoint that a run would resume from was saved by a model of this run's shape: else one
    line naming the first config key that differs (checked before any process starts, instead of
    a size-mismatch traceback from every rank)."""
    try:
        saved = load_config(os.path.join(path, "config.yaml"))
    except ConfigError:
        return  # an older or unreadable config: loading will tell
    theirs, mine = _shapes(saved), _shapes(cfg)
    for name, value in theirs.items():
        if name in mine and mine[name] != value:
            raise ConfigError(f"{key}: {path} was saved with {name}={value!r}, this run has "
                              f"{name}={mine[name]!r}: it cannot resume (use another --run-dir)")


def check_deepspeed_installed(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{what}: DeepSpeed is not installed (pip install 'sparseforge[deepspeed]')")


def starts_fresh(run_dir: str, resume: str | None) -> bool:
    """No checkpoint to continue from: the run reads its weight sources."""
    return resume is None and latest_checkpoint(run_dir) is None


def check_sources(cfg: Config, fresh: bool = True) -> None:
    """The checkpoints and directories a recipe starts from (one line each, naming the key): a
    fresh run's model.upcycle_from, prune checkpoints and model.init_from; peft.base always (a
    PEFT checkpoint holds no base weights). These read config files and DCP metadata, no tensor."""
    if fresh and cfg.model.upcycle_from:
        from trainer.adapt.upcycle import check_upcycle_source

        check_upcycle_source(cfg.model.upcycle_from, cfg)
    if fresh and cfg.prune.method != "none":
        from trainer.adapt.prune import preflight_prune

        preflight_prune(cfg)
    if fresh and cfg.model.init_from:
        from trainer.adapt.hf_bridge import check_init_source

        check_init_source(cfg.model.init_from)
    if cfg.peft.method != "none":
        from trainer.adapt.peft import preflight_peft

        preflight_peft(cfg)
    if fresh and cfg.peft.init_adapter:  # rank, targets, shapes against the run's LoRA: one line
        from trainer.adapt.peft_interop import adapter_state

        adapter_state(cfg.peft.init_adapter, cfg)


def preflight(cfg: Config, run_dir: str, resume: str | None) -> None:
    """The machine, the data and the run directory, before any process is spawned (the weight
    sources: `check_sources`)."""
    if cfg.train.engine == "deepspeed":
        check_deepspeed_installed("train.engine=deepspeed")
    if cfg.parallel.fsdp_cpu_offload and cfg.train.device == "auto":
        import torch

        if not torch.cuda.is_available():  # auto resolves to the CPU (parallel.mesh.pick_device)
            raise ConfigError(CPU_OFFLOAD_ON_CPU)
    if cfg.model.family == "dit":
        from trainer.diffusion.image_source import preflight_image_data

        preflight_image_data(cfg.data, cfg.model)
    else:
        from trainer.lm.corpus import preflight_data

        preflight_data(cfg.data, cfg.model.vocab_size)
    check_resume(resume)
    check_run_dir(run_dir, checkpoint_size=checkpoint_bytes(cfg) if cfg.checkpoint.enabled else 0)
    target = resume or latest_checkpoint(run_dir)
    if target is not None and cfg.prune.method == "none":  # a prune run takes its shapes from its checkpoints
        check_checkpoint_fits(cfg, target, "--resume" if resume else "the run directory's latest checkpoint")
        # ZeRO's optimizer state (trainer/adapt/ds_engine.py) or ours: each engine resumes its own.
        written_by = "deepspeed" if os.path.isdir(os.path.join(target, "deepspeed")) else "native"
        if written_by != cfg.train.engine:
            raise ConfigError(f"{target}: written by train.engine={written_by}; resume it with "
                              f"train.engine={written_by}")
