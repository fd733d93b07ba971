"""Expert math shared by every backend, and the loop backend: y_ND = SwiGLU_e(x_ND) per expert.

Shape legend (suffixes on tensor names):
    N  (token, slot) rows sorted by expert     D  model dim
    E  experts held here                       F  expert ffn dim

The activation (SwiGLU or gpt-oss's clamped SwiGLU), the optional extras of biased experts, the
dtype the expert matmuls run in (autocast's when on), and `loop_backend`: per-expert matmuls on
contiguous row chunks, any device and dtype. The grouped-GEMM backends and the choice between
backends are models/moe/backends.py.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class ExpertActivation:
    """silu(g)·u ("swiglu"), or gpt-oss's "clamped_swiglu": g' = min(g, limit),
    u' = clamp(u, -limit, limit), (u' + 1)·g'·sigmoid(alpha·g')."""

    kind: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def from_config(cls, moe_cfg) -> "ExpertActivation":
        return cls(moe_cfg.expert_act, moe_cfg.swiglu_alpha, moe_cfg.swiglu_limit)

    def __call__(self, g_NF: torch.Tensor, u_NF: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return F.silu(g_NF) * u_NF
        if self.kind != "clamped_swiglu":
            raise ValueError(f"moe.expert_act={self.kind!r} is not one of swiglu, clamped_swiglu")
        g_NF = g_NF.clamp(max=self.limit)
        u_NF = u_NF.clamp(-self.limit, self.limit)
        return (u_NF + 1) * (g_NF * torch.sigmoid(g_NF * self.alpha))


@dataclass(frozen=True)
class ExpertExtras:
    """What plain SwiGLU experts lack: biases (None: none) and the activation."""

    b1_EF: torch.Tensor | None
    b3_EF: torch.Tensor | None
    b2_ED: torch.Tensor | None
    act: ExpertActivation


_AUTOCAST_DEVICES: dict[str, bool] = {}  # device type -> has autocast (a dict, not lru_cache: dynamo traces it)


def _has_autocast(device_type: str) -> bool:
    if device_type not in _AUTOCAST_DEVICES:
        try:
            torch.is_autocast_enabled(device_type)
            _AUTOCAST_DEVICES[device_type] = True
        except RuntimeError:  # e.g. meta
            _AUTOCAST_DEVICES[device_type] = False
    return _AUTOCAST_DEVICES[device_type]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's when it is on, else the input's."""
    dev = x.device.type
    if x.is_floating_point() and _has_autocast(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False) if _has_autocast(device_type) else nullcontext()


def _cast(x_ND: torch.Tensor, *weights: torch.Tensor) -> list[torch.Tensor]:
    # Done outside the autograd nodes below (which run with autocast off), so the casts are
    # ordinary differentiable ops and the weight grads come back in the parameters' dtype.
    dtype = compute_dtype(x_ND)
    return [t if t.dtype == dtype else t.to(dtype) for t in (x_ND, *weights)]


# -- loop --------------------------------------------------------------------------------------


def _chunks(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that has rows."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


class _LoopSwiGLU(torch.autograd.Function):
    """Per-expert SwiGLU over contiguous row chunks, as one autograd node.

    Compared with slicing `w[e]` under autograd this avoids one full-size zero-filled [E, ...]
    gradient per expert and slice (SelectBackward), the concatenations of per-expert outputs
    and grads, and per-op graph bookkeeping. It saves x, g and u, recomputes silu(g)·u in
    backward and reuses three [N, F] buffers there. w1/w3 are not fused into one [2F, D]
    matmul: on CPU the per-forward concatenation and the gradient split cost more than the
    saved matmul calls (measured).
    """

    @staticmethod
    def forward(ctx, x_ND, counts, w1_EFD, w3_EFD, w2_EDF):
        N, D = x_ND.shape
        chunks = _chunks(counts)
        g_NF = x_ND.new_empty(N, w1_EFD.shape[1])
        u_NF = torch.empty_like(g_NF)
        for e, s, t in chunks:
            torch.mm(x_ND[s:t], w1_EFD[e].t(), out=g_NF[s:t])
            torch.mm(x_ND[s:t], w3_EFD[e].t(), out=u_NF[s:t])
        h_NF = F.silu(g_NF).mul_(u_NF)  # one elementwise pass over all experts' rows
        y_ND = x_ND.new_empty(N, D)
        for e, s, t in chunks:
            torch.mm(h_NF[s:t], w2_EDF[e].t(), out=y_ND[s:t])
        ctx.save_for_backward(x_ND, g_NF, u_NF, w1_EFD, w3_EFD, w2_EDF)
        ctx.chunks = chunks
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_ND):
        x_ND, g_NF, u_NF, w1_EFD, w3_EFD, w2_EDF = ctx.saved_tensors
        chunks = ctx.chunks
        need_x, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        dy_ND = dy_ND.contiguous()  # e.g. the expanded grad of a .sum()
        # Three [N, F] buffers, reused: a = silu(g) then dg; b = h then du; dh.
        a_NF = F.silu(g_NF)
        b_NF = torch.mul(a_NF, u_NF) if need_w2 else torch.empty_like(g_NF)
        dh_NF = torch.empty_like(g_NF)
        dw2_EDF = _grad_buffer(w2_EDF, chunks) if need_w2 else None
        for e, s, t in chunks:
            torch.mm(dy_ND[s:t], w2_EDF[e], out=dh_NF[s:t])
            if need_w2:
                torch.mm(dy_ND[s:t].t(), b_NF[s:t], out=dw2_EDF[e])
        du_NF = torch.mul(dh_NF, a_NF, out=b_NF)  # dh·silu(g)
        dg_NF = torch.ops.aten.silu_backward.grad_input(dh_NF.mul_(u_NF), g_NF, grad_input=a_NF)
        del dh_NF  # dg = dh·u·silu'(g)
        dx_ND = torch.empty_like(x_ND) if need_x else None
        dw1_EFD = _grad_buffer(w1_EFD, chunks) if need_w1 else None
        dw3_EFD = _grad_buffer(w3_EFD, chunks) if need_w3 else None
        for e, s, t in chunks:
            if need_x:
                torch.mm(dg_NF[s:t], w1_EFD[e], out=dx_ND[s:t])
                dx_ND[s:t].addmm_(du_NF[s:t], w3_EFD[e])
            if need_w1:
                torch.mm(dg_NF[s:t].t(), x_ND[s:t], out=dw1_EFD[e])
            if need_w3:
                torch.mm(du_NF[s:t].t(), x_ND[s:t], out=dw3_EFD[e])
        return dx_ND, None, dw1_EFD, dw3_EFD, dw2_EDF


def _grad_buffer(w: torch.Tensor, chunks: list[tuple[int, int, int]]) -> torch.Tensor:
    """An uninitialised gradient for w whose idle experts' slices are already zero."""
    grad = torch.empty_like(w, memory_format=torch.contiguous_format)
    busy = [e for e, _, _ in chunks]
    if len(busy) < w.shape[0]:
        idle = torch.ones(w.shape[0], dtype=torch.bool)
        idle[busy] = False
        grad[idle.to(w.device)] = 0
    return grad


# Not compiled: the loop is driven by each step's rows per expert as host ints, on which a compiled
# graph would specialise and recompile every step (parallel/compile.py compiles around it).
@torch.compiler.disable
def loop_backend(x_sorted_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor,
                 w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                 extras: ExpertExtras | None = None) -> torch.Tensor:
    """Token-sorted loop over experts: works on every device and dtype."""
    counts = num_tokens_per_expert_E.tolist()  # chunk bounds must be host ints
    if extras is not None:
        return _loop_with_extras(x_sorted_ND, counts, w1_EFD, w3_EFD, w2_EDF, extras)
    x_ND, w1_EFD, w3_EFD, w2_EDF = _cast(x_sorted_ND, w1_EFD, w3_EFD, w2_EDF)
    with _autocast_off(x_ND.device.type):
        return _LoopSwiGLU.apply(x_ND, counts, w1_EFD, w3_EFD, w2_EDF)


def _loop_with_extras(x_ND, counts, w1_EFD, w3_EFD, w2_EDF, extras: ExpertExtras) -> torch.Tensor:
    """Biased experts and other activations: per-expert chunks under plain autograd (slicing w[e]
    gives idle experts zero gradients; with no rows at all a zero term keeps every weight in the graph)."""
    biases = [b for b in (extras.b1_EF, extras.b3_EF, extras.b2_ED) if b is not None]
    x_ND, w1_EFD, w3_EFD, w2_EDF, *biases = _cast(x_ND, w1_EFD, w3_EFD, w2_EDF, *biases)
    b1, b3, b2 = biases if biases else (None, None, None)
    outs = []
    with _autocast_off(x_ND.device.type):
        for e, s, t in _chunks(counts):
            x = x_ND[s:t]
            g, u = x @ w1_EFD[e].t(), x @ w3_EFD[e].t()
            if b1 is not None:
                g, u = g + b1[e], u + b3[e]
            y = extras.act(g, u) @ w2_EDF[e].t()
            outs.append(y if b2 is None else y + b2[e])
        if not outs:
            zero = sum(p.sum() for p in (x_ND, w1_EFD, w3_EFD, w2_EDF, *biases)) * 0
            return x_ND.new_zeros(0, w2_EDF.shape[1]) + zero
        return torch.cat(outs)
