"""Every GPU check in one short run: backend parity, the MoE layer at production shapes, MFU of a
~2B MoE LLM and of a DiT-MoE-XL (docs/gpu.md has the command, what each part measures, targets).

    1. parity     loop and grouped-GEMM (and megablocks, if importable) expert backends, forward
                  and backward, fp32 and bf16, uneven loads and idle experts, against a float64
                  reference (benchmarks/_gpu_parity.py); a broken kernel fails the suite
    2. moe_layer  one MoE layer fwd+bwd at E=8 top-2 d=4096 ffn=14336, E=64 top-8 d=2048 ffn=1408,
                  E=128 top-8 d=2048 ffn=768, 16k tokens: ms, TFLOP/s, ratio to the dense FFN of
                  the same active FLOPs, transformers' Mixtral block beside (benchmarks/_gpu_layer.py)
    3. llm        olmoe_2b_16e at seq 4096 in bf16: every activation-checkpointing mode, torch.compile
                  off and on: tokens/s, MFU, peak memory beside the plan's (benchmarks/_gpu_train.py)
    4. dit        dit_moe_XL_8E2A training step: images/s, MFU
Parts run in the order parity, moe_layer, dit, llm, each until its share of --budget-s is used
(what does not start in time is recorded as skipped); a part that fails records its error and the
next one runs. Progress goes to stdout and, with $OUT (or --out) set, to OUT/gpu_suite.log; the
summary to OUT/gpu_suite.json after every part. The last line printed is the summary:
{"device", "torch", "parity", "moe_layer", "llm", "dit", "elapsed_s"}. Exit code 1 if parity
failed or a part raised.

    python benchmarks/gpu_suite.py                  # on a CUDA GPU, about 6 minutes on an H200
    python benchmarks/gpu_suite.py --cpu-smoke      # every part at tiny shapes on the CPU (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
# Several models are built and freed in one process: segments that grow avoid fragmentation.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from trainer.datasets_io import one_line  # noqa: E402

# Shares of the budget, in running order: the DiT before the LLM, whose compiles take longest.
PARTS = {"parity": 0.06, "moe_layer": 0.19, "dit": 0.17, "llm": 0.58}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="every part at tiny shapes on the CPU")
    p.add_argument("--budget-s", type=float, default=360.0, help="seconds for all parts together")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset, e.g. llm,dit")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--llm-modes", default="none,block,moe_ffn", help="activation-checkpointing modes of the llm part")
    p.add_argument("--optim", default="auto", choices=("auto", "fused", "foreach", "for_loop"),
                   help="optim.implementation of the training runs (AdamW's kernels)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe key of every training run, e.g. parallel.fsdp_param_dtype=bf16 (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps of each training run, one step under torch.profiler: its kernels "
                        "by device time appended to OUT/profiles.txt")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="report folder (default $OUT)")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    from _gpu_train import MODES

    unknown = set(args.llm_modes.split(",")) - set(MODES)
    if unknown:
        p.error(f"unknown --llm-modes {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    return args


def compile_backend(device: torch.device, smoke: bool, disabled: bool) -> str | None:
    """inductor on a GPU with Triton; the CPU smoke run traces with aot_eager (dynamo, autograd and
    the checkpoint hooks as on the GPU, without generating kernels: seconds, not minutes); None
    where torch.compile is off or unusable."""
    if disabled or not hasattr(torch, "compile"):
        return None
    if smoke:
        return "aot_eager"
    from torch.utils._triton import has_triton

    return "inductor" if has_triton() else None


class Report:
    """Progress lines to stdout and OUT/gpu_suite.log; the summary to OUT/gpu_suite.json."""

    def __init__(self, out: str):
        self.out = out
        if out:
            os.makedirs(out, exist_ok=True)
            open(os.path.join(out, "gpu_suite.log"), "w").close()

    def log(self, message: str) -> None:
        print(message, flush=True)
        if self.out:
            with open(os.path.join(self.out, "gpu_suite.log"), "a") as f:
                f.write(message + "\n")

    def save(self, summary: dict) -> None:
        if self.out:
            with open(os.path.join(self.out, "gpu_suite.json"), "w") as f:
                json.dump(summary, f, indent=1)


def _versions() -> str:
    import importlib.metadata as md

    found = []
    for name in ("transformers", "triton", "megablocks"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def run_part(name: str, device, smoke: bool, deadline: float, backend: str | None, log, args):
    """What part `name` reports (the parts' modules are imported here, after the sys.path setup)."""
    from _gpu_layer import run_moe_layer
    from _gpu_parity import run_parity
    from _gpu_train import run_dit, run_llm

    if name == "parity":
        return run_parity(device, smoke, log)
    if name == "moe_layer":
        return run_moe_layer(device, smoke, deadline, log)
    profile_to = os.path.join(args.out, "profiles.txt") if args.profile and args.out else None
    if name == "llm":
        return run_llm(device, smoke, deadline, backend, log, tuple(args.llm_modes.split(",")), profile_to)
    return run_dit(device, smoke, deadline, backend, log, profile_to=profile_to)


def main(argv=None) -> int:
    """Run the chosen parts in order within the budget; 0, or 1 if parity failed or a part raised."""
    args = parse_args(argv)
    import _gpu_train

    import yaml

    _gpu_train.OVERRIDES["optim.implementation"] = args.optim
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            print(f"gpu_suite: --set {item!r}: expected SECTION.KEY=VALUE", file=sys.stderr)
            return 2
        _gpu_train.OVERRIDES[key] = yaml.safe_load(value)
    if _gpu_train.OVERRIDES.get("parallel.data_parallel") == "fsdp":  # FSDP needs a process group: a world of one
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", str(port))):
            os.environ.setdefault(name, value)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; run with --cpu-smoke for the CPU smoke test", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    report = Report(args.out)
    backend = compile_backend(device, args.cpu_smoke, args.no_compile)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary = {"device": name, "torch": torch.__version__, "parity": {}, "moe_layer": [], "llm": {}, "dit": {}}
    report.log(f"gpu_suite: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), {_versions()}, "
               f"compile {backend}, optim {args.optim}, set {args.set or '-'}, budget {args.budget_s:.0f} s")
    start, failed = time.monotonic(), False
    chosen = [p for p in PARTS if p in args.parts.split(",")]
    share = sum(PARTS[p] for p in chosen)
    used = 0.0
    for part in chosen:
        used += PARTS[part] / share
        deadline = start + used * args.budget_s  # what an earlier part leaves, a later one gets
        report.log(f"[{time.monotonic() - start:6.1f} s] {part}")
        try:
            summary[part] = run_part(part, device, args.cpu_smoke, deadline, backend, report.log, args)
        except Exception as e:  # noqa: BLE001 - recorded; the next part still runs
            failed = True
            error = one_line(e)
            summary[part] = [{"error": error}] if part == "moe_layer" else {"error": error}
            report.log(f"  {part} failed: {error}")
        summary["elapsed_s"] = round(time.monotonic() - start, 1)
        report.save(summary)
    failed = failed or summary["parity"].get("ok") is False
    report.log(f"[{summary['elapsed_s']:6.1f} s] done{': FAILED' if failed else ''}")
    print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
