"""Our checkpoints out as Hugging Face model directories (`sparseforge export-hf`).

    export_hf(ckpt, out, ...)   -> config.json + safetensors (sharded, with an index, when over
                                   max_shard_bytes) that transformers loads
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import torch

from models.hf.convert import EXPERT_LAYOUTS, ours_to_hf
from models.hf.families import FAMILIES, Family, HFFormatError, infer_family
from trainer.adapt.hf_bridge import INDEX, conversion_spec, safetensors_open
from trainer.adapt.sources import resolve_checkpoint
from trainer.checkpoint import read_model_state
from trainer.config import Config, ConfigError
from trainer.recipe import checkpoint_config

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


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
    cfg = checkpoint_config(path, "export-hf")
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
    spec = conversion_spec(family, hf_cfg, cfg, expert_layout)
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
    """DeepSeek-V3, GLM-4.5 and dots1 always have e_score_correction_bias; a model without the
    aux-free bias gets zeros."""
    if family.model_type not in ("deepseek_v3", "glm4_moe", "dots1") or cfg.moe.aux_free:
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

    safetensors_open()  # the hf extra is installed, or one line saying so
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
    for stale in glob.glob(os.path.join(out, "model*.safetensors")) + glob.glob(os.path.join(out, INDEX)):
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
    with open(os.path.join(out, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX]
