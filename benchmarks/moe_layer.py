"""One MoE layer, forward + backward: ours vs the dense FFN, HF Mixtral's block and DeepSpeed MoE.

Shapes (d_model 512, fp32 on CPU; the token count is printed):
    E=8 top-2         expert ffn 1024  (Mixtral-style: few wide experts)
    E=64 top-8        expert ffn 256   (fine-grained: each expert split in 4, 4x as many chosen,
                                        8x as many experts; same active FLOPs as E=8)
    dense SwiGLU      ffn = top_k x expert ffn = 2048 in both: the same active FLOPs per token

Implementations, all on identical weights and inputs (the script checks that their outputs agree):
    ours              models.moe.MoE, dropless token choice, softmax top-k renormalised, training
                      mode with its default aux + z losses attached; backend auto (= loop on CPU).
                      ours_grouped_mm: the same layer on torch's grouped_mm backend.
    dense             models.ffn.FeedForward (SwiGLU), ffn = top_k x expert ffn
    hf                transformers' MixtralSparseMoeBlock, experts_implementation="eager" (the
                      block's own per-expert loop); hf_grouped_mm: experts_implementation=
                      "grouped_mm", what transformers picks by default for a loaded model
    deepspeed         deepspeed.moe.layer.MoE(ep_size=1, drop_tokens=False, capacity = the largest
                      expert load, no 2nd-expert sampling), experts = our SwiGLU FeedForward, so
                      the expert math is identical; its l_aux goes into backward with weight 0.01
On CUDA the script adds bf16 rows: ours on the loop, grouped_mm and megablocks backends, dense,
hf, hf_grouped_mm and deepspeed.

Method: one forward + backward per measurement, with a fixed upstream gradient and an input that
requires grad (as inside a model), grads set to None before. Every repeat runs each
implementation once, in an order rotated every repeat, so machine noise hits all alike; the
median over repeats after warmup is reported. CPU runs use 1 thread by default: this box's 2
cores are shared with other jobs, and with 2 OpenMP threads the barriers of oversubscribed
workers swing many-small-op implementations by up to 5x between runs. Single-threaded, *_ms is
the process CPU time (time the process computed, not time it waited for a core; *_wall_ms is
printed beside it); with --threads N > 1 or on CUDA it is wall time. Peak memory on CPU:
tracemalloc does not see torch's allocations, so a child process with MALLOC_MMAP_THRESHOLD_=64K
(every large tensor is its own mmap, so RSS follows live tensors) resets the kernel's peak-RSS
mark (/proc/self/clear_refs) before one fwd+bwd and reports VmHWM minus the RSS before it:
activations, temporaries and grads (8x the dense FFN's at E=64: total parameters are 8x), not
weights or inputs. On CUDA: torch.cuda.max_memory_allocated minus the allocated memory before.

Allocator: at E=64 the [N, D] row buffers (and each expert weight grad) are 32 MB, at glibc's
largest mmap threshold, so each is a fresh mmap whose pages fault on first touch, every step
(here ~2 us per 4 KiB page: ours faults ~290 MB, ~160 ms, per step; the dense FFN 32 MB). Run
with MALLOC_MMAP_THRESHOLD_=4294967296 (or jemalloc/tcmalloc) to time the layers without it.

    python benchmarks/moe_layer.py            # 2048 tokens, 10 repeats (~5 minutes here)
    python benchmarks/moe_layer.py --threads 0 --clock wall   # all cores, wall time
    python benchmarks/moe_layer.py --quick    # smoke run

The last line printed is one JSON object: {"results": [...one row per (device, E, top_k)...]}.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Idle OpenMP workers sleep instead of spinning: on a shared, oversubscribed box spinning workers
# steal the cores from the ones doing work, and many-small-op implementations suffer most.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

D_MODEL = 512
CONFIGS = [dict(num_experts=8, top_k=2, expert_ffn_dim=1024),
           dict(num_experts=64, top_k=8, expert_ffn_dim=256)]
DS_AUX_COEFF = 0.01


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per batch (batch 4 x seq)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); see the module docstring")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="what *_ms report; auto: process CPU time when single-threaded on CPU, "
                        "else wall time (both are printed)")
    p.add_argument("--configs", default="0,1", help="indices into CONFIGS to run")
    p.add_argument("--quick", action="store_true", help="smoke run: 256 tokens, 2 repeats")
    p.add_argument("--skip", default="", help="comma-separated implementations to leave out")
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)  # internal: "cfg_index"
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.warmup = 256, 2, 1
    return args


# -- the implementations -----------------------------------------------------------------------


def _moe_cfg(c: dict, backend: str):
    from models.config import MoEConfig

    return MoEConfig(num_experts=c["num_experts"], top_k=c["top_k"], expert_ffn_dim=c["expert_ffn_dim"],
                     backend=backend)


def build_ours(c, backend="auto"):
    from models.moe import MoE

    torch.manual_seed(0)
    layer = MoE(D_MODEL, _moe_cfg(c, backend))
    layer.init_weights(std=0.02, out_std=0.02)
    return layer


def build_dense(c):
    from models.ffn import FeedForward

    torch.manual_seed(1)
    ffn = FeedForward(D_MODEL, c["top_k"] * c["expert_ffn_dim"])
    ffn.init_weights(std=0.02, out_std=0.02)
    return ffn


def build_hf(c, ref, implementation="eager", d_model=D_MODEL):
    """transformers' Mixtral block with `ref`'s router and expert weights (on `ref`'s device when
    built under `with torch.device(...)`)."""
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d_model, intermediate_size=c["expert_ffn_dim"],
                        num_local_experts=c["num_experts"], num_experts_per_tok=c["top_k"],
                        router_jitter_noise=0.0, hidden_act="silu")
    if implementation != "eager":  # an unknown name would silently run the eager loop instead
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        if implementation not in ALL_EXPERTS_FUNCTIONS:
            raise ValueError(f"this transformers has no experts implementation {implementation!r}")
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():  # transformers 5 stores experts fused: gate_up_proj [E, 2F, D] = [w1; w3]
        block.gate.weight.copy_(ref.router.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ref.experts.w1_EFD, ref.experts.w3_EFD], dim=1))
        block.experts.down_proj.copy_(ref.experts.w2_EDF)
    return block


def _init_single_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # deepspeed.comm wraps it


def build_deepspeed(c, ref):
    _init_single_process_group()
    import logging

    from deepspeed.moe.layer import MoE as DSMoE
    from deepspeed.utils import logger as ds_logger

    from models.ffn import FeedForward

    ds_logger.setLevel(logging.WARNING)
    layer = DSMoE(hidden_size=D_MODEL, expert=FeedForward(D_MODEL, c["expert_ffn_dim"]),
                  num_experts=c["num_experts"], ep_size=1, k=c["top_k"], drop_tokens=False,
                  use_rts=False, top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(ref.router.gate.weight)
        for e, ffn in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            ffn.w1.weight.copy_(ref.experts.w1_EFD[e])
            ffn.w3.weight.copy_(ref.experts.w3_EFD[e])
            ffn.w2.weight.copy_(ref.experts.w2_EDF[e])
    return layer


def build_all(c: dict, device: torch.device, dtype: torch.dtype, skip: set[str]) -> dict:
    """name -> (module, step kind) for every implementation that builds here."""
    ref = build_ours(c)
    impls: dict = {}
    ours_backends = ["auto", "grouped_mm"] if device.type == "cpu" else ["loop", "grouped_mm", "megablocks"]
    for backend in ours_backends:
        name = "ours" if backend == "auto" else f"ours_{backend}"
        impls[name] = lambda b=backend: _copy_of(ref, b)
    impls["dense"] = lambda: build_dense(c)
    impls["hf"] = lambda: build_hf(c, ref, "eager")
    impls["hf_grouped_mm"] = lambda: build_hf(c, ref, "grouped_mm")
    impls["deepspeed"] = lambda: build_deepspeed(c, ref)
    built, errors = {}, {}
    for name, make in impls.items():
        if name in skip:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[name] = make().to(device, dtype).train()
        except Exception as e:  # a peer that is not installed or not runnable here
            errors[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return built, errors


def _copy_of(ref, backend):
    import copy

    layer = copy.deepcopy(ref)
    layer.experts.backend = backend
    if backend == "megablocks":
        from models.moe.backends import _import_megablocks_gmm

        _import_megablocks_gmm()  # not installed: reported as an error, not silently the loop
    return layer


def fwd_bwd(name: str, module, x, dy) -> torch.Tensor:
    """One training forward + backward; returns the (detached) output."""
    for p in module.parameters():
        p.grad = None
    x.grad = None
    if name == "deepspeed":
        y, l_aux, _ = module(x)
        torch.autograd.backward([y, l_aux], [dy, torch.tensor(DS_AUX_COEFF, dtype=l_aux.dtype,
                                                              device=l_aux.device)])
    else:
        y = module(x)
        y = y[0] if isinstance(y, tuple) else y  # some transformers versions add the router logits
        y.backward(dy)
    return y.detach()


# -- measurement -------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_all(impls: dict, x, dy, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Median fwd+bwd wall and CPU milliseconds; each repeat runs every implementation, in an
    order rotated every repeat."""
    names = list(impls)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(x.device)
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(name, impls[name], x, dy)
            _sync(x.device)
            if r >= warmup:
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    med = lambda d: {n: statistics.median(v) for n, v in d.items()}
    return med(wall), med(cpu)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mb(name, module, x, dy) -> float | None:
    """Extra peak memory of one fwd+bwd (see the module docstring for the method)."""
    fwd_bwd(name, module, x, dy)  # warm: lazily allocated library buffers are not counted
    for p in module.parameters():
        p.grad = None
    x.grad = None
    gc.collect()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(name, module, x, dy)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        base = _rss_kb("VmRSS")
        fwd_bwd(name, module, x, dy)
        return (_rss_kb("VmHWM") - base) / 1024
    except OSError:
        return None


def cpu_memory_in_child(cfg_index: int, args) -> dict[str, float | None]:
    """Run the CPU peak-memory pass in a child whose malloc returns big blocks to the OS."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(cfg_index),
           "--tokens", str(args.tokens), "--threads", str(args.threads), "--skip", args.skip]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"  memory pass failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
        return {}
    return json.loads(lines[-1])


def make_inputs(c, device, dtype, tokens):
    gen = torch.Generator().manual_seed(123)
    batch = 4 if tokens % 4 == 0 else 1
    x = torch.randn(batch, tokens // batch, D_MODEL, generator=gen).to(device, dtype)
    dy = torch.randn(batch, tokens // batch, D_MODEL, generator=gen).to(device, dtype)
    # Inside a model the layer input carries grad (earlier layers train), so every
    # implementation also computes d(input), as it would there.
    return x.requires_grad_(), dy


def memory_child(args) -> None:
    c = CONFIGS[int(args.memory_child)]
    device = torch.device("cpu")
    impls, _ = build_all(c, device, torch.float32, set(filter(None, args.skip.split(","))))
    x, dy = make_inputs(c, device, torch.float32, args.tokens)
    print(json.dumps({n: peak_memory_mb(n, m, x, dy) for n, m in impls.items()}))


def bench_config(ci: int, c: dict, device, dtype, args, skip) -> dict:
    E, K, F = c["num_experts"], c["top_k"], c["expert_ffn_dim"]
    print(f"\n== {device.type} {str(dtype).replace('torch.', '')}: E={E} top-{K}, expert ffn {F}, "
          f"dense ffn {K * F}, d_model {D_MODEL}, tokens {args.tokens}", flush=True)
    impls, errors = build_all(c, device, dtype, skip)
    for name, err in errors.items():
        print(f"  {name}: not run ({err})", flush=True)
    x, dy = make_inputs(c, device, dtype, args.tokens)

    # Same function check: every MoE implementation against ours on the same weights.
    outs = {n: fwd_bwd(n, m, x, dy).float() for n, m in impls.items()}
    with torch.no_grad():
        loads = impls["ours"].router(x.reshape(-1, D_MODEL)).tokens_per_expert_E.float() \
            if "ours" in impls else None
    if loads is not None:
        print(f"  routing: max/mean expert load {(loads.max() / loads.mean()).item():.2f}, "
              f"idle experts {(loads == 0).sum().item()}", flush=True)
    ref_name = "ours" if "ours" in outs else next((n for n in outs if n.startswith("ours")), None)
    for n, y in outs.items():
        if n != "dense" and ref_name and n != ref_name:
            diff = (y - outs[ref_name]).abs().max().item()
            print(f"  max |{n} - {ref_name}| = {diff:.2e}", flush=True)

    wall, cpu = time_all(impls, x, dy, args.warmup, args.repeats)
    # Process CPU time only means compute time for a single-threaded CPU run; GPUs: wall time.
    single = device.type == "cpu" and torch.get_num_threads() == 1
    clock = "cpu" if device.type == "cpu" and (args.clock == "cpu" or (args.clock == "auto" and single)) \
        else "wall"
    ms = cpu if clock == "cpu" else wall
    if device.type == "cpu":
        mem = cpu_memory_in_child(ci, args)
    else:
        mem = {n: peak_memory_mb(n, m, x, dy) for n, m in impls.items()}
    for n in impls:
        peak = mem.get(n)
        peak_txt = f"{peak:8.1f} MB" if peak is not None else "       n/a"
        print(f"  {n:16s} cpu {cpu[n]:9.1f} ms   wall {wall[n]:9.1f} ms   peak {peak_txt}", flush=True)

    row = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "num_experts": E,
           "top_k": K, "expert_ffn_dim": F, "dense_ffn_dim": K * F, "d_model": D_MODEL,
           "tokens": args.tokens, "threads": torch.get_num_threads(), "repeats": args.repeats,
           "clock": clock}
    for n in ["ours", "ours_loop", "ours_grouped_mm", "ours_megablocks", "dense", "hf",
              "hf_grouped_mm", "deepspeed"]:
        if n in impls or (n in errors):
            row[f"{n}_ms"] = round(ms[n], 2) if n in ms else None
            if clock != "wall":
                row[f"{n}_wall_ms"] = round(wall[n], 2) if n in wall else None
            row[f"{n}_peak_mb"] = round(mem[n], 1) if mem.get(n) is not None else None
    # CPU: "ours" is what auto picks; CUDA: the fastest of our backends (named in the row).
    ours_key = "ours" if "ours" in ms else min((n for n in ms if n.startswith("ours")),
                                               key=ms.get, default=None)
    ours = ms.get(ours_key)
    if ours_key and ours_key != "ours":
        row["ours_fastest_backend"] = ours_key.removeprefix("ours_")
    if ours is not None and "dense" in ms:
        row["ours_over_dense"] = round(ours / ms["dense"], 3)
    peers = [ms[n] for n in ("hf", "hf_grouped_mm", "deepspeed") if n in ms]
    if ours is not None and peers:
        row["fastest_peer_over_ours"] = round(min(peers) / ours, 3)
    if device.type == "cpu" and E == 8 and "ours_over_dense" in row:
        row["target_ours_over_dense_le_1.15"] = row["ours_over_dense"] <= 1.15
    if device.type == "cpu" and E == 64 and "fastest_peer_over_ours" in row:
        row["target_1.5x_faster_than_fastest_peer"] = row["fastest_peer_over_ours"] >= 1.5
    if errors:
        row["not_run"] = errors
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return {}
    skip = set(filter(None, args.skip.split(",")))
    import transformers

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception:
        ds_version = None
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {ds_version}, "
          f"threads {torch.get_num_threads()}, tokens {args.tokens}, repeats {args.repeats} "
          f"(+{args.warmup} warmup)", flush=True)
    chosen = [int(i) for i in args.configs.split(",")]
    rows = [bench_config(i, CONFIGS[i], torch.device("cpu"), torch.float32, args, skip) for i in chosen]
    if torch.cuda.is_available():
        rows += [bench_config(i, CONFIGS[i], torch.device("cuda"), torch.bfloat16, args, skip)
                 for i in chosen]
    result = {"results": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
