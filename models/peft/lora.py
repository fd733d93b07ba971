"""LoRA on nn.Linear layers and on the stacked weights of routed experts; merging into the base.

Shape legend (suffixes on tensor names):
    E  experts held by the GroupedExperts (all, or the local shard under expert parallelism)
    D  model dim     F  expert ffn dim     R  LoRA rank r

    nn.Linear W [out, in]:    y = x Wᵀ + b + (α/r)·dropout(x) Aᵀ Bᵀ,   A [r, in], B [out, r]
    expert W [E, out, in]:    W_eff = W + (α/r)·B A per expert,      A [E, r, in], B [E, out, r]

A is kaiming-uniform(a=√5) as in HF peft (bound 1/√in), B zeros: an adapted model starts out
computing exactly what its base computes.

Base parameter names never change: `LoRALinear` is an nn.Linear that keeps `weight`/`bias` and
adds `lora_A`/`lora_B`; expert LoRA lives in the child `experts.lora` (`ExpertLoRA`). A base
state dict therefore loads into an adapted model with strict=False, only the LoRA keys missing.

Expert LoRA hands the expert backend the effective weights W + ΔW (one baddbmm per tensor), so
it works with every backend and dispatcher unchanged; the cost is one extra copy of the expert
weights per forward (kept for backward). It has no dropout: dropout acts on the input rows of
the low-rank path, which the effective-weight form never materialises.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.init import Init, seed_from_global_rng
from models.moe import GroupedExperts
from models.moe.router import ExpertChoiceRouter, TopKRouter


def _init_A(A: torch.Tensor, fan_in: int, init: Init) -> None:
    # kaiming_uniform_(a=√5) on an [r, in] matrix is U(-1/√in, 1/√in); written out because on a
    # stacked [E, r, in] tensor torch would take r·in as the fan-in.
    bound = 1.0 / math.sqrt(fan_in)
    init.uniform(A, -bound, bound)


class LoRALinear(nn.Linear):
    """An nn.Linear plus a rank-r update: y = x Wᵀ + b + (α/r)·dropout(x) Aᵀ Bᵀ.

    Built around an existing linear (`LoRALinear(base, ...)`), sharing its weight and bias
    Parameters, so their names and values are those of the base.

    Args:
        base: the nn.Linear to adapt.
        rank, alpha, dropout: r, α and the dropout probability on the LoRA input.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        # Meta: nothing is allocated for the weight that is replaced just below.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)
        self.init_adapter()

    @torch.no_grad()
    def init_adapter(self, init: Init | None = None) -> None:
        """A by name (models/init.py; standalone: from torch's global generator), B zero."""
        init = init or Init(self, seed_from_global_rng())
        _init_A(self.lora_A, self.in_features, init)
        init.zeros(self.lora_B)  # zero update at init: the adapted model equals the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * delta

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + (α/r)·B A, reusing this module's weight and bias
        Parameters (updated in place, computed in fp32)."""
        w = self.weight
        w.copy_(torch.addmm(w.float(), self.lora_B.float(), self.lora_A.float(), alpha=self.scaling).to(w.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


class ExpertLoRA(nn.Module):
    """Per-expert rank-r updates of a GroupedExperts' w1_EFD, w3_EFD and w2_EDF.

    Attached as `experts.lora`; every parameter has the expert index as dim 0, so expert
    parallelism (`shard_experts`) slices it with the experts and checkpoints store it as expert
    shards. forward(w1_EFD, w3_EFD, w2_EDF) returns the effective weights W + (α/r)·B A.
    """

    def __init__(self, experts: GroupedExperts, rank: int, alpha: float):
        super().__init__()
        E, F_, D = experts.w1_EFD.shape
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        kw = dict(device=experts.w1_EFD.device, dtype=experts.w1_EFD.dtype)
        self.A_w1_ERD = nn.Parameter(torch.empty(E, rank, D, **kw))
        self.B_w1_EFR = nn.Parameter(torch.empty(E, F_, rank, **kw))
        self.A_w3_ERD = nn.Parameter(torch.empty(E, rank, D, **kw))
        self.B_w3_EFR = nn.Parameter(torch.empty(E, F_, rank, **kw))
        self.A_w2_ERF = nn.Parameter(torch.empty(E, rank, F_, **kw))
        self.B_w2_EDR = nn.Parameter(torch.empty(E, D, rank, **kw))
        self.init_adapter()

    def pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(A, B) for w1, w3, w2, in that order."""
        return [(self.A_w1_ERD, self.B_w1_EFR), (self.A_w3_ERD, self.B_w3_EFR), (self.A_w2_ERF, self.B_w2_EDR)]

    @torch.no_grad()
    def init_adapter(self, init: Init | None = None) -> None:
        """Each expert's A from its own generator (models/init.py), B zero."""
        init = init or Init(self, seed_from_global_rng())
        for A, B in self.pairs():
            _init_A(A, A.shape[-1], init)
            init.zeros(B)  # zero update at init: the adapted experts equal the base ones

    def forward(self, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.baddbmm(w, B, A, alpha=self.scaling)
                     for w, (A, B) in zip((w1_EFD, w3_EFD, w2_EDF), self.pairs()))

    @torch.no_grad()
    def merge_into(self, experts: GroupedExperts) -> None:
        """Add (α/r)·B A to the experts' weights in place (computed in fp32)."""
        for w, (A, B) in zip((experts.w1_EFD, experts.w3_EFD, experts.w2_EDF), self.pairs()):
            w.copy_(torch.baddbmm(w.float(), B.float(), A.float(), alpha=self.scaling).to(w.dtype))

    def extra_repr(self) -> str:
        E, r, D = self.A_w1_ERD.shape
        return f"num_experts={E}, rank={r}, alpha={self.alpha}"


def _weight_read_directly(model: nn.Module) -> dict[str, str]:
    """Linear layers whose `weight` is read by another module's forward (their own forward never
    runs, so a LoRA on them would be silently ignored), with the reason."""
    gate = "a router gate, whose weight the router reads directly (train it with peft.train_router)"
    skip = {f"{name}.gate" if name else "gate": gate for name, module in model.named_modules()
            if isinstance(module, (TopKRouter, ExpertChoiceRouter))}
    # MoETransformer's head: F.linear(h, output.weight), so a tied head and pipeline stages share code.
    if isinstance(getattr(model, "output", None), nn.Linear) and hasattr(model, "output_weight"):
        skip["output"] = "the LM head, whose weight the model reads directly"
    return skip


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Add LoRA to every module whose name (`named_modules` FQN) matches one of `targets`
    (fnmatch patterns, e.g. "layers.*.attn.*", "layers.*.ffn.experts"): an nn.Linear becomes a
    `LoRALinear`, a GroupedExperts gets `experts.lora`. Matched modules of other types (SiLU,
    containers) are ignored, as are router gates and the LM head (their weight is read directly).

    New parameters are trainable; nothing else changes requires_grad.

    Returns:
        The adapted module names, in module order.
    Raises:
        ValueError: naming the first pattern that matches no adaptable module, or when asked for
            no targets, a rank < 1, or a module that already has LoRA.
    """
    if not targets:
        raise ValueError("lora targets: empty; name modules to adapt, e.g. 'layers.*.attn.*'")
    if rank < 1:
        raise ValueError(f"lora rank: {rank} must be >= 1")
    skip = _weight_read_directly(model)
    named = list(model.named_modules())
    adaptable = [n for n, m in named if (isinstance(m, nn.Linear) and n not in skip) or isinstance(m, GroupedExperts)]
    for pattern in targets:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in adaptable):
            ignored = [n for n in skip if fnmatch.fnmatchcase(n, pattern)]
            why = (f"; it only matches {ignored[0]}{' ...' if len(ignored) > 1 else ''}, "
                   f"{skip[ignored[0]]}" if ignored else "")
            raise ValueError(f"lora target {pattern!r} matches no nn.Linear or GroupedExperts of the model{why}")
    chosen = [n for n in adaptable if any(fnmatch.fnmatchcase(n, p) for p in targets)]
    modules = dict(named)
    for name in chosen:
        module = modules[name]
        if isinstance(module, LoRALinear) or getattr(module, "lora", None) is not None:
            raise ValueError(f"lora target {name}: already has LoRA")
        if isinstance(module, GroupedExperts):
            module.lora = ExpertLoRA(module, rank, alpha)
        else:
            _set_submodule(model, name, LoRALinear(module, rank, alpha, dropout))
    return chosen


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA of `model` into its base weight, in place, and remove the LoRA
    parameters (LoRALinear -> nn.Linear sharing the same weight Parameter, experts.lora -> None).
    Returns how many modules were merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_submodule(model, name, module.merged_linear())
            merged += 1
        elif isinstance(module, GroupedExperts) and module.lora is not None:
            module.lora.merge_into(module)
            module.lora = None
            merged += 1
    return merged
