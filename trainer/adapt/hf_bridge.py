"""Hugging Face checkpoints in and out, and `model.init_from` (the conversions are models/hf/).

    import_hf(hf_dir, out)                 -> our checkpoint step_00000000 (DCP + config.yaml), no
                                              process group needed
    export_hf(ckpt, out, ...)              -> config.json + safetensors (sharded, with an index, when
                                              over max_shard_bytes) that transformers loads
    source_architecture(source)            the model/moe keys of an init_from source (load_config)
    check_init_source(source)              launcher preflight of model.init_from (one-line errors)
    init_model_from(model, source)         fills a live model in place; returns a log line

Sources are "hf:DIR" (config.json + *.safetensors of a supported family, fused or per-expert
expert layout, one file or sharded with model.safetensors.index.json) or a checkpoint directory of
ours (step_XXXXXXXX, or a run directory: its latest checkpoint). Every rank reads the source
itself, so no collective is needed and every layout starts from the same weights.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from models.hf import (ARCH_KEYS, EXPERT_LAYOUTS, FAMILIES, Family, HFFormatError, Spec, detect_expert_layout,
                       family_of, hf_to_ours, infer_family, ours_to_hf)
from trainer.config import Config, ConfigError, load_config, save_config, validate

HF_PREFIX = "hf:"
_KEY = "model.init_from"
_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DIT_KEYS = ("image_size", "patch_size", "in_channels", "num_classes", "learn_sigma")  # init_from a DiT of ours


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401 - lazy: only the hf extra has it
        from safetensors import safe_open
    except ImportError:
        raise ConfigError("Hugging Face checkpoints need the safetensors package: pip install sparseforge[hf]") from None
    return safe_open


# -- reading a Hugging Face directory -------------------------------------------------------------


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


class SafetensorsDir:
    """The tensors of a Hugging Face directory, read lazily by name: model.safetensors, or shards
    listed in model.safetensors.index.json (or every *.safetensors when there is no index)."""

    def __init__(self, hf_dir: str):
        safe_open = _safetensors()
        self.hf_dir, self._files, self._open = hf_dir, {}, {}
        index = os.path.join(hf_dir, _INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
            return
        files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
        if not files:
            other = [n for n in os.listdir(hf_dir) if n.endswith((".bin", ".pt", ".pth"))]
            found = f" (found {other[0]}: convert it to safetensors first)" if other else ""
            raise HFFormatError(f"{hf_dir}: no *.safetensors weights{found}")
        for file in files:
            with safe_open(file, "pt") as handle:
                self._files.update({name: file for name in handle.keys()})

    def names(self) -> list[str]:
        return list(self._files)

    def read(self, name: str) -> torch.Tensor:
        file = self._files.get(name)
        if file is None:
            raise HFFormatError(f"{self.hf_dir}: tensor {name} is missing")
        if file not in self._open:
            self._open[file] = _safetensors()(file, "pt")
        return self._open[file].get_tensor(name)


def _our_shapes(cfg: Config) -> dict[str, tuple]:
    """Name -> shape of our model's state dict, from a model built on the meta device."""
    import models

    with torch.device("meta"):
        model = models.build_model(cfg.model, cfg.moe)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _spec(family: Family, hf_cfg: dict, cfg: Config, expert_layout: str) -> Spec:
    m = cfg.model
    return Spec(family.model_type, expert_layout, m.num_layers,
                rope_interleave=family.model_type == "deepseek_v3" and bool(hf_cfg.get("rope_interleave", True)),
                mla_nope=m.mla_qk_nope_head_dim, mla_rope=m.mla_qk_rope_head_dim, kv_lora_rank=m.mla_kv_lora_rank)


def hf_config(hf_dir: str) -> Config:
    """Our Config for the model in `hf_dir`: the defaults with the family's architecture keys
    (data.seq_len capped at its max_seq_len). Validated; raises ConfigError (one line)."""
    try:
        hf_cfg, family = read_hf_config(hf_dir)
        arch = family.to_ours(hf_cfg, os.path.join(hf_dir, "config.json"))
    except HFFormatError as e:
        raise ConfigError(str(e)) from None
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, **arch["model"])
    cfg.moe = dataclasses.replace(cfg.moe, **arch["moe"])
    if cfg.data.seq_len > cfg.model.max_seq_len:
        cfg.data = dataclasses.replace(cfg.data, seq_len=cfg.model.max_seq_len)
    validate(cfg)
    return cfg


def load_hf_state(hf_dir: str, cfg: Config) -> dict[str, torch.Tensor]:
    """Our state dict (fp32, CPU) of the Hugging Face model in `hf_dir`, for the model of `cfg`."""
    hf_cfg, family = read_hf_config(hf_dir)
    tensors = SafetensorsDir(hf_dir)
    layout = detect_expert_layout(tensors.names(), hf_dir)
    return hf_to_ours(_our_shapes(cfg), tensors.names(), tensors.read, _spec(family, hf_cfg, cfg, layout),
                      hf_dir, tied=cfg.model.tie_embeddings)


def has_tokenizer(hf_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


# -- our checkpoints ------------------------------------------------------------------------------


def resolve_checkpoint(path: str, key: str) -> str:
    """A complete step_XXXXXXXX directory: `path` itself, or the latest one in `path` (a run
    directory, or a folder of step directories). Raises ConfigError naming `key`."""
    from trainer.checkpoint import is_complete, list_checkpoints

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
        hint = f"; for a Hugging Face directory write hf:{path}" if key == _KEY else " (a Hugging Face directory)"
    raise ConfigError(f"{key}: {path} is not a complete checkpoint of ours (step_XXXXXXXX with .metadata){hint}")


def read_checkpoint_config(path: str, key: str) -> Config:
    config_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{key}: {path} has no config.yaml")
    try:
        return load_config(config_path)
    except ConfigError as e:
        raise ConfigError(f"{key}: {config_path}: {e}") from None


def read_model_state(path: str) -> dict[str, torch.Tensor]:
    """Every model tensor of our checkpoint `path`, whole, on the CPU, without a process group."""
    reader = FileSystemReader(path)
    state = {fqn[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for fqn, meta in reader.read_metadata().state_dict_metadata.items()
             if fqn.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is the intent
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return state


def is_weights_only(path: str) -> bool:
    """True for a checkpoint without optimizer state (import-hf writes those): it cannot resume."""
    keys = FileSystemReader(path).read_metadata().state_dict_metadata
    return not any(key.startswith("optim.") for key in keys)


def write_checkpoint(out: str, cfg: Config, state: dict[str, torch.Tensor], provenance: dict) -> str:
    """Write `state` as checkpoint step_00000000 (model weights only), atomically; returns its path.

    `out` is that directory (named step_XXXXXXXX) or a folder to put step_00000000 in. It loads
    with model.init_from, peft.base and export-hf; it holds no optimizer state, so it cannot be
    resumed with --resume.
    """
    from trainer.checkpoint import is_complete

    final = out if os.path.basename(out.rstrip("/")).startswith("step_") else os.path.join(out, "step_00000000")
    tmp = final.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": state}, checkpoint_id=tmp, no_dist=True)
    torch.save({"step": 0, "world_size": 1, "run_state": {}, **provenance}, os.path.join(tmp, "extra_rank0.pt"))
    save_config(cfg, os.path.join(tmp, "config.yaml"))
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    assert is_complete(final), final
    return final


# -- init_from ------------------------------------------------------------------------------------


def _split_source(source: str) -> tuple[bool, str]:
    """(is Hugging Face, path) of an init_from value."""
    if source.startswith(HF_PREFIX):
        return True, os.path.expanduser(source[len(HF_PREFIX):])
    return False, os.path.expanduser(source)


def absolute_source(source: str) -> str:
    """The same source with an absolute path (ranks may start in another directory)."""
    is_hf, path = _split_source(source)
    return (HF_PREFIX if is_hf else "") + os.path.abspath(path)


def source_architecture(source: str, key: str = _KEY) -> dict:
    """{"model": ..., "moe": ...}: the architecture keys of `source`, merged over a recipe by
    load_config. {} when the source directory does not exist (a resumed run or a saved config no
    longer needs it; the launcher's preflight reports it for fresh runs). Raises ConfigError for a
    directory that exists but is not a usable source."""
    is_hf, path = _split_source(source)
    if not os.path.isdir(path):
        return {}
    if is_hf:
        try:
            hf_cfg, family = read_hf_config(path)
            arch = family.to_ours(hf_cfg, os.path.join(path, "config.json"))
        except HFFormatError as e:
            raise ConfigError(f"{key}: {e}") from None
    else:
        ours = read_checkpoint_config(resolve_checkpoint(path, key), key)
        keys = {"model": ARCH_KEYS["model"] + (_DIT_KEYS if ours.model.family == "dit" else ()), "moe": ARCH_KEYS["moe"]}
        arch = {section: {k: getattr(getattr(ours, section), k) for k in names} for section, names in keys.items()}
    arch["model"]["preset"] = ""  # the recipe's preset no longer describes the model
    return arch


def check_init_source(source: str, key: str = _KEY) -> None:
    """Launcher preflight of model.init_from: the directory, its format and family, its weights."""
    is_hf, path = _split_source(source)
    if is_hf:
        try:
            read_hf_config(path)
            SafetensorsDir(path)
        except HFFormatError as e:
            raise ConfigError(f"{key}: {e}") from None
        return
    read_checkpoint_config(resolve_checkpoint(path, key), key)


@torch.no_grad()
def init_model_from(model: torch.nn.Module, source: str, key: str = _KEY) -> str:
    """Overwrite every weight of a live model (unwrapped, not yet parallelised) with `source`.

    Returns a one-line summary for the log; raises ConfigError on a mismatch.
    """
    is_hf, path = _split_source(source)
    try:
        if is_hf:
            state = load_hf_state(path, Config(model=model.cfg, moe=model.moe_cfg))
            what = f"Hugging Face {read_hf_config(path)[1].model_type} model"
        else:
            path = resolve_checkpoint(path, key)
            state, what = read_model_state(path), "checkpoint"
        missing, unexpected = model.load_state_dict(state, strict=False)
    except HFFormatError as e:
        raise ConfigError(f"{key}: {e}") from None
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise ConfigError(f"{key}: {path} does not fit this model: {'missing' if missing else 'unexpected'} "
                          f"{', '.join(names)}{' ...' if len(missing or unexpected) > 3 else ''}")
    return f"initialised from {what} {path} ({len(state)} tensors)"


# -- import / export ------------------------------------------------------------------------------


def import_hf(hf_dir: str, out: str) -> str:
    """Convert the Hugging Face model in `hf_dir` into a checkpoint of ours; returns its directory.

    The checkpoint's config.yaml is the defaults with the model's architecture (and
    data.tokenizer = hf_dir when the directory has a tokenizer).
    """
    cfg = hf_config(hf_dir)
    if has_tokenizer(hf_dir):
        cfg.data.tokenizer = os.path.abspath(hf_dir)
    try:
        state = load_hf_state(hf_dir, cfg)
    except HFFormatError as e:
        raise ConfigError(str(e)) from None
    model_type = read_hf_config(hf_dir)[1].model_type
    return write_checkpoint(out, cfg, state, {"imported_from": os.path.abspath(hf_dir), "model_type": model_type})


def export_hf(ckpt: str, out: str, model_type: str | None = None, expert_layout: str = "per_expert",
              dtype: str = "fp32", max_shard_bytes: int = 5 * 2**30) -> tuple[str, list[str]]:
    """Write our checkpoint `ckpt` as a Hugging Face model directory `out`.

    Args:
        ckpt: a step_XXXXXXXX directory (or a run directory: its latest checkpoint).
        model_type: the family to write; default: the first that expresses the model exactly.
        expert_layout: "per_expert" (what save_pretrained writes; transformers 4.x and 5.x read it)
            or "fused" (transformers 5's in-memory layout; 5.x reads it).
        dtype: fp32 | bf16 | fp16 for the weights (the e_score_correction_bias stays fp32).
        max_shard_bytes: larger models are split into shards with model.safetensors.index.json.

    Returns:
        (the family's model_type, the files written).
    """
    path = resolve_checkpoint(ckpt, "export-hf")
    cfg = read_checkpoint_config(path, "export-hf")
    if cfg.model.family != "llm":
        raise ConfigError(f"export-hf: {path} holds a {cfg.model.family} model (model.family); only LLMs export")
    if expert_layout not in EXPERT_LAYOUTS:
        raise ConfigError(f"export-hf: expert layout {expert_layout!r} is not one of {', '.join(EXPERT_LAYOUTS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"export-hf: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        if model_type is None:
            family = infer_family(cfg.model, cfg.moe)
        else:
            if model_type not in FAMILIES:
                raise HFFormatError(f"model type {model_type!r} is not one of {', '.join(FAMILIES)}")
            family = FAMILIES[model_type]
            family.check(cfg.model, cfg.moe)
    except HFFormatError as e:
        raise ConfigError(f"export-hf: {e}") from None
    state = read_model_state(path)
    if cfg.model.tie_embeddings:
        state.pop("output.weight", None)
    hf_cfg = family.to_hf(cfg.model, cfg.moe)
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = _DTYPE_NAMES[DTYPES[dtype]]
    spec = _spec(family, hf_cfg, cfg, expert_layout)
    tensors = ((name, _cast(name, t, DTYPES[dtype])) for name, t in ours_to_hf(_with_bias(state, family, cfg), spec))
    os.makedirs(out, exist_ok=True)
    files = write_safetensors(out, tensors, max_shard_bytes)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    files.append("config.json")
    tok = cfg.data.tokenizer
    if tok != "byte" and os.path.isdir(tok):  # the tokenizer the model was trained with
        for name in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok, name)):
                shutil.copy(os.path.join(tok, name), os.path.join(out, name))
                files.append(name)
    return family.model_type, files


def _with_bias(state: dict, family: Family, cfg: Config) -> dict:
    """DeepSeek-V3 always has e_score_correction_bias; a model without the aux-free bias gets zeros."""
    if family.model_type != "deepseek_v3" or cfg.moe.aux_free:
        return state
    state = dict(state)
    for key in [k for k in state if k.endswith(".ffn.router.gate.weight")]:
        state[key.replace("gate.weight", "expert_bias_E")] = torch.zeros(state[key].shape[0])
    return state


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    keep_fp32 = name.endswith("e_score_correction_bias")  # transformers keeps it in fp32
    return tensor.to(torch.float32 if keep_fp32 else dtype).contiguous()


def write_safetensors(out: str, tensors, max_shard_bytes: int) -> list[str]:
    """Write (name, tensor) pairs as model.safetensors, or as model-0000i-of-0000n.safetensors
    shards of at most `max_shard_bytes` (a larger single tensor gets a shard of its own) with
    model.safetensors.index.json. Returns the file names."""
    from safetensors.torch import save_file

    _safetensors()
    shards, current, size, total, weight_map = [], {}, 0, 0, {}

    def flush():
        nonlocal current, size
        if current:
            part = f".part{len(shards)}.safetensors"
            save_file(current, os.path.join(out, part), metadata={"format": "pt"})
            shards.append((part, list(current)))
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    for stale in glob.glob(os.path.join(out, "model*.safetensors")) + glob.glob(os.path.join(out, _INDEX)):
        os.remove(stale)  # a previous export into the same directory
    if len(shards) == 1:
        os.replace(os.path.join(out, shards[0][0]), os.path.join(out, "model.safetensors"))
        return ["model.safetensors"]
    files = []
    for i, (part, names) in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(out, part), os.path.join(out, file))
        weight_map.update({n: file for n in names})
        files.append(file)
    with open(os.path.join(out, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [_INDEX]
