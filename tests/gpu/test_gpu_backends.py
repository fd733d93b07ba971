"""Expert compute backends on CUDA: grouped_mm and megablocks equal the loop (bf16 and, where the
kernels take it, fp32), idle experts get zero grads, `auto` picks a grouped GEMM. Skipped
without a GPU; megablocks tests also without megablocks installed."""
from __future__ import annotations

import pytest
import torch

from models.moe import MoE, backends
from models.moe.backends import BACKENDS, select_backend
from models.config import MoEConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

COUNTS = [37, 0, 128, 5, 0, 64, 1, 19]  # idle experts, group ends not multiples of 16
D, FF = 256, 512


@pytest.fixture(autouse=True)
def fresh_backend_cache():
    backends.clear_backend_cache()
    yield
    backends.clear_backend_cache()


def make_inputs(dtype, counts=COUNTS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E, N = len(counts), sum(counts)
    x = torch.randn(N, D, generator=gen)
    ws = [torch.randn(E, FF, D, generator=gen) * 0.05, torch.randn(E, FF, D, generator=gen) * 0.05,
          torch.randn(E, D, FF, generator=gen) * 0.05]
    dy = torch.randn(N, D, generator=gen)
    to = lambda t: t.to("cuda", dtype)
    return to(x), [to(w) for w in ws], to(dy), torch.tensor(counts, device="cuda")


def run(fn, x, ws, dy, counts):
    x = x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in ws]
    y = fn(x, counts, *ws)
    y.backward(dy)
    torch.cuda.synchronize()
    return [y.detach().float(), x.grad.float()] + [w.grad.float() for w in ws]


def assert_matches_loop(name, dtype):
    x, ws, dy, counts = make_inputs(dtype)
    got, want = run(BACKENDS[name], x, ws, dy, counts), run(BACKENDS["loop"], x, ws, dy, counts)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for g, w, what in zip(got, want, ["y", "dx", "dw1", "dw3", "dw2"]):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * w.abs().max().item(), msg=f"{name} {what}")
    for dw in got[2:]:
        for e, n in enumerate(COUNTS):
            if n == 0:
                assert torch.count_nonzero(dw[e]) == 0, f"{name}: idle expert {e} has a gradient"


def test_grouped_mm_bf16_matches_loop():
    if not backends.probe_backend("grouped_mm", torch.device("cuda"), torch.bfloat16, D, FF):
        pytest.skip("torch grouped_mm does not run bf16 on this GPU")
    assert_matches_loop("grouped_mm", torch.bfloat16)


def test_grouped_mm_fp32_matches_loop_or_falls_back():
    if backends.probe_backend("grouped_mm", torch.device("cuda"), torch.float32, D, FF):
        assert_matches_loop("grouped_mm", torch.float32)
    else:
        with pytest.warns(RuntimeWarning, match="grouped_mm"):
            assert select_backend("grouped_mm", "cuda", torch.float32, D, FF) == "loop"


def test_megablocks_bf16_matches_loop():
    pytest.importorskip("megablocks")
    if not backends.probe_backend("megablocks", torch.device("cuda"), torch.bfloat16, D, FF):
        pytest.fail("megablocks is installed but its grouped GEMM fails the bf16 probe")
    assert_matches_loop("megablocks", torch.bfloat16)


def test_auto_picks_a_grouped_gemm_on_cuda_bf16():
    chosen = select_backend("auto", "cuda", torch.bfloat16, D, FF)
    if torch.cuda.get_device_capability() >= (8, 0) and backends._torch_grouped_mm() is not None:
        assert chosen == "grouped_mm"
    else:
        assert chosen in ("megablocks", "loop")


def test_empty_batch_on_every_backend():
    for name in ("loop", "grouped_mm"):
        x, ws, dy, counts = make_inputs(torch.bfloat16, counts=[0, 0, 0])
        _, dx, *dws = run(BACKENDS[name], x, ws, dy, counts)
        assert dx.shape == (0, D) and all(torch.count_nonzero(dw) == 0 for dw in dws)


@pytest.mark.parametrize("backend", ["auto", "grouped_mm"])
def test_moe_layer_under_autocast_matches_loop(backend):
    results = []
    for name in ("loop", backend):
        torch.manual_seed(0)
        layer = MoE(D, MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=FF, backend=name)).cuda()
        layer.init_weights(std=0.05, out_std=0.05)
        x = torch.randn(4, 64, D, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        x.requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().mean().backward()
        results.append([y.detach().float(), x.grad] + [p.grad for p in layer.experts.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in layer.experts.parameters())
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
