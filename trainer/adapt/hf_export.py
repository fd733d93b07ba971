"""Our checkpoints out as Hugging Face model directories (`sparseforge export-hf`).

    export_hf(ckpt, out, ...)   -> config.json + safetensors (sharded, with an index, when over
                                   max_shard_bytes) that transformers loads

Streamed: the export's layout (names, shapes, dtypes, shards) is worked out from the DCP metadata
on the meta device; then each of our tensors is read through DCP when the conversion needs it
(whole, however many ranks wrote its shards), and each HF tensor goes straight into its shard
file, whose header was written first. Peak memory: a few copies of our largest tensor.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct
import warnings
from collections import ChainMap
from collections.abc import Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from models.hf.convert import EXPERT_LAYOUTS, ours_to_hf
from models.hf.families import FAMILIES, Family, HFFormatError, infer_family
from trainer.adapt.hf_bridge import INDEX, SAFETENSORS_DTYPES, conversion_spec, our_shapes, safetensors_open
from trainer.adapt.sources import resolve_checkpoint
from trainer.config import Config, ConfigError
from trainer.recipe import checkpoint_config

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# "auto": each tensor as the checkpoint stores it (fp32 for a training run, bf16 from a bf16 import).
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def export_hf(ckpt: str, out: str, model_type: str | None = None, expert_layout: str = "per_expert",
              dtype: str = "auto", max_shard_bytes: int = 5 * 2**30) -> tuple[str, list[str]]:
    """Write our checkpoint `ckpt` as a Hugging Face model directory `out`.

    Args:
        ckpt: a step_XXXXXXXX directory (or a run directory: its latest checkpoint), written by
            one process or by the ranks of a sharded run (ep, FSDP): read one tensor at a time.
        model_type: the family to write; default: the first that expresses the model exactly.
        expert_layout: "per_expert" (what save_pretrained writes; transformers 4.x and 5.x read it)
            or "fused" (transformers 5's in-memory layout; 5.x reads it).
        dtype: auto (each tensor's stored dtype) | fp32 | bf16 | fp16 for the weights (the
            e_score_correction_bias stays fp32).
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
    # In our model's order (embeddings, layer by layer), whichever ranks wrote the checkpoint.
    stored = StoredTensors(path, order=list(our_shapes(cfg)),
                           skip=("output.weight",) if cfg.model.tie_embeddings else ())
    hf_cfg = family.to_hf(cfg.model, cfg.moe)
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = _DTYPE_NAMES.get(DTYPES[dtype] or stored.main_dtype(), "float32")
    spec = conversion_spec(family, hf_cfg, cfg, expert_layout)

    def tensors(meta: bool):
        state = _with_bias(stored.meta if meta else stored, stored.meta, family, cfg)
        return ((name, _cast(name, t, DTYPES[dtype])) for name, t in ours_to_hf(state, spec))

    os.makedirs(out, exist_ok=True)
    layout = [(name, tuple(t.shape), t.dtype) for name, t in tensors(meta=True)]
    files = write_safetensors(out, layout, tensors(meta=False), max_shard_bytes)
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


class StoredTensors(Mapping):
    """The model tensors of checkpoint `path` by name, each read through DCP when looked up (whole:
    expert rows and FSDP shards from every rank's file) and not kept, so only the tensors in use
    are in memory. `meta`: every tensor on the meta device (shapes and dtypes, nothing read).
    `order`: names in the order to iterate (others follow, sorted); `skip`: names left out (a
    tied output.weight)."""

    def __init__(self, path: str, order=(), skip=()):
        self._reader = _MetadataOnce(path)
        stored = {fqn[len("model."):]: m for fqn, m in self._reader.read_metadata().state_dict_metadata.items()
                  if fqn.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        rank = {name: i for i, name in enumerate(order)}
        names = sorted((n for n in stored if n not in skip), key=lambda n: (rank.get(n, len(rank)), n))
        self.meta = {n: torch.empty(stored[n].size, dtype=stored[n].properties.dtype, device="meta") for n in names}

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = torch.empty_like(self.meta[name], device="cpu")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is the intent
            dcp.load({"model": {name: tensor}}, storage_reader=self._reader, no_dist=True)
        return tensor

    def __iter__(self):
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)

    def main_dtype(self) -> torch.dtype:
        """The dtype holding the most bytes (config.json's torch_dtype under --dtype auto)."""
        size: dict = {}
        for t in self.meta.values():
            size[t.dtype] = size.get(t.dtype, 0) + t.numel() * t.element_size()
        return max(size, key=size.get)


class _MetadataOnce(FileSystemReader):
    """A FileSystemReader that unpickles .metadata once, not on every one-tensor load."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


def _with_bias(state: Mapping, meta: dict, family: Family, cfg: Config) -> Mapping:
    """DeepSeek-V3, GLM-4.5 and dots1 always have e_score_correction_bias; a model without the
    aux-free bias gets zeros (on the meta device when `state` is `meta`)."""
    if family.model_type not in ("deepseek_v3", "glm4_moe", "dots1") or cfg.moe.aux_free:
        return state
    device = "meta" if state is meta else "cpu"
    zeros = {key.replace("gate.weight", "expert_bias_E"): torch.zeros(meta[key].shape[0], device=device)
             for key in meta if key.endswith(".ffn.router.gate.weight")}
    return ChainMap(zeros, state)  # iterates state's keys first, then the biases


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    keep_fp32 = name.endswith("e_score_correction_bias")  # transformers keeps it in fp32
    if keep_fp32 or dtype is not None:
        tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
    return tensor.contiguous()


def write_safetensors(out: str, layout: list[tuple], tensors, max_shard_bytes: int) -> list[str]:
    """Write the (name, tensor) pairs of `tensors`, which follow `layout` [(name, shape, dtype)],
    as model.safetensors, or as model-0000i-of-0000n.safetensors shards of at most
    `max_shard_bytes` (a larger single tensor gets a shard of its own) with
    model.safetensors.index.json. Each tensor goes to its file as it comes (nothing is buffered).
    Returns the file names."""
    safetensors_open()  # the hf extra is installed, or one line saying so
    shards, size, total = [[]], 0, 0
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
        total += nbytes
    tensors = iter(tensors)
    parts = [f".part{i}.safetensors" for i in range(len(shards))]
    for part, entries in zip(parts, shards):
        _write_shard(os.path.join(out, part), entries, tensors)
    if next(tensors, None) is not None:
        raise RuntimeError("export-hf: more tensors than planned")
    for stale in glob.glob(os.path.join(out, "model*.safetensors")) + glob.glob(os.path.join(out, INDEX)):
        os.remove(stale)  # a previous export into the same directory
    if len(shards) == 1:
        os.replace(os.path.join(out, parts[0]), os.path.join(out, "model.safetensors"))
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, (part, entries) in enumerate(zip(parts, shards)):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(out, part), os.path.join(out, file))
        weight_map.update({name: file for name, _, _ in entries})
        files.append(file)
    with open(os.path.join(out, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + [INDEX]


def _write_shard(path: str, entries: list[tuple], tensors) -> None:
    """One safetensors file: an 8-byte little-endian header length, the JSON header (names, dtypes,
    shapes, byte offsets; padded to 8 bytes as safetensors does), then each tensor's bytes in
    order, taken from `tensors` one at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype in entries:
            got, tensor = next(tensors)
            if got != name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise RuntimeError(f"export-hf: {got} {tuple(tensor.shape)} {tensor.dtype} came where {name} "
                                   f"{shape} {dtype} was planned")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
