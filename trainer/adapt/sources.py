"""Weight sources a run starts from (model.init_from, peft.base): where they are and what
architecture they hold. Files and YAML/JSON only, no torch: the recipe loader takes a source's
architecture keys from here, and the launcher's preflight checks the source before anything starts.

A source is "hf:DIR" (a Hugging Face model directory: config.json + *.safetensors of a supported
family) or a checkpoint directory of ours (step_XXXXXXXX, or a run directory: its latest
checkpoint). Reading their weights is trainer/adapt/hf_bridge.py.
"""
from __future__ import annotations

import json
import os

import yaml

from models.config import ConfigError
from models.hf.families import ARCH_KEYS, Family, HFFormatError, family_of
from trainer.checkpoint_files import is_complete, list_checkpoints

HF_PREFIX = "hf:"
INIT_FROM = "model.init_from"
_DIT_KEYS = ("image_size", "patch_size", "in_channels", "num_classes", "learn_sigma")  # init_from a DiT of ours


def split_source(source: str) -> tuple[bool, str]:
    """(is Hugging Face, path) of an init_from / peft.base value."""
    if source.startswith(HF_PREFIX):
        return True, os.path.expanduser(source[len(HF_PREFIX):])
    return False, os.path.expanduser(source)


def absolute_source(source: str) -> str:
    """The same source with an absolute path (ranks may start in another directory)."""
    is_hf, path = split_source(source)
    return (HF_PREFIX if is_hf else "") + os.path.abspath(path)


def read_hf_config(hf_dir: str) -> tuple[dict, Family]:
    """(config.json as a dict, its Family). Raises HFFormatError (one line) naming the file."""
    if not os.path.isdir(hf_dir):
        raise HFFormatError(f"Hugging Face directory not found: {hf_dir}")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        ours = os.path.isfile(os.path.join(hf_dir, ".metadata")) or os.path.isdir(os.path.join(hf_dir, "checkpoints"))
        hint = " (it is a checkpoint of ours: drop the hf: prefix)" if ours else ""
        raise HFFormatError(f"{hf_dir} is not a Hugging Face model directory: no config.json{hint}")
    try:
        with open(path) as f:
            hf_cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{path}: unreadable: {e}") from None
    return hf_cfg, family_of(hf_cfg, path)


def require_checkpoint(path: str, key: str) -> None:
    """`path` is a complete checkpoint directory of ours; else one ConfigError line naming `key`."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: checkpoint directory not found: {path}")
    if not is_complete(path):
        raise ConfigError(f"{key}: {path} is not a complete checkpoint (step_XXXXXXXX with .metadata)")


def resolve_checkpoint(path: str, key: str) -> str:
    """A complete step_XXXXXXXX directory: `path` itself, or the latest one in `path` (a run
    directory, or a folder of step directories). Raises ConfigError naming `key`."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: checkpoint directory not found: {path}")
    if is_complete(path):
        return path
    found = list_checkpoints(path) or [os.path.join(path, n) for n in sorted(os.listdir(path))
                                       if is_complete(os.path.join(path, n))]
    if found:
        return found[-1]
    hint = ""
    if os.path.isfile(os.path.join(path, "config.json")):  # a Hugging Face directory
        hint = f"; for a Hugging Face directory write hf:{path}" if key == INIT_FROM else " (a Hugging Face directory)"
    raise ConfigError(f"{key}: {path} is not a complete checkpoint of ours (step_XXXXXXXX with .metadata){hint}")


def saved_config(path: str, key: str) -> dict:
    """The config.yaml of checkpoint `path` as saved (a dict; trainer.recipe.load_config types it)."""
    config_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{key}: {path} has no config.yaml")
    try:
        with open(config_path) as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{key}: {config_path}: unreadable: {e}") from None
    return raw if isinstance(raw, dict) else {}


def check_full_model(path: str, key: str) -> None:
    """Checkpoint `path` holds a whole model: not the adapters of a PEFT run (full fine-tuning
    saves every weight, so it counts as whole)."""
    method = (saved_config(path, key).get("peft") or {}).get("method", "none")
    if method not in ("none", "full"):
        raise ConfigError(f"{key}: {path} is a PEFT checkpoint (peft.method {method}) holding only its "
                          f"adapters; merge it first: sparseforge merge-peft {path} --out DIR")


def source_architecture(source: str, key: str = INIT_FROM) -> dict:
    """{"model": ..., "moe": ...}: the architecture keys of `source`, merged over a recipe by the
    loader. {} when the source directory does not exist (a resumed run or a saved config no longer
    needs it; the launcher's preflight reports it for fresh runs). Raises ConfigError for a
    directory that exists but is not a usable source."""
    is_hf, path = split_source(source)
    if not os.path.isdir(path):
        return {}
    if is_hf:
        try:
            hf_cfg, family = read_hf_config(path)
            arch = family.to_ours(hf_cfg, os.path.join(path, "config.json"))
        except HFFormatError as e:
            raise ConfigError(f"{key}: {e}") from None
    else:
        saved = saved_config(resolve_checkpoint(path, key), key)
        model, moe = saved.get("model") or {}, saved.get("moe") or {}
        model_keys = ARCH_KEYS["model"] + (_DIT_KEYS if model.get("family") == "dit" else ())
        arch = {"model": {k: model[k] for k in model_keys if k in model},
                "moe": {k: moe[k] for k in ARCH_KEYS["moe"] if k in moe}}
    arch["model"]["preset"] = ""  # the recipe's preset no longer describes the model
    return arch
