"""Where a GPU MoE layer spends its time: expert-compute variants side by side, where the per-expert
loop overtakes the grouped GEMM, and the CUDA kernels of one forward + backward (docs/gpu.md).

Per shape of the GPU suite (benchmarks/_gpu_layer.py: E=8 top-2 d=4096 ffn=14336, E=64 top-8
d=2048 ffn=1408, E=128 top-8 d=2048 ffn=768), 16384 tokens, bf16, one `models.moe.MoE` in training
mode whose experts run on
    grouped_mm          the grouped_mm backend: GroupedMMSwiGLU, one autograd node
    grouped_composed    the same grouped GEMMs composed under autograd (w1 and w3 concatenated
                        into one [E, 2F, D] operand every forward: the backend before)
    loop                the per-expert loop backend (host counts, one GEMM per expert)
beside the dense SwiGLU of width top_k x F (the same active FLOPs). Then, at E=8, the three at
2048..32768 tokens and at E=64 at 4096 and 32768 (the rows per expert decide which kernel
wins), transformers' grouped_mm Mixtral block beside at 16384, and a torch.profiler table of
each variant's kernels (self CUDA time, top rows) at E=8 and E=64. Timing: moe_layer.py's
`time_all` (rotated order, median of 10 after 3 warm-up). Also: at E=8, how many tokens' top-2
sets differ between our router and transformers' (the suite's max_abs_vs_ours against HF is a
routing difference where that is non-zero: a bf16 tie flips the chosen expert).

    python benchmarks/gpu_moe_profile.py            # CUDA; about 90 s on an H200
    python benchmarks/gpu_moe_profile.py --cpu-smoke

Writes OUT/moe_profile.json and appends the tables to OUT/profiles.txt ($OUT or --out); the last
line printed is the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

from _gpu_layer import SHAPES, SMOKE_SHAPES, _normal_  # noqa: E402
from moe_layer import fwd_bwd, time_all  # noqa: E402

SWEEP_TOKENS = {8: (2048, 4096, 8192, 16384, 32768), 64: (4096, 32768)}  # by E: where loop and grouped cross


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, fp32")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    return p.parse_args(argv)


def _with_expert_fn(layer, fn):
    """`layer` whose experts call `fn(x, counts, w1, w3, w2)` (the variants differ only there)."""
    experts = layer.experts

    def forward(self, x_sorted_ND, counts_E):
        return fn(x_sorted_ND, counts_E, self.w1_EFD, self.w3_EFD, self.w2_EDF)

    experts.forward = types.MethodType(forward, experts)
    return layer


def build(c: dict, device, dtype) -> dict:
    import copy

    from models.config import MoEConfig
    from models.ffn import FeedForward
    from models.moe import MoE
    from models.moe.backends import grouped_mm_backend, grouped_mm_composed, loop_backend

    D, K, F = c["d_model"], c["top_k"], c["expert_ffn_dim"]
    cfg = MoEConfig(num_experts=c["num_experts"], top_k=K, expert_ffn_dim=F, backend="grouped_mm")
    with torch.device(device):
        base = _normal_(MoE(D, cfg)).to(dtype).train()
        impls = {name: _with_expert_fn(copy.deepcopy(base), fn) for name, fn in
                 (("grouped_mm", grouped_mm_backend), ("grouped_composed", grouped_mm_composed),
                  ("loop", loop_backend))}
        impls["dense"] = _normal_(FeedForward(D, K * F)).to(dtype).train()
        try:  # transformers' fastest block beside (the suite's hf_fastest at every shape)
            from moe_layer import build_hf

            impls["hf_grouped_mm"] = build_hf(c, base, "grouped_mm", d_model=D).to(dtype).train()
        except Exception:  # noqa: BLE001 - transformers missing or without grouped_mm experts
            pass
    return impls


def inputs(tokens: int, D: int, device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, tokens // 4, D, generator=gen).to(device, dtype).requires_grad_()
    return x, torch.randn(4, tokens // 4, D, generator=gen).to(device, dtype)


def kernel_table(impl, x, dy, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    fwd_bwd("", impl, x, dy)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        fwd_bwd("", impl, x, dy)
        if x.is_cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def routing_disagreement(layer, x) -> dict:
    """Tokens whose top-k expert sets differ: ours vs transformers' Mixtral gate (softmax, top-k)."""
    from moe_layer import build_hf

    c = {"expert_ffn_dim": layer.experts.w1_EFD.shape[1], "num_experts": layer.num_experts, "top_k": layer.top_k}
    with torch.no_grad(), torch.device(x.device):
        hf = build_hf(c, layer, "eager", d_model=x.shape[-1]).to(x.dtype)
        x_TD = x.reshape(-1, x.shape[-1])
        ours = layer.router(x_TD).topk_idx_TK.sort(-1).values
        hf_logits = torch.nn.functional.linear(x_TD, hf.gate.weight)
        theirs = torch.softmax(hf_logits.float(), -1).topk(layer.top_k, -1).indices.sort(-1).values
    return {"tokens": x_TD.shape[0], "topk_sets_differ": int((ours != theirs).any(-1).sum())}


def main(argv=None) -> int:
    args = parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_moe_profile: no CUDA device; use --cpu-smoke", file=sys.stderr)
        return 2
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    dtype = torch.float32 if smoke else torch.bfloat16
    shapes, tokens, sweep = (SMOKE_SHAPES, 256, {8: (128, 256)}) if smoke else (SHAPES, 16384, SWEEP_TOKENS)
    warmup, repeats = (1, 2) if smoke else (3, 10)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "shapes": [], "sweep": []}
    tables = []
    for i, c in enumerate(shapes):
        impls = build(c, device, dtype)
        x, dy = inputs(tokens, c["d_model"], device, dtype)
        ys = {n: fwd_bwd(n, m, x, dy).float() for n, m in impls.items() if n != "dense"}
        ys = {n: (y[0] if isinstance(y, tuple) else y) for n, y in ys.items()}
        wall, _ = time_all(impls, x, dy, warmup, repeats)
        row = {**c, "tokens": tokens, "ms": {n: round(v, 3) for n, v in wall.items()},
               "over_dense": {n: round(v / wall["dense"], 3) for n, v in wall.items() if n != "dense"},
               "max_abs_vs_grouped_mm": {n: float((y - ys["grouped_mm"]).abs().max()) for n, y in ys.items()
                                         if n != "grouped_mm"}}
        if i == 0:
            try:
                row["routing_vs_hf"] = routing_disagreement(impls["grouped_mm"], x)
            except Exception as e:  # noqa: BLE001 - transformers missing: the timing stands
                row["routing_vs_hf"] = {"error": f"{type(e).__name__}: {e}"}
        if i < 2:
            for n, m in impls.items():
                tables.append(f"== {n} E={c['num_experts']} top-{c['top_k']} d={c['d_model']} "
                              f"ffn={c['expert_ffn_dim']} tokens={tokens}\n" + kernel_table(m, x, dy, 14))
        print(json.dumps(row), flush=True)
        out["shapes"].append(row)
        for t in sweep.get(c["num_experts"], ()):
            xs, dys = inputs(t, c["d_model"], device, dtype)
            w, _ = time_all({n: m for n, m in impls.items() if n != "hf_grouped_mm"}, xs, dys, warmup, repeats)
            out["sweep"].append({"num_experts": c["num_experts"], "tokens": t,
                                 "rows_per_expert": t * c["top_k"] // c["num_experts"],
                                 "ms": {n: round(v, 3) for n, v in w.items()}})
            print(json.dumps(out["sweep"][-1]), flush=True)
        del impls, x, dy, ys
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "moe_profile.json"), "w") as f:
            json.dump(out, f, indent=1)
        with open(os.path.join(args.out, "profiles.txt"), "a") as f:
            f.write("\n\n".join(tables) + "\n")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
