"""Routed experts: E SwiGLU FFNs stored as stacked 3-D parameters.

Shape legend (suffixes on tensor names):
    N  (token, slot) rows sorted by expert (N = T·K before any exchange)
    D  model dim
    E  experts held by this module (all of them, or the local shard under expert parallelism)
    F  expert ffn dim

Expert parameters: every parameter of a `GroupedExperts` has the expert index as dim 0, so
expert parallelism shards them along dim 0, and their gradients must not be all-reduced across
the expert-parallel group. `parallel/` finds them with `is_expert_param(name)` (the MoE layer
always names its routed experts `experts`) or by `getattr(module, "is_expert_module", False)`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

EXPERTS_ATTR = "experts"  # the attribute name an MoE layer gives its GroupedExperts


def is_expert_param(name: str) -> bool:
    """True for a parameter name (from `named_parameters`) that belongs to routed experts."""
    return EXPERTS_ATTR in name.split(".")[:-1]


def _loop_backend(x_sorted_ND: torch.Tensor, counts: list[int], w1_EFD: torch.Tensor,
                  w3_EFD: torch.Tensor, w2_EDF: torch.Tensor) -> torch.Tensor:
    """One matmul chain per expert over its contiguous chunk of rows."""
    out = []
    for e, x_nD in enumerate(torch.split(x_sorted_ND, counts, dim=0)):
        # No skip for empty chunks: a [0, D] matmul still puts every expert's weights in the
        # autograd graph, so DDP never sees an unused parameter and their grads are zeros.
        h_nF = F.silu(x_nD @ w1_EFD[e].t()) * (x_nD @ w3_EFD[e].t())
        out.append(h_nF @ w2_EDF[e].t())
    return torch.cat(out, dim=0)


ExpertBackend = Callable[[torch.Tensor, list, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS: dict[str, ExpertBackend] = {"loop": _loop_backend}


def resolve_backend(name: str, device: torch.device | None = None) -> ExpertBackend:
    """The expert compute function for `name`; "auto" picks the best available for `device`.

    A grouped-GEMM / megablocks backend registers itself in BACKENDS and "auto" prefers it on
    CUDA; on CPU the loop is the only path.
    """
    if name == "auto":
        name = "loop"
    if name not in BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    return BACKENDS[name]


class GroupedExperts(nn.Module):
    """E independent SwiGLU experts applied to rows already sorted by expert.

    Args:
        num_experts: E (experts held here).
        d_model: D.
        ffn_dim: F.
        backend: "auto" | "loop" (see BACKENDS).
    """

    is_expert_module = True  # parallel/ shards every parameter of this module along dim 0

    def __init__(self, num_experts: int, d_model: int, ffn_dim: int, backend: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.backend = backend
        resolve_backend(backend)  # fail at build time, not at the first forward
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))  # gate
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))  # up
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))  # down

    def forward(self, x_sorted_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Args: rows sorted by expert id; counts per expert (sum = N). Returns y_ND."""
        counts = num_tokens_per_expert_E.tolist()  # split sizes must be host ints
        fn = resolve_backend(self.backend, x_sorted_ND.device)
        return fn(x_sorted_ND, counts, self.w1_EFD, self.w3_EFD, self.w2_EDF)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1_EFD, std=std)
        nn.init.normal_(self.w3_EFD, std=std)
        nn.init.normal_(self.w2_EDF, std=out_std)

    def extra_repr(self) -> str:
        E, F_, D = self.w1_EFD.shape
        return f"num_experts={E}, d_model={D}, ffn_dim={F_}, backend={self.backend!r}"
