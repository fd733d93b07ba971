"""Checks of the machine and inputs that run before any process is spawned."""
from __future__ import annotations

import os
import shutil
import tempfile

from trainer.config import Config, ConfigError

MIN_FREE_BYTES = 256 * 2**20  # room for a config, metrics and a few small checkpoints
# Config keys that set the shapes of the saved tensors: a checkpoint saved with other values cannot
# be resumed (mla_* only count for attention mla, the image keys only for DiTs; head_dim resolved).
SHAPE_KEYS = {
    "model": ("family", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "ffn_dim",
              "tie_embeddings", "attention", "qkv_bias", "attn_out_bias", "qk_norm"),
    "moe": ("num_experts", "expert_ffn_dim", "moe_every", "first_k_dense", "num_shared_experts",
            "shared_expert_ffn_dim", "shared_expert_gate", "aux_free", "layer_num_experts"),
    "peft": ("method", "lora_rank", "lora_targets", "perft_variant", "perft_num_adapters", "perft_rank"),
}
_MLA_KEYS = ("mla_q_lora_rank", "mla_kv_lora_rank", "mla_qk_nope_head_dim", "mla_qk_rope_head_dim", "mla_v_head_dim")
_DIT_KEYS = ("image_size", "patch_size", "in_channels", "num_classes", "learn_sigma")


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
    from trainer.checkpoint import checkpoint_problem

    if not os.path.isdir(path):
        raise ConfigError(f"--resume: checkpoint directory not found: {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(f"--resume: {path} is not a complete checkpoint: {problem}")
    from trainer.adapt.hf_bridge import is_weights_only

    if is_weights_only(path):
        raise ConfigError(f"--resume: {path} holds model weights only (no optimizer state, e.g. from import-hf); "
                          f"start a run from it with --set model.init_from={path}")


def _shape_values(section: str, values: dict) -> dict:
    keys = list(SHAPE_KEYS[section])
    if section == "model":
        keys += list(_MLA_KEYS) if values.get("attention") == "mla" else []
        keys += list(_DIT_KEYS) if values.get("family") == "dit" else []
    out = {k: values[k] for k in keys if k in values}
    if section == "model" and values.get("attention", "gqa") == "gqa" and values.get("num_heads"):
        out["head_dim"] = values.get("head_dim") or values.get("d_model", 0) // values["num_heads"]
    return out


def check_checkpoint_fits(cfg: Config, path: str, key: str) -> None:
    """The checkpoint that a run would resume from was saved by a model of this run's shape: else one
    line naming the first config key that differs (checked before any process starts, instead of
    a size-mismatch traceback from every rank)."""
    import yaml

    from trainer.config import config_to_dict

    try:
        with open(os.path.join(path, "config.yaml")) as f:
            saved = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return  # an older checkpoint without its config: loading will tell
    ours = config_to_dict(cfg)
    for section in SHAPE_KEYS:
        theirs, mine = _shape_values(section, saved.get(section) or {}), _shape_values(section, ours[section])
        for name, value in theirs.items():
            if name in mine and mine[name] != value:
                raise ConfigError(f"{key}: {path} was saved with {section}.{name}={value!r}, this run has "
                                  f"{section}.{name}={mine[name]!r}: it cannot resume (use another --run-dir)")


def check_deepspeed_installed(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{what}: DeepSpeed is not installed (pip install 'sparseforge[deepspeed]')")


def preflight(cfg: Config, run_dir: str, resume: str | None) -> None:
    if cfg.train.engine == "deepspeed":
        check_deepspeed_installed("train.engine=deepspeed")
    if cfg.model.family == "dit":
        from trainer.diffusion.image_data import preflight_image_data

        preflight_image_data(cfg.data)
    else:
        from trainer.lm.data import preflight_data

        preflight_data(cfg.data)
    check_resume(resume)
    check_run_dir(run_dir, checkpoint_size=checkpoint_bytes(cfg) if cfg.checkpoint.enabled else 0)
    if cfg.prune.method == "none":  # a prune run takes its shapes from its checkpoints
        from trainer.checkpoint import latest_checkpoint

        target = resume or latest_checkpoint(run_dir)
        if target is not None:
            check_checkpoint_fits(cfg, target, "--resume" if resume else "the run directory's latest checkpoint")
            # ZeRO's optimizer state (trainer/adapt/ds_engine.py) or ours: each engine resumes its own.
            written_by = "deepspeed" if os.path.isdir(os.path.join(target, "deepspeed")) else "native"
            if written_by != cfg.train.engine:
                raise ConfigError(f"{target}: written by train.engine={written_by}; resume it with "
                                  f"train.engine={written_by}")
    if cfg.model.upcycle_from and resume is None:
        from trainer.checkpoint import latest_checkpoint
        from trainer.adapt.upcycle import check_upcycle_source

        if latest_checkpoint(run_dir) is None:  # a resumed run no longer needs the dense source
            check_upcycle_source(cfg.model.upcycle_from, cfg)
    if cfg.prune.method != "none" and resume is None:
        from trainer.checkpoint import latest_checkpoint
        from trainer.adapt.prune import check_prune

        if latest_checkpoint(run_dir) is None:  # a rerun trains on from the compressed checkpoint
            check_prune(cfg)
    if cfg.model.init_from and resume is None:
        from trainer.checkpoint import latest_checkpoint
        from trainer.adapt.hf_bridge import check_init_source

        if latest_checkpoint(run_dir) is None:  # a resumed run no longer needs its source
            check_init_source(cfg.model.init_from)
    if cfg.peft.method != "none":  # also on resume: a PEFT checkpoint holds no base weights
        from trainer.adapt.peft import check_peft

        check_peft(cfg)
