"""PERFT: parameter-efficient adapters inside the MoE layer, beside the routed experts.

Shape legend (suffixes on tensor names):
    T  tokens     D  model dim     N  adapters     R  adapter bottleneck width (rank)
    K  adapters per token (variant R)

Each adapter is a bottleneck A_i(x) = W_up,i · silu(W_down,i · x); the layer output becomes
    S  y += A(x)                        one adapter, always on
    D  y += Σ_i A_i(x)                  N adapters, always on
    R  y += Σ_{i ∈ top-k} g_i A_i(x)    N adapters with their own router (softmax over N, top-k,
                                        weights renormalised over the k)
    E  y += Σ_e w_e A_e(x)              one adapter per routed expert, gated by the pretrained
                                        router's kept assignments and gate weights
W_up starts at zero, so an adapted model starts out computing exactly what its base computes.

All N adapters run densely on every token ([T, D] @ [D, N·R], then [T, N·R] @ [N·R, D]) with a
[T, N] gate matrix that is zero where an adapter is off: N·R is small, so this costs less than
a dispatch. The adapters are replicated (no expert dim in their names), so under expert
parallelism every rank adapts its own tokens and their gradients are all-reduced like any
replicated parameter.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from models.config import PERFT_VARIANTS
from models.init import Init, seed_from_global_rng
from models.moe import MoE, moe_layers
from models.moe.router import RouterOutput



def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device without autocast (meta)
        return nullcontext()


class PerftAdapters(nn.Module):
    """The N adapters of one MoE layer and their gating (see the module docstring).

    Args:
        d_model: D.
        variant: one of PERFT_VARIANTS.
        num_adapters: N (S: must be 1; E: the layer's number of routed experts).
        rank: R.
        top_k: adapters per token (R only).
        device, dtype: of the new parameters (those of the layer's weights).

    forward(x_TD, route) -> y_TD: what the adapters add to the layer output (`route` is the MoE
    router's output for x_TD; only variant E reads it).
    """

    def __init__(self, d_model: int, variant: str, num_adapters: int, rank: int, top_k: int = 1,
                 device=None, dtype=None):
        super().__init__()
        if variant not in PERFT_VARIANTS:
            raise ValueError(f"perft variant {variant!r} is not one of {', '.join(PERFT_VARIANTS)}")
        if variant == "S" and num_adapters != 1:
            raise ValueError(f"perft variant S has one adapter, not {num_adapters}")
        if num_adapters < 1 or rank < 1:
            raise ValueError(f"perft: num_adapters={num_adapters} and rank={rank} must be >= 1")
        if variant == "R" and not 1 <= top_k <= num_adapters:
            raise ValueError(f"perft top_k={top_k} must be between 1 and num_adapters={num_adapters}")
        self.variant, self.num_adapters, self.rank = variant, num_adapters, rank
        self.top_k = top_k if variant == "R" else 0
        kw = dict(device=device, dtype=dtype)
        # The up projections are stored [N, R, D] (each W_up,i transposed) so that all N adapters
        # apply as one [T, N·R] @ [N·R, D] matmul.
        self.w_down_NRD = nn.Parameter(torch.empty(num_adapters, rank, d_model, **kw))
        self.w_up_NRD = nn.Parameter(torch.empty(num_adapters, rank, d_model, **kw))
        self.router = nn.Linear(d_model, num_adapters, bias=False, **kw) if variant == "R" else None
        self.init_adapter()

    @torch.no_grad()
    def init_adapter(self, init: Init | None = None) -> None:
        """By name (models/init.py; standalone: from torch's global generator)."""
        init = init or Init(self, seed_from_global_rng())
        D = self.w_down_NRD.shape[-1]
        # As LoRA's A: kaiming-uniform(a=√5) of each [R, D] matrix, i.e. U(-1/√D, 1/√D).
        init.uniform(self.w_down_NRD, -1.0 / math.sqrt(D), 1.0 / math.sqrt(D))
        init.zeros(self.w_up_NRD)  # zero output at init: the adapted layer equals the base
        if self.router is not None:
            init.normal(self.router.weight, 0.02)

    def gates(self, x_TD: torch.Tensor, route: RouterOutput) -> torch.Tensor | None:
        """[T, N] fp32 gate of every adapter for every token (zeros where off); None: all ones."""
        if self.variant in ("S", "D"):
            return None
        if self.variant == "E":
            r = route.routing
            g_TN = x_TD.new_zeros((x_TD.shape[0], self.num_adapters), dtype=r.weight_N.dtype)
            # Kept assignments only (after capacity drops), with the experts' own gate weights.
            return g_TN.index_put((r.token_idx_N, r.expert_idx_N), r.weight_N, accumulate=True)
        # R: routed in fp32, as the MoE router (near-ties flip choices in bf16).
        with _autocast_off(x_TD.device.type):
            logits_TN = F.linear(x_TD.float(), self.router.weight.float())
        probs_TN = torch.softmax(logits_TN, dim=-1)
        weight_TK, idx_TK = probs_TN.topk(self.top_k, dim=-1)
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs_TN).scatter(1, idx_TK, weight_TK)

    def forward(self, x_TD: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        T, D = x_TD.shape
        N, R = self.num_adapters, self.rank
        h_TNR = F.silu(F.linear(x_TD, self.w_down_NRD.reshape(N * R, D))).view(T, N, R)
        g_TN = self.gates(x_TD, route)
        if g_TN is not None:
            h_TNR = h_TNR * g_TN.to(h_TNR.dtype)[:, :, None]
        return h_TNR.reshape(T, N * R) @ self.w_up_NRD.reshape(N * R, D).to(h_TNR.dtype)

    def extra_repr(self) -> str:
        k = f", top_k={self.top_k}" if self.variant == "R" else ""
        return f"variant={self.variant!r}, num_adapters={self.num_adapters}, rank={self.rank}{k}"


def apply_perft(model: nn.Module, variant: str, num_adapters: int, top_k: int, rank: int) -> int:
    """Attach a `PerftAdapters` to every MoE layer of `model` as `layer.peft_adapter`.

    Args:
        variant: S | D | R | E.
        num_adapters: N for D and R (S uses 1, E the layer's number of routed experts).
        top_k: adapters per token (R).
        rank: the adapter bottleneck width.
    Returns:
        The number of MoE layers adapted (each holds N adapters).
    Raises:
        ValueError: a model without MoE layers, a bad variant/size, a layer already adapted.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("perft: the model has no MoE layers (moe.num_experts = 0)")
    for i, layer in enumerate(layers):
        if layer.peft_adapter is not None:
            raise ValueError(f"perft: MoE layer {i} already has an adapter")
        n = {"S": 1, "E": layer.num_experts}.get(variant, num_adapters)
        w = layer.router.gate.weight
        layer.peft_adapter = PerftAdapters(w.shape[1], variant, n, rank, top_k, device=w.device, dtype=w.dtype)
    return len(layers)


def has_perft(model: nn.Module) -> bool:
    return any(isinstance(m, MoE) and m.peft_adapter is not None for m in model.modules())
