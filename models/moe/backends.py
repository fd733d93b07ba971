"""Expert compute backends: y_ND = SwiGLU_e(x_ND) for the rows of each expert e.

Shape legend (suffixes on tensor names):
    N  (token, slot) rows sorted by expert     D  model dim
    E  experts held here                       F  expert ffn dim

Every backend is `fn(x_sorted_ND, num_tokens_per_expert_E, w1_EFD, w3_EFD, w2_EDF, extras=None) -> y_ND`
and gives every expert's weights a gradient, zeros for experts that got no rows: DDP insists that
every parameter takes part in each backward.

    loop        any device and dtype: one autograd node that runs per-expert matmuls on
                contiguous row chunks and writes straight into preallocated outputs and grads
    grouped_mm  torch's grouped GEMM (`F.grouped_mm`, else `torch._grouped_mm`): one kernel per
                projection; whether it works (device, dtype, shape alignment, backward) is
                probed on first use and cached per (device, dtype, D, F)
    megablocks  the grouped GEMM MegaBlocks' dMoE uses (`grouped_gemm.ops.gmm`), CUDA only
    auto        CUDA: grouped_mm if its probe passes, else megablocks if importable and its
                probe passes, else loop. Elsewhere: loop (on CPU torch's grouped_mm is slower
                than the loop, see benchmarks/moe_layer.py).

An explicit grouped_mm (or an installed megablocks) whose probe fails falls back to the loop with
one warning per (device, dtype, D, F); `auto` falls back silently; a missing megablocks is an
error that says what to install.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from models.config import BACKEND_CHOICES
from models.moe.grouped_swiglu import GroupedMMSwiGLU, torch_grouped_mm
# Re-exported: the expert math and the loop live in models/moe/loop_backend.py.
from models.moe.loop_backend import (ExpertActivation, ExpertExtras, _autocast_off, _cast,  # noqa: F401
                                     compute_dtype, loop_backend)

MEGABLOCKS_HINT = "pip install megablocks (CUDA only; it brings the grouped_gemm kernels)"

ExpertBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                         torch.Tensor]


# -- grouped GEMM backends ---------------------------------------------------------------------


class _ZeroIdleGrad(torch.autograd.Function):
    """Identity on the weights whose backward zeroes the idle experts' gradient slices.

    Grouped GEMM kernels may leave the weight gradient of an expert with no rows uninitialised
    (grouped_gemm allocates it with torch.empty; torch's grouped_mm on some GPUs writes non-zero
    values); an optimizer step on that garbage would corrupt the expert.
    """

    @staticmethod
    def forward(ctx, w_E, num_tokens_per_expert_E):
        ctx.save_for_backward(num_tokens_per_expert_E)
        return w_E.view_as(w_E)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_E):
        (counts_E,) = ctx.saved_tensors
        idle_E = (counts_E == 0).view(-1, *([1] * (grad_E.dim() - 1)))
        return grad_E.masked_fill(idle_E, 0), None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped GEMM backward
    kernels reject e.g. the stride-0 gradient of a .sum())."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


_torch_grouped_mm = torch_grouped_mm  # module-level name: tests replace it to hide the kernel


def _grouped_swiglu(matmul, x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EFD: torch.Tensor,
                    w3_EFD: torch.Tensor, w2_EDF: torch.Tensor, extras: ExpertExtras | None = None) -> torch.Tensor:
    """SwiGLU of every expert through `matmul(a_NI, w_EOI)` = a's rows of expert e @ w[e]ᵀ.

    w1 and w3 are fused into one [E, 2F, D] operand: one grouped GEMM instead of two, for the
    price of a weight-sized copy (cheap next to the GEMM on a GPU).
    """
    x_ND, w1_EFD, w3_EFD, w2_EDF = _cast(x_ND, w1_EFD, w3_EFD, w2_EDF)
    with _autocast_off(x_ND.device.type):
        w13_E2FD = torch.cat([_ZeroIdleGrad.apply(w1_EFD, counts_E),
                              _ZeroIdleGrad.apply(w3_EFD, counts_E)], dim=1)
        g_NF, u_NF = matmul(x_ND, w13_E2FD).chunk(2, dim=-1)
        if extras is None:
            return _ContiguousGrad.apply(matmul(F.silu(g_NF) * u_NF, _ZeroIdleGrad.apply(w2_EDF, counts_E)))
        rows = lambda b_E: b_E.to(x_ND.dtype).repeat_interleave(counts_E, dim=0, output_size=x_ND.shape[0])
        if extras.b1_EF is not None:
            g_NF, u_NF = g_NF + rows(extras.b1_EF), u_NF + rows(extras.b3_EF)
        y_ND = matmul(extras.act(g_NF, u_NF), _ZeroIdleGrad.apply(w2_EDF, counts_E))
        if extras.b2_ED is not None:
            y_ND = y_ND + rows(extras.b2_ED)
        return _ContiguousGrad.apply(y_ND)


def grouped_mm_backend(x_sorted_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor,
                       w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                       extras: ExpertExtras | None = None) -> torch.Tensor:
    """torch grouped GEMM over the expert-sorted rows; group ends stay on device (no sync)."""
    if x_sorted_ND.shape[0] == 0:  # kernels reject an empty problem; nothing to compute anyway
        return loop_backend(x_sorted_ND, num_tokens_per_expert_E, w1_EFD, w3_EFD, w2_EDF, extras)
    if torch.compiler.is_compiling() and compute_dtype(x_sorted_ND) != torch.bfloat16:
        # torch's meta kernel of _grouped_mm (what torch.compile traces with) takes bf16 only, while
        # the eager kernel also runs fp32: traced, fp32 runs on the loop (outside the graph).
        return loop_backend(x_sorted_ND, num_tokens_per_expert_E, w1_EFD, w3_EFD, w2_EDF, extras)
    if extras is None:  # plain SwiGLU: one autograd node (models/moe/grouped_swiglu.py)
        x_ND, w1_EFD, w3_EFD, w2_EDF = _cast(x_sorted_ND, w1_EFD, w3_EFD, w2_EDF)
        with _autocast_off(x_ND.device.type):
            return GroupedMMSwiGLU.apply(x_ND, num_tokens_per_expert_E, w1_EFD, w3_EFD, w2_EDF)
    return grouped_mm_composed(x_sorted_ND, num_tokens_per_expert_E, w1_EFD, w3_EFD, w2_EDF, extras)


def grouped_mm_composed(x_sorted_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor,
                        w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                        extras: ExpertExtras | None = None) -> torch.Tensor:
    """The grouped GEMMs composed under autograd: biased experts and other activations (and the
    plain SwiGLU's path before GroupedMMSwiGLU, which benchmarks/gpu_moe_profile.py times beside it)."""
    gmm = _torch_grouped_mm()
    offs_E = torch.cumsum(num_tokens_per_expert_E, 0, dtype=torch.int32)
    matmul = lambda a_NI, w_EOI: gmm(a_NI, w_EOI.transpose(-2, -1), offs=offs_E)
    return _grouped_swiglu(matmul, x_sorted_ND, num_tokens_per_expert_E, w1_EFD, w3_EFD, w2_EDF, extras)


def _import_megablocks_gmm():
    """MegaBlocks' grouped GEMM op (`grouped_gemm.ops.gmm`), imported on first use."""
    try:
        from megablocks import grouped_gemm_util as gg
    except ImportError as e:
        raise ImportError(f"moe.backend='megablocks' needs MegaBlocks: {MEGABLOCKS_HINT}") from e
    if not gg.grouped_gemm_is_available():
        raise ImportError("moe.backend='megablocks' needs the grouped_gemm kernels that MegaBlocks "
                          "uses: pip install grouped_gemm (CUDA only)")
    return gg.ops.gmm


def megablocks_backend(x_sorted_ND: torch.Tensor, num_tokens_per_expert_E: torch.Tensor,
                       w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                       extras: ExpertExtras | None = None) -> torch.Tensor:
    """MegaBlocks dMoE grouped GEMM on the expert-sorted rows (CUDA only)."""
    gmm = _import_megablocks_gmm()
    if x_sorted_ND.device.type != "cuda":
        raise RuntimeError(f"moe.backend='megablocks' runs on CUDA only, got {x_sorted_ND.device}; "
                           "use moe.backend=auto or loop")
    return _megablocks_swiglu(gmm, x_sorted_ND, num_tokens_per_expert_E, w1_EFD, w3_EFD, w2_EDF, extras)


def _megablocks_swiglu(gmm, x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF, extras=None) -> torch.Tensor:
    """`gmm(a, w, batch_sizes, trans_b=True)` = a's rows of expert e @ w[e]ᵀ (grouped_gemm API)."""
    if x_ND.shape[0] == 0:  # gmm asserts that some expert has rows
        return loop_backend(x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF, extras)
    batch_sizes_E = counts_E.to("cpu", torch.int64)  # grouped_gemm takes host counts
    matmul = lambda a_NI, w_EOI: gmm(a_NI.contiguous(), w_EOI.contiguous(), batch_sizes_E, trans_b=True)
    return _grouped_swiglu(matmul, x_ND, counts_E, w1_EFD, w3_EFD, w2_EDF, extras)


BACKENDS: dict[str, ExpertBackend] = {
    "loop": loop_backend,
    "grouped_mm": grouped_mm_backend,
    "megablocks": megablocks_backend,
}


# -- selection ---------------------------------------------------------------------------------

_PROBES: dict[tuple, bool] = {}  # (backend, device, dtype, D, F) -> works
_SELECTED: dict[tuple, str] = {}  # (requested, device, dtype, D, F) -> backend that runs


def clear_backend_cache() -> None:
    """Forget probe results and selections (tests; after installing a backend mid-process)."""
    _PROBES.clear()
    _SELECTED.clear()


def _megablocks_importable() -> bool:
    try:
        _import_megablocks_gmm()
    except ImportError:
        return False
    return True


def probe_backend(name: str, device: torch.device, dtype: torch.dtype, d_model: int,
                  ffn_dim: int) -> bool:
    """Whether backend `name` runs forward and backward on (device, dtype, D, F) and matches
    the loop there. Runs once on a tiny problem with an empty expert; the answer is cached."""
    key = (name, str(device), dtype, d_model, ffn_dim)
    if key not in _PROBES:
        _PROBES[key] = _run_probe(BACKENDS[name], torch.device(device), dtype, d_model, ffn_dim)
    return _PROBES[key]


def _run_probe(fn: ExpertBackend, device: torch.device, dtype: torch.dtype, d_model: int,
               ffn_dim: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    counts_E = torch.tensor([3, 0, 5])  # an idle expert and group ends that are not aligned
    N = int(counts_E.sum())
    shapes = [(N, d_model), (3, ffn_dim, d_model), (3, ffn_dim, d_model), (3, d_model, ffn_dim)]
    try:
        # The first forward may run under no_grad, inference_mode or autocast (evaluation).
        with torch.inference_mode(False), torch.enable_grad(), _autocast_off(device.type):
            inputs = [(torch.randn(*s, generator=gen) * 0.5).to(device, dtype) for s in shapes]
            dy_ND = torch.randn(N, d_model, generator=gen).to(device, dtype)
            results = []
            for backend in (fn, loop_backend):
                leaves = [t.clone().requires_grad_() for t in inputs]
                y_ND = backend(leaves[0], counts_E.to(device), *leaves[1:])
                y_ND.backward(dy_ND)
                results.append([t.detach().float() for t in [y_ND] + [t.grad for t in leaves]])
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
        return all(torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
                   for a, b in zip(*results))
    except Exception:  # any failure (unsupported dtype, alignment, missing kernel) means "no"
        return False


def select_backend(name: str, device: torch.device | str, dtype: torch.dtype, d_model: int,
                   ffn_dim: int) -> str:
    """The backend that runs for the requested `name` on (device, dtype, D, F); cached."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown expert backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    device = torch.device(device)
    key = (name, str(device), dtype, d_model, ffn_dim)
    if key in _SELECTED:
        return _SELECTED[key]
    args = (device, dtype, d_model, ffn_dim)
    if name == "loop" or device.type == "meta":
        chosen = "loop"
    elif name == "auto":
        chosen = "loop"
        if device.type == "cuda":
            if _torch_grouped_mm() is not None and probe_backend("grouped_mm", *args):
                chosen = "grouped_mm"
            elif _megablocks_importable() and probe_backend("megablocks", *args):
                chosen = "megablocks"
    else:
        if name == "megablocks":
            _import_megablocks_gmm()  # missing: an error naming what to install, not a fallback
            if device.type != "cuda":
                raise RuntimeError(f"moe.backend='megablocks' runs on CUDA only, got {device}; "
                                   "use moe.backend=auto or loop")
        usable = (name != "grouped_mm" or _torch_grouped_mm() is not None) and probe_backend(name, *args)
        chosen = name if usable else "loop"
        if not usable:
            warnings.warn(f"moe.backend={name!r} does not work for {dtype} on {device} with "
                          f"d_model={d_model}, ffn_dim={ffn_dim} (forward+backward probe failed); "
                          "using the loop backend", RuntimeWarning, stacklevel=2)
    _SELECTED[key] = chosen
    return chosen


def resolve_backend(name: str, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32, d_model: int = 0,
                    ffn_dim: int = 0) -> ExpertBackend:
    """The expert compute function for `name`.

    Without a device it only checks the name (build time) and returns the named backend
    (`auto` -> loop); with one, it applies the run-time choice of `select_backend`.
    """
    if device is None:
        if name not in BACKEND_CHOICES:
            raise ValueError(f"unknown expert backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
        return BACKENDS["loop" if name == "auto" else name]
    return BACKENDS[select_backend(name, device, dtype, d_model, ffn_dim)]
