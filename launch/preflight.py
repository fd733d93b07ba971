"""Checks of the machine and inputs that run before any process is spawned."""
from __future__ import annotations

import os
import shutil
import tempfile

from trainer.config import Config, ConfigError

MIN_FREE_BYTES = 256 * 2**20  # room for a config, metrics and a few small checkpoints


def check_run_dir(run_dir: str, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write_test"):
            pass
    except OSError as e:
        raise ConfigError(f"run directory {run_dir} is not writable: {e.strerror}") from None
    free = shutil.disk_usage(run_dir).free
    if free < min_free_bytes:
        raise ConfigError(f"run directory {run_dir} has only {free / 2**20:.0f} MiB free "
                          f"(needs at least {min_free_bytes / 2**20:.0f} MiB)")


def check_resume(path: str | None) -> None:
    if path is None:
        return
    from trainer.checkpoint import is_complete

    if not os.path.isdir(path):
        raise ConfigError(f"--resume: checkpoint directory not found: {path}")
    if not is_complete(path):
        raise ConfigError(f"--resume: {path} is not a complete checkpoint (step_XXXXXXXX with .metadata)")
    from trainer.hf_checkpoint import is_weights_only

    if is_weights_only(path):
        raise ConfigError(f"--resume: {path} holds model weights only (no optimizer state, e.g. from import-hf); "
                          f"start a run from it with --set model.init_from={path}")


def preflight(cfg: Config, run_dir: str, resume: str | None) -> None:
    if cfg.model.family == "dit":
        from trainer.image_data import preflight_image_data

        preflight_image_data(cfg.data)
    else:
        from trainer.data import preflight_data

        preflight_data(cfg.data)
    check_resume(resume)
    check_run_dir(run_dir)
    if cfg.model.upcycle_from and resume is None:
        from trainer.checkpoint import latest_checkpoint
        from trainer.upcycle import check_upcycle_source

        if latest_checkpoint(run_dir) is None:  # a resumed run no longer needs the dense source
            check_upcycle_source(cfg.model.upcycle_from, cfg)
    if cfg.prune.method != "none" and resume is None:
        from trainer.checkpoint import latest_checkpoint
        from trainer.prune import check_prune

        if latest_checkpoint(run_dir) is None:  # a rerun trains on from the compressed checkpoint
            check_prune(cfg)
    if cfg.model.init_from and resume is None:
        from trainer.checkpoint import latest_checkpoint
        from trainer.hf_checkpoint import check_init_source

        if latest_checkpoint(run_dir) is None:  # a resumed run no longer needs its source
            check_init_source(cfg.model.init_from)
    if cfg.peft.method != "none":  # also on resume: a PEFT checkpoint holds no base weights
        from trainer.peft import check_peft

        check_peft(cfg)
