"""Expert compute backends on CUDA against a float64 reference on the CPU (the GPU suite's oracle and
tolerances, benchmarks/_gpu_parity.py): loop, grouped_mm and megablocks, forward and backward, fp32
and bf16, uneven loads and idle experts (whose weight gradients must be exactly zero).

A kernel that runs and disagrees fails; so does one that must exist and raises (grouped GEMM in
bf16 on compute capability >= 8.0). A test skips only where its kernel is absent: no GPU, no grouped
GEMM in this torch, a GPU older than sm80 for bf16 grouped GEMM, megablocks not installed."""
from __future__ import annotations

import pytest
import torch

from benchmarks._gpu_parity import TOLERANCE, compare, make_inputs, reference, run_backend
from models.config import MoEConfig
from models.moe import MoE, backends
from models.moe.backends import BACKENDS, select_backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")
COUNTS = [37, 0, 128, 5, 0, 64, 1, 19]  # idle experts, group ends not multiples of 16
D, FF = 256, 512
CASE = dict(name="uneven", D=D, F=FF, counts=COUNTS)
# A whole layer under bf16 autocast also rounds its input and weights (the backends' cases start
# from bf16 values): ~8e-3 of relative error on the CPU (torch 2.13), so twice that.
LAYER_TOLERANCE = 2e-2


@pytest.fixture(autouse=True)
def fresh_backend_cache():
    backends.clear_backend_cache()
    yield
    backends.clear_backend_cache()


def _sm80() -> bool:
    return torch.cuda.get_device_capability(DEVICE) >= (8, 0)


def assert_matches_reference(name: str, dtype: torch.dtype, seed: int = 0) -> None:
    x, ws, dy, counts = make_inputs(CASE, DEVICE, dtype, seed)
    got = run_backend(name, x, ws, dy, counts)
    torch.cuda.synchronize()
    verdict = compare(got, reference(x, ws, dy, COUNTS), COUNTS, TOLERANCE[dtype])
    assert verdict["status"] == "pass", f"{name} {dtype}: {verdict}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loop_matches_reference(dtype):
    assert_matches_reference("loop", dtype)


def test_grouped_mm_bf16_matches_reference():
    if backends._torch_grouped_mm() is None:
        pytest.skip("this torch has no grouped GEMM")
    if not _sm80():
        pytest.skip("bf16 grouped GEMM needs compute capability >= 8.0")
    for seed in (0, 1):  # fresh inputs: the same function on any valid input
        assert_matches_reference("grouped_mm", torch.bfloat16, seed)


def test_grouped_mm_fp32_matches_reference_or_falls_back():
    if backends._torch_grouped_mm() is None:
        pytest.skip("this torch has no grouped GEMM")
    x, ws, dy, counts = make_inputs(CASE, DEVICE, torch.float32, seed=2)
    try:
        got = run_backend("grouped_mm", x, ws, dy, counts)
    except RuntimeError:  # no fp32 kernel on this GPU: requesting it must fall back to the loop
        with pytest.warns(RuntimeWarning, match="grouped_mm"):
            assert select_backend("grouped_mm", "cuda", torch.float32, D, FF) == "loop"
        return
    verdict = compare(got, reference(x, ws, dy, COUNTS), COUNTS, TOLERANCE[torch.float32])
    assert verdict["status"] == "pass", verdict


def test_megablocks_bf16_matches_reference():
    pytest.importorskip("megablocks")
    assert_matches_reference("megablocks", torch.bfloat16)


def test_auto_picks_a_grouped_gemm_on_cuda_bf16():
    chosen = select_backend("auto", "cuda", torch.bfloat16, D, FF)
    if _sm80() and backends._torch_grouped_mm() is not None:
        assert chosen == "grouped_mm"
    else:
        assert chosen in ("megablocks", "loop")


def test_empty_batch_on_every_backend():
    for name in ("loop", "grouped_mm"):
        x, ws, dy, counts = make_inputs(dict(CASE, counts=[0, 0, 0]), DEVICE, torch.bfloat16, seed=0)
        _, dx, *dws = run_backend(name, x, ws, dy, counts)
        assert dx.shape == (0, D) and all(torch.count_nonzero(dw) == 0 for dw in dws)


def _layer_step(backend: str, autocast: bool) -> list[torch.Tensor]:
    """Output, input gradient and expert gradients of one MoE layer forward + backward."""
    torch.manual_seed(0)
    layer = MoE(D, MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=FF, backend=backend)).to(DEVICE)
    layer.init_weights(std=0.05, out_std=0.05)
    x = torch.randn(4, 64, D, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1)).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.experts.parameters())
    return [y.detach().double(), x.grad.double()] + [p.grad.double() for p in layer.experts.parameters()]


@pytest.mark.parametrize("backend", ["auto", "grouped_mm", "loop"])
def test_moe_layer_under_bf16_autocast_matches_fp32(backend):
    """The layer as training runs it (fp32 weights, bf16 autocast) against itself in fp32 without
    autocast on the loop backend (TF32 off: cuBLAS's default for fp32 matmuls)."""
    want = _layer_step("loop", autocast=False)
    for got, ref in zip(_layer_step(backend, autocast=True), want):
        rel = float((got - ref).norm() / ref.norm())
        assert rel <= LAYER_TOLERANCE, f"{backend}: relative error {rel:.2e}"
