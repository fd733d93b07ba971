"""GPU suite, part 2: one MoE layer, forward + backward, at production shapes (docs/gpu.md).

Per shape, on identical weights and inputs, in bf16 (fp32 on the CPU smoke run):
    ours_grouped_mm, ours_loop   models.moe.MoE in training mode (router, aux + z losses attached)
                                 on the grouped-GEMM and the loop backend
    dense                        models.ffn.FeedForward of width top_k x F: the same active FLOPs
    hf_eager, hf_grouped_mm      transformers' MixtralSparseMoeBlock (softmax top-k renormalised,
                                 as ours) with its per-expert loop and its grouped-GEMM experts;
                                 "batched_mm" is left out: it gathers every token's expert weights
                                 ([T·K, 2F, D], terabytes here), an inference path
Timing: benchmarks/moe_layer.py's `time_all` (every repeat runs each implementation once, in a
rotated order; the median). FLOPs of the experts: 18·T·K·D·F (three matmuls, forward and
backward's two); the router's 6·T·D·E is left out. "ours" is the grouped-GEMM layer on CUDA
(what `auto` picks there) and the loop on the CPU.
"""
from __future__ import annotations

import copy
import time
import warnings

import torch

from moe_layer import build_hf, fwd_bwd, time_all  # noqa: E402 - benchmarks/ is on sys.path
from trainer.datasets_io import one_line

SHAPES = [dict(num_experts=8, top_k=2, d_model=4096, expert_ffn_dim=14336),
          dict(num_experts=64, top_k=8, d_model=2048, expert_ffn_dim=1408),
          dict(num_experts=128, top_k=8, d_model=2048, expert_ffn_dim=768)]
SMOKE_SHAPES = [dict(num_experts=8, top_k=2, d_model=64, expert_ffn_dim=128),
                dict(num_experts=16, top_k=4, d_model=64, expert_ffn_dim=32)]
HF_IMPLEMENTATIONS = ("eager", "grouped_mm")
TARGET_OVER_DENSE = 1.3  # at E=8 top-2: ours at most 1.3x the dense FFN of the same active FLOPs


@torch.no_grad()
def _normal_(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    # Drawn on the device: models/init.py's CPU generators would spend seconds per billion weights.
    for p in module.parameters():
        p.normal_(0.0, std)
    return module


def build_impls(c: dict, device, dtype) -> tuple[dict, dict]:
    """name -> module for every implementation that builds here; name -> error for the rest."""
    from models.config import MoEConfig
    from models.ffn import FeedForward
    from models.moe import MoE

    D, K, F = c["d_model"], c["top_k"], c["expert_ffn_dim"]
    moe_cfg = MoEConfig(num_experts=c["num_experts"], top_k=K, expert_ffn_dim=F, backend="grouped_mm")
    built, errors = {}, {}
    with torch.device(device):
        ours = _normal_(MoE(D, moe_cfg)).to(dtype).train()
        built["ours_grouped_mm"] = ours
        loop = copy.deepcopy(ours)
        loop.experts.backend = "loop"
        built["ours_loop"] = loop
        built["dense"] = _normal_(FeedForward(D, K * F)).to(dtype).train()
        for impl in HF_IMPLEMENTATIONS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    built[f"hf_{impl}"] = build_hf(c, ours, impl, d_model=D).to(dtype).train()
            except Exception as e:  # noqa: BLE001 - transformers missing, or without this implementation
                errors[f"hf_{impl}"] = one_line(e)
    return built, errors


def bench_shape(c: dict, device, dtype, tokens: int, warmup: int, repeats: int, log) -> dict:
    """The row of one shape (see the module docstring)."""
    E, K, D, F = c["num_experts"], c["top_k"], c["d_model"], c["expert_ffn_dim"]
    log(f"  moe layer E={E} top-{K} d={D} ffn={F}, {tokens} tokens, {str(dtype).replace('torch.', '')}")
    row = {"num_experts": E, "top_k": K, "d_model": D, "expert_ffn_dim": F, "tokens": tokens,
           "dtype": str(dtype).replace("torch.", "")}
    impls, errors = build_impls(c, device, dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, tokens // 4, D, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(4, tokens // 4, D, generator=gen).to(device, dtype)
    outs = {}
    for name in list(impls):
        try:
            outs[name] = fwd_bwd(name, impls[name], x, dy).float()
        except Exception as e:  # noqa: BLE001 - e.g. an HF implementation this GPU or version lacks
            errors[name] = one_line(e)
            del impls[name]
    ref = outs.get("ours_grouped_mm")
    if ref is not None:  # the same function on the same weights (dense has its own)
        row["max_abs_vs_ours"] = {n: float((y - ref).abs().max()) for n, y in outs.items()
                                  if n not in ("dense", "ours_grouped_mm")}
    wall, _ = time_all(impls, x, dy, warmup, repeats)
    row["ms"] = {n: round(ms, 3) for n, ms in wall.items()}
    flops = 18 * tokens * K * D * F
    row["tflops"] = {n: round(flops / (ms * 1e-3) / 1e12, 2) for n, ms in wall.items()}
    ours_name = "ours_grouped_mm" if device.type == "cuda" else "ours_loop"
    row["ours"] = ours_name.removeprefix("ours_")
    hf = {n: ms for n, ms in wall.items() if n.startswith("hf_")}
    if ours_name in wall and "dense" in wall:
        row["ours_over_dense"] = round(wall[ours_name] / wall["dense"], 3)
    if ours_name in wall and hf:
        fastest = min(hf, key=hf.get)
        row["hf_fastest"], row["hf_fastest_over_ours"] = fastest, round(hf[fastest] / wall[ours_name], 3)
    row["targets"] = {"faster_than_hf": row["hf_fastest_over_ours"] > 1 if "hf_fastest_over_ours" in row else None}
    if E == 8 and K == 2:
        over = row.get("ours_over_dense")
        row["targets"][f"over_dense_le_{TARGET_OVER_DENSE}"] = over <= TARGET_OVER_DENSE if over is not None else None
    if errors:
        row["not_run"] = errors
    for name in impls:
        log(f"    {name:16s} {wall[name]:9.2f} ms  {row['tflops'][name]:8.1f} TFLOP/s")
    return row


def run_moe_layer(device: torch.device, smoke: bool, deadline: float, log) -> list[dict]:
    """Every shape while time is left (a shape that does not start says why)."""
    shapes, tokens = (SMOKE_SHAPES, 256) if smoke else (SHAPES, 16384)
    warmup, repeats = (1, 2) if smoke else (3, 10)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = []
    for c in shapes:
        if time.monotonic() > deadline:
            rows.append({**c, "skipped": "out of the part's time budget"})
            continue
        try:
            rows.append(bench_shape(c, device, dtype, tokens, warmup, repeats, log))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the next shape still runs
            rows.append({**c, "error": one_line(e)})
            log(f"    failed: {rows[-1]['error']}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
