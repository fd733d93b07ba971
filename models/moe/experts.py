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
That includes an expert LoRA (`models/peft`), held as the child `experts.lora` with the expert
index as dim 0 of its parameters too.
"""
from __future__ import annotations

import torch
from torch import nn

from models.init import Init, seed_from_global_rng

# Re-exported: the backends are chosen by name through this module.
from models.moe.backends import (BACKEND_CHOICES, BACKENDS, ExpertActivation, ExpertBackend,  # noqa: F401
                                 ExpertExtras, compute_dtype, resolve_backend, select_backend)

EXPERTS_ATTR = "experts"  # the attribute name an MoE layer gives its GroupedExperts


def is_expert_param(name: str) -> bool:
    """True for a parameter name (from `named_parameters`) that belongs to routed experts."""
    return EXPERTS_ATTR in name.split(".")[:-1]


class GroupedExperts(nn.Module):
    """E independent SwiGLU experts applied to rows already sorted by expert.

    Args:
        num_experts: E (experts held here).
        d_model: D.
        ffn_dim: F.
        backend: "auto" | "loop" | "grouped_mm" | "megablocks" (see models/moe/backends.py).
        bias: biases b1_EF (gate), b3_EF (up), b2_ED (down), as gpt-oss (moe.expert_bias).
        act: the activation (moe.expert_act); plain SwiGLU without biases keeps the fused kernels.
    """

    is_expert_module = True  # parallel/ shards every parameter of this module along dim 0

    def __init__(self, num_experts: int, d_model: int, ffn_dim: int, backend: str = "auto", *,
                 bias: bool = False, act: ExpertActivation = ExpertActivation()):
        super().__init__()
        self.num_experts = num_experts
        self.backend = backend
        resolve_backend(backend)  # fail at build time, not at the first forward
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))  # gate
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))  # up
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))  # down
        self.act = act
        if bias:  # dim 0 is the expert too: expert parallelism shards them with the weights
            self.b1_EF = nn.Parameter(torch.empty(num_experts, ffn_dim))
            self.b3_EF = nn.Parameter(torch.empty(num_experts, ffn_dim))
            self.b2_ED = nn.Parameter(torch.empty(num_experts, d_model))
        else:
            self.b1_EF = self.b3_EF = self.b2_ED = None
        # Expert LoRA (models/peft.ExpertLoRA), set from outside: maps the three weights to
        # effective ones W + ΔW, so every backend runs unchanged.
        self.lora: nn.Module | None = None

    def forward(self, x_sorted_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Args: rows sorted by expert id; counts per expert (sum = N). Returns y_ND."""
        fn = BACKENDS[self.active_backend(x_sorted_ND)]
        w1_EFD, w3_EFD, w2_EDF = self.w1_EFD, self.w3_EFD, self.w2_EDF
        if self.lora is not None:
            w1_EFD, w3_EFD, w2_EDF = self.lora(w1_EFD, w3_EFD, w2_EDF)
        if self.b1_EF is None and self.act.kind == "swiglu":
            return fn(x_sorted_ND, num_tokens_per_expert_E, w1_EFD, w3_EFD, w2_EDF)
        extras = ExpertExtras(self.b1_EF, self.b3_EF, self.b2_ED, self.act)
        return fn(x_sorted_ND, num_tokens_per_expert_E, w1_EFD, w3_EFD, w2_EDF, extras)

    def active_backend(self, x_sorted_ND: torch.Tensor) -> str:
        """The backend that runs for inputs like `x_sorted_ND` (device, dtype, autocast)."""
        E, F_, D = self.w1_EFD.shape
        return select_backend(self.backend, x_sorted_ND.device, compute_dtype(x_sorted_ND), D, F_)

    def init_weights(self, std: float, out_std: float, init: Init | None = None) -> None:
        """N(0, std) for w1 and w3, N(0, out_std) for w2, each expert from its own generator keyed
        by its global index (models/init.py; standalone: from torch's global generator)."""
        init = init or Init(self, seed_from_global_rng())
        init.normal(self.w1_EFD, std)
        init.normal(self.w3_EFD, std)
        init.normal(self.w2_EDF, out_std)
        for b in (self.b1_EF, self.b3_EF, self.b2_ED):
            if b is not None:
                init.zeros(b)

    def extra_repr(self) -> str:
        E, F_, D = self.w1_EFD.shape
        extra = (", bias=True" if self.b1_EF is not None else "") + \
            (f", act={self.act.kind}" if self.act.kind != "swiglu" else "")
        return f"num_experts={E}, d_model={D}, ffn_dim={F_}, backend={self.backend!r}{extra}"
