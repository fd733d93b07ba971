"""Upcycling from a dense checkpoint of ours (`model.upcycle_from`): the I/O around
`models.moe.upcycle.upcycle_state_dict`.

    check_upcycle_source(path, cfg)      launcher preflight: config.yaml only, raises ConfigError
    load_dense_checkpoint(path)          (dense Config, CPU state dict), no process group needed
    upcycle_into(model, path, ...)       fills a live MoE model in place; returns a log line

Every rank reads the checkpoint itself (no collectives) and draws the router init from the
same seeded generator, so all ranks end with identical weights without a broadcast.
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import moe_layer_ids
from models.moe.upcycle import UpcycleError, upcycle_state_dict
from parallel import unwrap
from trainer.adapt.sources import resolve_checkpoint
from trainer.checkpoint import read_model_state
from trainer.config import Config, ConfigError
from trainer.recipe import checkpoint_config

_KEY = "model.upcycle_from"


def _read_dense_config(path: str) -> Config:
    dense = checkpoint_config(resolve_checkpoint(path, _KEY), _KEY)
    if dense.moe.num_experts > 0:
        raise ConfigError(f"{_KEY}: {path} is an MoE checkpoint (moe.num_experts={dense.moe.num_experts}); "
                          "upcycling starts from a dense one")
    return dense


def _compare(dense: Config, cfg: Config) -> None:
    """Raise on the first shape the MoE config cannot take from the dense checkpoint."""
    dm, m = dense.model, cfg.model
    same = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "tie_embeddings")
    for name in same:
        if getattr(dm, name) != getattr(m, name):
            raise ConfigError(f"model.{name}: the dense checkpoint has {getattr(dm, name)}, "
                              f"this model has {getattr(m, name)}")
    dense_head, head = dm.resolved_head_dim, m.resolved_head_dim
    if dense_head != head:
        raise ConfigError(f"model.head_dim: the dense checkpoint has {dense_head}, this model has {head}")
    G = m.upcycle_granularity
    if cfg.moe.expert_ffn_dim * G != dm.ffn_dim:
        raise ConfigError(f"moe.expert_ffn_dim: {cfg.moe.expert_ffn_dim} × model.upcycle_granularity {G} "
                          f"does not match the dense checkpoint's model.ffn_dim={dm.ffn_dim}")
    has_dense_layers = len(moe_layer_ids(m, cfg.moe)) < m.num_layers
    if has_dense_layers and m.ffn_dim != dm.ffn_dim:
        raise ConfigError(f"model.ffn_dim: the dense checkpoint has {dm.ffn_dim}, this model's dense "
                          f"FFN layers have {m.ffn_dim}")


def check_upcycle_source(path: str, cfg: Config | None = None) -> Config:
    """Cheap preflight of `model.upcycle_from` (reads config.yaml, no tensors).

    Args:
        path: a checkpoint directory step_XXXXXXXX of a dense run.
        cfg: the MoE run's config; when given, its shapes are checked against the checkpoint's.

    Returns:
        The dense run's config. Raises `ConfigError` (one line) on any problem.
    """
    dense = _read_dense_config(path)
    if cfg is not None:
        _compare(dense, cfg)
    return dense


def load_dense_checkpoint(path: str) -> tuple[Config, dict[str, torch.Tensor]]:
    """(dense Config, model state dict on the CPU) of a dense checkpoint, without a process group.

    No model is built; the optimizer state is not read (`trainer.checkpoint.read_model_state`).
    """
    dense = _read_dense_config(path)
    model_sd = read_model_state(path)
    if not model_sd:
        raise ConfigError(f"{_KEY}: {path} holds no model weights")
    return dense, model_sd


@torch.no_grad()
def upcycle_into(model: nn.Module, path: str, *, granularity: int = 1, seed: int = 0) -> str:
    """Overwrite every weight of a live MoE model with the upcycled dense checkpoint at `path`.

    Args:
        model: the MoE model (unwrapped, or wrapped by parallel/; its parameters are updated in
            place, so an optimizer or DDP built on them stays valid).
        path: the dense checkpoint directory.
        granularity: `model.upcycle_granularity`.
        seed: seeds the router init; pass the same on every rank (e.g. train.seed).

    Returns:
        A one-line summary for the log. Raises `ConfigError` (one line) on a mismatch.
    """
    target = unwrap(model)
    dense, dense_sd = load_dense_checkpoint(path)
    generator = torch.Generator().manual_seed(seed)
    try:
        state = upcycle_state_dict(dense_sd, target, granularity=granularity, generator=generator)
    except UpcycleError as e:
        raise ConfigError(f"{_KEY}: {e}") from None
    target.load_state_dict(state)
    moe = getattr(target, "moe_cfg", None)
    num_moe = sum(1 for name in state if name.endswith(".experts.w1_EFD"))
    shared = ""
    if moe is not None and moe.num_shared_experts > 0:
        width = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
        shared = ("; shared experts: the dense FFN, routed/shared halves" if width == dense.model.ffn_dim
                  else "; shared experts: own init (width differs from the dense FFN)")
    grain = f", granularity {granularity}" if granularity > 1 else ""
    return f"upcycled {num_moe} MoE layers from dense checkpoint {path}{grain}{shared}"
