"""Hugging Face checkpoints in, and `model.init_from` (the conversions are models/hf/; out:
trainer/adapt/hf_export.py; where a source is and what it holds: trainer/adapt/sources.py).

    import_hf(hf_dir, out)                 -> our checkpoint step_00000000 (DCP + config.yaml), no
                                              process group needed; streamed: one tensor at a time
                                              in memory, in the source's dtype
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

import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType

from models.hf.convert import Spec, check_hf_names, detect_expert_layout, hf_tensor, hf_to_ours, unused_hf_names
from models.hf.families import Family, HFFormatError
from trainer.adapt.sources import INIT_FROM, read_hf_config, resolve_checkpoint, split_source
from parallel.materialize import expert_offsets, local_part, share_of
from trainer.checkpoint import load_model_weights, write_weights_checkpoint
from trainer.checkpoint_files import is_complete
from trainer.config import Config, ConfigError, validate
from trainer.recipe import checkpoint_config

INDEX = "model.safetensors.index.json"
# safetensors' dtype names (the header's "dtype" field).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_open():
    try:
        import safetensors.torch  # noqa: F401 - lazy: only the hf extra has it
        from safetensors import safe_open
    except ImportError:
        raise ConfigError("Hugging Face checkpoints need the safetensors package: pip install sparseforge[hf]") from None
    return safe_open


# -- reading a Hugging Face directory -------------------------------------------------------------


class SafetensorsDir:
    """The tensors of a Hugging Face directory, read lazily by name: model.safetensors, or shards
    listed in model.safetensors.index.json (or every *.safetensors when there is no index)."""

    def __init__(self, hf_dir: str):
        safe_open = safetensors_open()
        self.hf_dir, self._files, self._open = hf_dir, {}, {}
        index = os.path.join(hf_dir, INDEX)
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

    def _file(self, name: str) -> str:
        file = self._files.get(name)
        if file is None:
            raise HFFormatError(f"{self.hf_dir}: tensor {name} is missing")
        return file

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name`, or only its dim-0 `rows` (read from the file as a slice).

        Each read opens the file afresh: safe_open maps the file, and the pages read through a
        mapping count as the process's memory until it is closed (a kept handle grows to the
        whole file as its tensors are read)."""
        with safetensors_open()(self._file(name), "pt") as handle:
            return handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]

    def read_meta(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """`read` on the meta device: the shape and dtype from the file's header, no data read
        (so the handles are kept: their mappings touch no tensor pages)."""
        file = self._file(name)
        if file not in self._open:
            self._open[file] = safetensors_open()(file, "pt")
        piece = self._open[file].get_slice(name)
        dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
        if dtype is None:
            raise HFFormatError(f"{self.hf_dir}: tensor {name} has dtype {piece.get_dtype()}, which we do not read")
        tensor = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
        return tensor if rows is None else tensor[rows]


def our_shapes(cfg: Config) -> dict[str, tuple]:
    """Name -> shape of our model's state dict, from a model built on the meta device."""
    import models

    with torch.device("meta"):
        model = models.build_model(cfg.model, cfg.moe)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def conversion_spec(family: Family, hf_cfg: dict, cfg: Config, expert_layout: str) -> Spec:
    m = cfg.model
    # DeepSeek's MLA RoPE pairs neighbouring channels: always in V2, unless rope_interleave=false in V3.
    interleave = (family.model_type == "deepseek_v2"
                  or family.model_type == "deepseek_v3" and bool(hf_cfg.get("rope_interleave", True)))
    if family.model_type == "gpt_oss":
        expert_layout = "fused"  # the only layout transformers reads and writes for gpt-oss
    return Spec(family.model_type, expert_layout, m.num_layers, rope_interleave=interleave,
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
    """Our state dict (CPU, the source's dtypes) of the Hugging Face model in `hf_dir`, for the
    model of `cfg`: the whole model in memory (import_hf streams instead)."""
    hf_cfg, family = read_hf_config(hf_dir)
    tensors = SafetensorsDir(hf_dir)
    layout = detect_expert_layout(tensors.names(), hf_dir)
    return hf_to_ours(our_shapes(cfg), tensors.names(), tensors.read, conversion_spec(family, hf_cfg, cfg, layout),
                      hf_dir, tied=cfg.model.tie_embeddings)


def has_tokenizer(hf_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


# -- our checkpoints ------------------------------------------------------------------------------


def write_checkpoint(out: str, cfg: Config, state: dict[str, torch.Tensor], provenance: dict,
                     planner=None) -> str:
    """Write `state` as checkpoint step_00000000 (model weights only); returns its path.

    `out` is that directory (named step_XXXXXXXX) or a folder to put step_00000000 in.
    `planner`: as for `trainer.checkpoint.write_weights_checkpoint` (a `PullPlanner`).
    """
    final = out if os.path.basename(out.rstrip("/")).startswith("step_") else os.path.join(out, "step_00000000")
    final = write_weights_checkpoint(final, cfg, state, {"step": 0, **provenance}, planner)
    assert is_complete(final), final
    return final


# -- init_from ------------------------------------------------------------------------------------


def check_init_source(source: str, key: str = INIT_FROM) -> None:
    """Launcher preflight of model.init_from: the directory, its format and family, its weights."""
    is_hf, path = split_source(source)
    if is_hf:
        try:
            read_hf_config(path)
            SafetensorsDir(path)
        except HFFormatError as e:
            raise ConfigError(f"{key}: {e}") from None
        return
    checkpoint_config(resolve_checkpoint(path, key), key)


@torch.no_grad()
def init_model_from(model: torch.nn.Module, source: str, key: str = INIT_FROM, cfg: Config | None = None,
                    mesh=None) -> str:
    """Overwrite every weight of this rank's share of a live model with `source`, reading only
    that share: tensor by tensor from a Hugging Face directory (only this rank's experts, only its
    FSDP shard kept), or through DCP from a checkpoint of ours.

    Args:
        model: this rank's module (the whole model, its expert / FSDP shards, or its pipeline
            stages), materialised.
        cfg: the run's config (default: the model's own model/moe sections).
        mesh: the run's mesh (None: one process). Collective for checkpoints of ours.
    Returns a one-line summary for the log; raises ConfigError on a mismatch.
    """
    is_hf, path = split_source(source)
    try:
        if is_hf:
            # A PEFT base fills the base tensors only: the adapters keep their initial values.
            names = load_hf_weights(model, path, cfg or Config(model=model.cfg, moe=model.moe_cfg),
                                    strict=key == INIT_FROM)
            what = f"Hugging Face {read_hf_config(path)[1].model_type} model"
        else:
            path = resolve_checkpoint(path, key)
            names, what = load_model_weights(path, model, mesh), "checkpoint"
    except (HFFormatError, ConfigError) as e:
        raise ConfigError(f"{key}: {str(e).removeprefix(key + ': ')}") from None
    return f"initialised from {what} {path} ({len(names)} tensors)"


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str, cfg: Config, strict: bool = True) -> list[str]:
    """Our tensors of this rank's share, converted one at a time from the Hugging Face model in
    `hf_dir` (peak memory: one tensor, or one tensor's local experts); returns their names.
    `strict` False: tensors the base model does not have (PEFT adapters) are left as they are."""
    hf_cfg, family = read_hf_config(hf_dir)
    tensors = SafetensorsDir(hf_dir)
    spec = conversion_spec(family, hf_cfg, cfg, detect_expert_layout(tensors.names(), hf_dir))
    shapes = our_shapes(cfg)
    if extra := unused_hf_names(shapes, tensors.names(), spec, tied=cfg.model.tie_embeddings):
        raise HFFormatError(f"{hf_dir}: {len(extra)} tensors have no place in our model, e.g. {extra[0]}")
    offsets = expert_offsets(model)
    names = []
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in shapes:
            if strict:
                raise HFFormatError(f"{hf_dir} does not fit this model: missing {name}")
            continue
        first = offsets.get(name)
        experts = None if first is None else range(first, first + t.shape[0])
        value = hf_tensor(name, shapes[name], tensors.read, spec, hf_dir, experts)
        local_part(t)[0].copy_(share_of(t, value, None))
        names.append(name)
    return names


# -- import ------------------------------------------------------------------------------


class PullPlanner(DefaultSavePlanner):
    """DCP's default save planner over a state dict of meta tensors (their shapes and dtypes
    plan the write); each tensor's data is made by `make(name)` when the writer comes to it, and
    dropped once written. One ordinary DCP checkpoint, one tensor in memory at a time."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        name = write_item.index.fqn.split(".", 1)[1]  # "model.<our name>", as DCP flattens it
        tensor, want = self._make(name), write_item.tensor_data
        if tuple(tensor.shape) != tuple(want.size) or tensor.dtype != want.properties.dtype:
            raise RuntimeError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(want.size)} "
                               f"{want.properties.dtype}")
        return tensor


def import_hf(hf_dir: str, out: str) -> str:
    """Convert the Hugging Face model in `hf_dir` into a checkpoint of ours; returns its directory.

    The checkpoint's config.yaml is the defaults with the model's architecture (and
    data.tokenizer = hf_dir when the directory has a tokenizer). Streamed: every name, shape and
    dtype is checked from the safetensors headers first (one-line errors, nothing written), then
    each of our tensors is read, converted and written in turn, in its source dtype (a bf16
    model stays bf16; readers cast to the model's dtype when they load). Peak memory: about two
    copies of our largest tensor (a layer's stacked experts), not the model.
    """
    cfg = hf_config(hf_dir)
    if has_tokenizer(hf_dir):
        cfg.data.tokenizer = os.path.abspath(hf_dir)
    hf_cfg, family = read_hf_config(hf_dir)
    tensors = SafetensorsDir(hf_dir)
    try:
        spec = conversion_spec(family, hf_cfg, cfg, detect_expert_layout(tensors.names(), hf_dir))
        shapes = our_shapes(cfg)
        check_hf_names(shapes, tensors.names(), spec, hf_dir, tied=cfg.model.tie_embeddings)
        # The conversion run on headers alone: every shape checked, every dtype known.
        planned = {key: hf_tensor(key, shape, tensors.read_meta, spec, hf_dir) for key, shape in shapes.items()}
    except HFFormatError as e:
        raise ConfigError(str(e)) from None
    planner = PullPlanner(lambda key: hf_tensor(key, shapes[key], tensors.read, spec, hf_dir))
    return write_checkpoint(out, cfg, planned, {"imported_from": os.path.abspath(hf_dir),
                                                "model_type": family.model_type}, planner)
