"""Sparse upcycling: the state dict of an MoE model built from a dense model's weights.

Shape legend (suffixes on tensor names):
    E  routed experts    G  granularity (dense hidden units split into G pieces)
    D  model dim         F  expert ffn dim (the dense FFN's hidden size is G·F)

What each MoE-model weight becomes:
    routed experts   every expert holds the dense FFN of its layer (G = 1), or, for granular
                     upcycling (G > 1), expert e holds the (e mod G)-th piece of its hidden units
    router           N(0, router_std); for G > 1 the E/G rows are each repeated G times
                     ("virtual groups", Megatron-Core): a group's G experts tie in routing, so
                     top_k (a multiple of G) always picks whole groups, i.e. whole dense FFNs
    shared experts   a copy of the dense FFN when their total width equals its hidden size;
                     the routed and shared branches then carry half of it each (w2 halved, or a
                     zeroed shared-expert gate: sigmoid(0) = 1/2). Other widths keep the MoE
                     model's own init, so the model differs from the dense one at step 0 by that
                     random shared branch.
    other MoE state  the model's own init (e.g. the aux-free selection bias, zeros)
    everything else  copied as is (embeddings, attention, norms, head, dense FFN layers)

Function preservation at step 0 (logits equal the dense model's up to fp32 rounding) holds for
token choice with renormalised weights and no capacity drops. With raw scores (no
renormalisation, expert choice) the routed w2 is scaled so that the output equals the dense FFN
while the router is uniform (Megatron-Core does the same): G / (experts per token · 1/E for
softmax or 1/2 for sigmoid). routed_scaling_factor is divided out. Scales go on w2 alone:
SwiGLU is linear in w2, so they scale the expert's output exactly.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from models.moe.layer import MoE

DEFAULT_ROUTER_STD = 0.02  # sparse upcycling (Komatsuzaki et al.) and Megatron-Core


class UpcycleError(ValueError):
    """Dense weights that cannot fill the MoE model; the message is one line naming the key."""


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _take(dense_sd: Mapping[str, torch.Tensor], key: str, used: set[str]) -> torch.Tensor:
    if key not in dense_sd:
        raise UpcycleError(f"{key}: missing from the dense checkpoint")
    used.add(key)
    return dense_sd[key]


def _routed_scale(layer: MoE, G: int) -> float:
    """Factor on the routed down projections that makes the routed output the dense FFN's."""
    router = layer.router
    E = layer.num_experts
    if getattr(router, "renormalize", False):
        scale = float(G)  # the chosen weights sum to 1 over whole groups; an expert holds 1/G of the FFN
    else:
        # Raw scores: exact only while the router is uniform, where every chosen expert's weight
        # is 1/E (softmax) or 1/2 (sigmoid); expert choice picks capacity_factor experts a token.
        per_expert = 0.5 if getattr(router, "score_func", "softmax") == "sigmoid" else 1.0 / E
        experts_per_token = getattr(router, "top_k", None) or router.capacity_factor
        scale = G / (experts_per_token * per_expert)
    return scale / getattr(router, "routed_scaling_factor", 1.0)


def dense_ffn_keys(prefix: str) -> list[str]:
    """The dense checkpoint's FFN weights that MoE layer `prefix` is made from."""
    return [f"{prefix}.{n}.weight" for n in ("w1", "w3", "w2")]


def upcycle_moe_layer(prefix: str, layer: MoE, dense_sd: Mapping[str, torch.Tensor], used: set[str],
                      granularity: int, router_std: float, generator: torch.Generator | None) -> dict:
    """Entries of one MoE layer at `prefix` from the dense FFN at the same prefix. Entries left
    out (router buffers, a shared expert that cannot be copied) keep the model's own init.

    The routed experts are those the layer holds: under expert parallelism its local experts
    (`experts.expert_offset` is the global index of the first), so a rank builds only its own.
    The router rows are the layer's all E, drawn from `generator` (seed it per layer, the same
    on every rank)."""
    w1_FD, w3_FD, w2_DF = (_take(dense_sd, key, used) for key in dense_ffn_keys(prefix))
    E_local, F, D = layer.experts.w1_EFD.shape
    E, offset = layer.num_experts, getattr(layer.experts, "expert_offset", 0)
    G = granularity
    if _shape(w1_FD)[1:] != [D] or _shape(w3_FD) != _shape(w1_FD) or _shape(w2_DF) != _shape(w1_FD)[::-1]:
        raise UpcycleError(f"{prefix}.w1.weight: dense FFN has shape {_shape(w1_FD)}, "
                           f"the MoE model expects [*, {D}] (d_model {D})")
    if w1_FD.shape[0] != G * F:
        hint = f"; granularity={w1_FD.shape[0] // F} would upcycle it granularly" if (
            G == 1 and w1_FD.shape[0] % F == 0) else ""
        raise UpcycleError(f"{prefix}.experts.w1_EFD: expert ffn dim {F} × granularity {G} = {G * F} "
                           f"does not match the dense ffn dim {w1_FD.shape[0]}{hint}")
    if G > 1:
        # Whole virtual groups must be chosen together: top_k and any routing groups align to G.
        per_group = E // max(getattr(layer.router, "num_groups", 0), 1)
        if E % G or layer.top_k % G or per_group % G:
            raise UpcycleError(f"{prefix}: granularity {G} must divide num_experts={E}, top_k={layer.top_k} "
                               f"and the experts per routing group ({per_group})")

    dtype = layer.experts.w1_EFD.dtype
    scale = _routed_scale(layer, G)
    shared, gate = layer.shared_experts, getattr(layer, "shared_expert_gate", None)
    copy_shared = shared is not None and shared.w1.weight.shape == w1_FD.shape
    if copy_shared:
        scale *= 0.5  # routed and shared branches each carry half of the dense FFN
    # Expert e = g·G + s holds piece s: view the hidden units as [G, F], take each expert's piece.
    pieces = torch.arange(offset, offset + E_local) % G
    w1_EFD = w1_FD.reshape(G, F, D)[pieces]
    w3_EFD = w3_FD.reshape(G, F, D)[pieces]
    w2_EDF = w2_DF.reshape(D, G, F).permute(1, 0, 2)[pieces] * scale
    rows_gD = torch.randn(E // G, D, generator=generator, dtype=torch.float32) * router_std
    out = {
        f"{prefix}.router.gate.weight": rows_gD.repeat_interleave(G, dim=0).to(dtype),
        f"{prefix}.experts.w1_EFD": w1_EFD.to(dtype),
        f"{prefix}.experts.w3_EFD": w3_EFD.to(dtype),
        f"{prefix}.experts.w2_EDF": w2_EDF.to(dtype),
    }
    if copy_shared:
        out[f"{prefix}.shared_experts.w1.weight"] = w1_FD.to(dtype)
        out[f"{prefix}.shared_experts.w3.weight"] = w3_FD.to(dtype)
        if gate is not None:  # a zero gate is sigmoid(0) = 1/2 exactly: it does the halving
            out[f"{prefix}.shared_expert_gate.weight"] = torch.zeros_like(gate.weight, device="cpu")
            out[f"{prefix}.shared_experts.w2.weight"] = w2_DF.to(dtype)
        else:
            out[f"{prefix}.shared_experts.w2.weight"] = (w2_DF * 0.5).to(dtype)
    return out


@torch.no_grad()
def upcycle_state_dict(dense_sd: Mapping[str, torch.Tensor], moe_model: nn.Module, *, granularity: int = 1,
                       router_std: float = DEFAULT_ROUTER_STD,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A complete state dict for `moe_model` built from a dense model's state dict.

    Args:
        dense_sd: the dense model's weights (`MoETransformer` with num_experts 0), CPU tensors.
        moe_model: the target (unwrapped); read for its structure and shapes. Entries that the
            dense model cannot provide (a shared expert of another width) keep its current values.
        granularity: G; 1 is plain upcycling, G > 1 needs expert_ffn_dim × G == dense ffn_dim.
        router_std: std of the router's normal init.
        generator: for the router init; pass a seeded one so that every rank draws the same.

    Returns:
        key -> tensor on the CPU in the target's dtypes, for `moe_model.load_state_dict`;
        copied weights may share storage with `dense_sd`.

    Raises:
        UpcycleError: a missing, unused or mis-shaped key (one line naming it and both shapes).
    """
    if granularity < 1:
        raise UpcycleError(f"granularity must be >= 1, got {granularity}")
    target = moe_model.state_dict()
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    moe_prefixes = []
    for prefix, layer in moe_model.named_modules():
        if isinstance(layer, MoE):
            moe_prefixes.append(prefix + ".")
            out.update(upcycle_moe_layer(prefix, layer, dense_sd, used, granularity, router_std, generator))
    for key, value in target.items():
        if key in out:
            continue
        if key.startswith(tuple(moe_prefixes)):
            out[key] = value.detach().cpu().clone()  # nothing dense to copy: keep the model's init
            continue
        src = _take(dense_sd, key, used)
        if src.shape != value.shape:
            raise UpcycleError(f"{key}: dense checkpoint has shape {_shape(src)}, "
                               f"the MoE model expects {_shape(value)}")
        out[key] = src.to(value.dtype)
    unused = sorted(set(dense_sd) - used)
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise UpcycleError(f"{unused[0]}{more}: in the dense checkpoint but not in the MoE model "
                           f"(num_layers or tie_embeddings differ?)")
    return out
