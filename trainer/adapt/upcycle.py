"""Upcycling from a dense checkpoint of ours (`model.upcycle_from`): the I/O around
`models.moe.upcycle` (what each MoE weight becomes).

    check_upcycle_source(path, cfg)      launcher preflight: config.yaml only, raises ConfigError
    load_dense_checkpoint(path)          (dense Config, CPU state dict), no process group needed
    upcycle_into(model, path, ...)       fills this rank's share of a live MoE model in place;
                                         returns a log line

Each rank reads what its share is made from: the shared weights through DCP (its shards), and
one dense FFN at a time for its MoE layers' experts; every layer's router init comes from a
generator keyed by the seed and the layer, so all ranks and layouts get identical weights
without a broadcast.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from models.config import moe_layer_ids
from models.moe import MoE
from models.moe.upcycle import DEFAULT_ROUTER_STD, UpcycleError, dense_ffn_keys, upcycle_moe_layer
from parallel import unwrap
from parallel.materialize import local_part, share_of
from trainer.adapt.sources import resolve_checkpoint
from trainer.checkpoint import load_model_weights, read_model_state, stored_tensor_names
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
def upcycle_into(model: nn.Module, path: str, *, granularity: int = 1, seed: int = 0, mesh=None) -> str:
    """Overwrite every weight of this rank's share of a live MoE model with the upcycled dense
    checkpoint at `path`, reading only what that share is made from.

    Args:
        model: this rank's module (the whole model, its expert / FSDP shards, its pipeline
            stages; unwrapped or wrapped by parallel/). Parameters are updated in place, so an
            optimizer or DDP built on them stays valid.
        path: the dense checkpoint directory.
        granularity: `model.upcycle_granularity`.
        seed: seeds each layer's router init (per layer: the same on every rank and layout).
        mesh: the run's mesh (None: one process); reading the shared weights is collective.

    Returns:
        A one-line summary for the log. Raises `ConfigError` (one line) on a mismatch.
    """
    target = unwrap(model)
    dense = _read_dense_config(path)
    stored = set(stored_tensor_names(path))
    layers = [(prefix, m) for prefix, m in target.named_modules() if isinstance(m, MoE)]
    moe_prefixes = tuple(prefix + "." for prefix, _ in layers)
    # 1. every tensor outside the MoE layers: the dense model's, this rank's share through DCP.
    shared = [k for k in target.state_dict(keep_vars=True) if not k.startswith(moe_prefixes)]
    if missing := sorted(set(shared) - stored):
        raise ConfigError(f"{_KEY}: {missing[0]}: missing from the dense checkpoint")
    try:
        load_model_weights(path, target, mesh, names=shared)
    except ConfigError as e:
        raise ConfigError(f"{_KEY}: {e}") from None
    # 2. each MoE layer from its dense FFN (read whole: one FFN at a time), this rank's experts.
    params = target.state_dict(keep_vars=True)
    for prefix, layer in layers:
        dense_ffn = read_model_state(path, dense_ffn_keys(prefix))
        generator = torch.Generator().manual_seed(_layer_seed(seed, prefix))
        try:
            entries = upcycle_moe_layer(prefix, layer, dense_ffn, set(), granularity, DEFAULT_ROUTER_STD, generator)
        except UpcycleError as e:
            raise ConfigError(f"{_KEY}: {e}") from None
        for key, value in entries.items():
            t = params[key]
            # Expert tensors come with this rank's experts only: no expert offset to apply.
            local_part(t)[0].copy_(share_of(t, value.to(t.dtype), None))
    moe = getattr(target, "moe_cfg", None)
    shared_line = ""
    if moe is not None and moe.num_shared_experts > 0:
        width = moe.num_shared_experts * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim)
        shared_line = ("; shared experts: the dense FFN, routed/shared halves" if width == dense.model.ffn_dim
                       else "; shared experts: own init (width differs from the dense FFN)")
    grain = f", granularity {granularity}" if granularity > 1 else ""
    return f"upcycled {len(layers)} MoE layers from dense checkpoint {path}{grain}{shared_line}"


def _layer_seed(seed: int, prefix: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/router/{prefix}".encode(), digest_size=8).digest(), "little") >> 1
