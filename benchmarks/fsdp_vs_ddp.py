"""FSDP vs DDP: step time and per-rank parameter, gradient and optimizer bytes on the tiny LLM at dp=2.

Setup: recipes/llm/pretrain_tiny.yaml (3.4M parameters, 4 MoE layers, E=8 top-2, d_model 128,
micro batch 16 × 128 tokens per rank, fp32) on 2 gloo processes, one torch thread each, dp=2,
built and stepped by the real Trainer (trainer/loop.py construction, trainer/step.py steps):
    ddp        parallel.data_parallel=ddp: every rank holds every parameter, gradient and moment
    fsdp       parallel.data_parallel=fsdp (FSDP2, parallel/fsdp.py): all three sharded over dp,
               each block's parameters all-gathered for its forward and again for its backward
    fsdp_bf16  fsdp with parallel.fsdp_param_dtype=bf16: blocks gathered and computed in bf16
               (gradients still reduced in fp32, the shards and AdamW stay fp32)
All three are built in the same two processes from the same seed and read the same batches; their
steps are interleaved (the order rotated every step) so machine noise hits all alike.

    step_ms         median wall time of a step on rank 0 (forward, backward, gradient reduction,
                    clipping, AdamW), after --warmup steps
    cpu_ms          median CPU time of the rank-0 process in a step, all its threads (gloo's
                    included): robust to other jobs taking the machine's cores, unlike wall time
    time_vs_ddp, cpu_vs_ddp   step_ms, cpu_ms over ddp's: the overhead of sharding at this size
    params_mb, grads_mb, optimizer_mb   per rank, from the live tensors (this rank's shards):
                    parameters after the steps, gradients when the optimizer steps (a pre-hook;
                    the Trainer frees them after each step), AdamW's state after the steps.
                    DDP's bucket copies of the gradients are not counted
    state_vs_ddp    (params + grads + optimizer) over ddp's
    step1_loss_rel, max_loss_rel   relative difference of the first step's loss from ddp's (the
                    same weights: the compute dtype alone), and the largest over all steps (fsdp:
                    the same arithmetic, reduced in another order; fsdp_bf16: the trajectories
                    drift apart as routing decisions flip)

    python benchmarks/fsdp_vs_ddp.py            # 30 steps per engine (~1.5 minutes)
    python benchmarks/fsdp_vs_ddp.py --quick    # 3 steps: a smoke run

The last line printed is one JSON object: {"engines": {engine: {"step_ms", "cpu_ms",
"time_vs_ddp", "cpu_vs_ddp", "params_mb", "grads_mb", "optimizer_mb", "state_vs_ddp",
"step1_loss_rel", "max_loss_rel"}}, "fsdp_overhead", "fsdp_bf16_overhead" (wall time ratios),
"fsdp_overhead_cpu", "fsdp_bf16_overhead_cpu", "dp", "steps", "tokens_per_step", "threads"}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.helpers.dist import run_distributed  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
ENGINES = {"ddp": ["parallel.data_parallel=ddp"], "fsdp": ["parallel.data_parallel=fsdp"],
           "fsdp_bf16": ["parallel.data_parallel=fsdp", "parallel.fsdp_param_dtype=bf16"]}
QUIET = ["logging.wandb=false", "logging.progress_bar=false", "logging.heatmap_every=0", "eval.every=0",
         "checkpoint.enabled=false"]
DP = 2


def _mb(tensors) -> float:
    from parallel.fsdp import local_tensor

    return sum(local_tensor(t).numel() * t.element_size() for t in tensors) / 1e6


class Engine:
    """One engine's Trainer on this rank, its step times and losses."""

    def __init__(self, name: str, run_dir: str, total_steps: int, threads: int):
        import torch

        from trainer.loop import Trainer
        from trainer.recipe import load_config

        torch.set_num_threads(threads)
        cfg = load_config(RECIPE, QUIET + ENGINES[name] + [f"train.steps={total_steps}"], world_size=DP)
        self.trainer = Trainer(cfg, os.path.join(run_dir, name))
        self.batches = self.trainer.data.train_batches()
        self.tokens_per_step = self.trainer.task.tokens_per_micro_batch * cfg.train.grad_accum_steps * DP
        self.step_s, self.cpu_s, self.losses, self.grads_mb = [], [], [], 0.0
        self.trainer.optimizer.register_step_pre_hook(self._count_grads)

    def _count_grads(self, optimizer, args, kwargs) -> None:
        self.grads_mb = _mb(p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None)

    def step(self, step: int, timed: bool) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        loss, _ = self.trainer.stepper(self.batches, step)
        if timed:
            self.step_s.append(time.perf_counter() - start)
            self.cpu_s.append(time.process_time() - cpu)
        self.losses.append(loss)

    def report(self) -> dict:
        import torch

        trainer = self.trainer
        state = [t for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        trainer.watchdog.stop()
        return {"step_ms": 1e3 * statistics.median(self.step_s), "cpu_ms": 1e3 * statistics.median(self.cpu_s),
                "params_mb": _mb(trainer.unwrapped_model.parameters()),
                "grads_mb": self.grads_mb, "optimizer_mb": _mb(state), "losses": self.losses,
                "tokens_per_step": self.tokens_per_step}


def _rank(rank: int, world_size: int, steps: int, warmup: int, threads: int, run_dir: str) -> dict:
    engines = {name: Engine(name, run_dir, steps + warmup, threads) for name in ENGINES}
    names = list(engines)
    for step in range(1, warmup + steps + 1):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:  # engines interleaved, the order rotated
            engines[name].step(step, timed=step > warmup)
    return {name: engine.report() for name, engine in engines.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per engine")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per engine first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps after 1 warmup")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    with tempfile.TemporaryDirectory() as run_dir:
        results = run_distributed(_rank, DP, args.steps, args.warmup, args.threads, run_dir, timeout_s=1800)[0]
    ref, losses = results["ddp"], {name: r.pop("losses") for name, r in results.items()}
    for name, r in results.items():
        r["time_vs_ddp"], r["cpu_vs_ddp"] = r["step_ms"] / ref["step_ms"], r["cpu_ms"] / ref["cpu_ms"]
        state = r["params_mb"] + r["grads_mb"] + r["optimizer_mb"]
        r["state_vs_ddp"] = state / (ref["params_mb"] + ref["grads_mb"] + ref["optimizer_mb"])
        rel = [abs(a - b) / abs(b) for a, b in zip(losses[name], losses["ddp"])]
        r["step1_loss_rel"], r["max_loss_rel"] = rel[0], max(rel)
        print(f"{name:9s} step {r['step_ms']:6.1f} ms wall (x{r['time_vs_ddp']:.2f} ddp), {r['cpu_ms']:6.1f} ms cpu "
              f"(x{r['cpu_vs_ddp']:.2f})  per rank: params "
              f"{r['params_mb']:.2f} MB, grads {r['grads_mb']:.2f} MB, AdamW {r['optimizer_mb']:.2f} MB "
              f"(x{r['state_vs_ddp']:.2f} ddp)  loss vs ddp {r['step1_loss_rel']:.1e} at step 1, "
              f"{r['max_loss_rel']:.1e} max", flush=True)
    tokens = [r.pop("tokens_per_step") for r in results.values()][0]
    print(json.dumps({"engines": {k: {m: float(f"{v:.4g}") for m, v in r.items()} for k, r in results.items()},
                      "fsdp_overhead": round(results["fsdp"]["time_vs_ddp"], 4),
                      "fsdp_bf16_overhead": round(results["fsdp_bf16"]["time_vs_ddp"], 4),
                      "fsdp_overhead_cpu": round(results["fsdp"]["cpu_vs_ddp"], 4),
                      "fsdp_bf16_overhead_cpu": round(results["fsdp_bf16"]["cpu_vs_ddp"], 4),
                      "dp": DP, "steps": args.steps, "tokens_per_step": tokens, "threads": args.threads}))


if __name__ == "__main__":
    main()
