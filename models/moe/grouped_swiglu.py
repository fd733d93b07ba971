"""SwiGLU experts on torch's grouped GEMM as one autograd node: y_ND = SwiGLU_e(x_ND) per expert.

Shape legend (suffixes on tensor names):
    N  (token, slot) rows sorted by expert     D  model dim
    E  experts held here                       F  expert ffn dim

`gmm(a, b, offs)` is `F.grouped_mm` (or `torch._grouped_mm`). With offs_E the int32 group ends
along the rows, it runs in the three forms this file needs:
    [N, I] x [E, I, O] -> [N, O]    rows of expert e times b[e]            (forward, dgrad)
    [O, N] x [N, I]    -> [E, O, I] each expert's rows contracted alone     (wgrad)

Compared with composing the same grouped GEMMs under autograd (`backends._grouped_swiglu`, still
used with biases or another activation) this does not concatenate w1 and w3 into a fresh
[E, 2F, D] copy every forward (and split its gradient back), zeroes idle experts' gradients in
place instead of copying each, saves x, g and u only (silu(g)·u is recomputed in backward), and
runs the SwiGLU backward as three elementwise passes instead of autograd's six.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def torch_grouped_mm():
    """torch's grouped GEMM function, or None on a torch without one."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class GroupedMMSwiGLU(torch.autograd.Function):
    """Forward: g = x·w1ᵀ, u = x·w3ᵀ, y = (silu(g)·u)·w2ᵀ per expert, three grouped GEMMs.
    Backward: dgrad and wgrad as grouped GEMMs; experts with no rows get exactly zero gradients
    (a grouped GEMM may leave an empty group's output unwritten)."""

    @staticmethod
    def forward(ctx, x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF):
        gmm = torch_grouped_mm()
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        g_NF = gmm(x_ND, w1_EFD.transpose(-2, -1), offs=offs_E)
        u_NF = gmm(x_ND, w3_EFD.transpose(-2, -1), offs=offs_E)
        y_ND = gmm(F.silu(g_NF).mul_(u_NF), w2_EDF.transpose(-2, -1), offs=offs_E)
        ctx.save_for_backward(x_ND, g_NF, u_NF, counts_E, offs_E, w1_EFD, w3_EFD, w2_EDF)
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_ND):
        x_ND, g_NF, u_NF, counts_E, offs_E, w1_EFD, w3_EFD, w2_EDF = ctx.saved_tensors
        need_x, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        gmm = torch_grouped_mm()
        dy_ND = dy_ND.contiguous()  # e.g. the stride-0 gradient of a .sum()
        idle_E11 = (counts_E == 0).view(-1, 1, 1)
        a_NF = F.silu(g_NF)
        dw2_EDF = None
        if need_w2:  # wgrad of the down projection: dyᵀ · h per expert, h = silu(g)·u recomputed
            dw2_EDF = gmm(dy_ND.t(), a_NF * u_NF, offs=offs_E).masked_fill_(idle_E11, 0)
        dh_NF = gmm(dy_ND, w2_EDF, offs=offs_E)
        du_NF = a_NF.mul_(dh_NF)  # dh·silu(g), in a's buffer
        dg_NF = torch.ops.aten.silu_backward(dh_NF.mul_(u_NF), g_NF)  # dh·u·silu'(g)
        del dh_NF
        dx_ND = None
        if need_x:
            dx_ND = gmm(dg_NF, w1_EFD, offs=offs_E)
            dx_ND += gmm(du_NF, w3_EFD, offs=offs_E)
        dw1_EFD = gmm(dg_NF.t(), x_ND, offs=offs_E).masked_fill_(idle_E11, 0) if need_w1 else None
        dw3_EFD = gmm(du_NF.t(), x_ND, offs=offs_E).masked_fill_(idle_E11, 0) if need_w3 else None
        return dx_ND, None, dw1_EFD, dw3_EFD, dw2_EDF
