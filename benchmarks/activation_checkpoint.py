"""Activation checkpointing: memory and step time of every mode against none, on the tiny LLM.

Setup: recipes/llm/pretrain_tiny.yaml (3.4M parameters, 4 MoE layers, E=8 top-2, d_model 128) at
data.seq_len=512 (model.max_seq_len=512), its micro batch of 16 sequences (8192 tokens), fp32, one
process, one torch thread, random tokens. Modes: none, block (every block), block2 (every 2nd:
layers 0 and 2), moe_ffn (the routed experts), applied by parallel/recompute.py.

Memory, measured without CUDA: the bytes glibc's allocator has handed out (mallinfo2: in-use heap
blocks plus mmapped ones), where every CPU tensor lives (tests/helpers/memory.py), relative to
just before the step's forward, weights and zeroed gradients already allocated:
    after_forward_mb  held when the forward returns: what is kept for backward (plus the loss)
    peak_mb           the most held after any tensor op of forward + backward (sampled after
                      every op by a TorchDispatchMode): kept activations, recomputed ones, and the
                      backward's own buffers
    plan_mb           launch/plan.py's estimate of the same peak (`activations(cfg).peak()`)
Time: a training step (forward, backward, AdamW) without the meter; `step_ms` the median wall time,
`cpu_ms` the median thread CPU time (one thread: robust to other jobs on the machine's cores); modes
interleaved in every repeat, after --warmup steps each. Ratios are against none in the same run.

    python benchmarks/activation_checkpoint.py            # 10 steps per mode (~2 minutes)
    python benchmarks/activation_checkpoint.py --quick    # 2 steps, seq 128: a smoke run

The last line printed is one JSON object: {"modes": {mode: {"after_forward_mb", "peak_mb",
"plan_mb", "step_ms", "cpu_ms", "peak_vs_none", "after_forward_vs_none", "time_vs_none"}},
"seq_len", "tokens_per_step", "steps", "threads", "memory": (what is measured)}.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import models  # noqa: E402
from launch.plan import activations  # noqa: E402
from parallel.recompute import apply_activation_checkpointing  # noqa: E402
from tests.helpers.memory import PeakMeter, in_use  # noqa: E402
from trainer.lm.task import lm_loss  # noqa: E402
from trainer.recipe import load_config  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
MODES = {"none": ("none", 1), "block": ("block", 1), "block2": ("block", 2), "moe_ffn": ("moe_ffn", 1)}


class Run:
    """One mode: its config, model, optimizer and batch."""

    def __init__(self, name: str, seq_len: int):
        kind, every = MODES[name]
        self.cfg = load_config(RECIPE, [f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}",
                                        f"parallel.activation_checkpoint={kind}",
                                        f"parallel.activation_checkpoint_every={every}"])
        torch.manual_seed(0)  # the same weights and tokens in every mode
        self.model = apply_activation_checkpointing(models.build_model(self.cfg.model, self.cfg.moe), self.cfg.parallel)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        tokens = torch.randint(0, self.cfg.model.vocab_size, (self.cfg.train.micro_batch_size, seq_len + 1))
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
        self.step_s, self.cpu_s, self.losses = [], [], []

    def forward_backward(self, after_forward=None) -> None:
        loss = lm_loss(self.model(self.inputs), self.targets)
        if after_forward is not None:
            after_forward()
        loss.backward()
        self.losses.append(loss.item())

    def step(self, timed: bool) -> None:
        start, cpu = time.perf_counter(), time.thread_time()
        self.forward_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: the memory baseline
        if timed:
            self.step_s.append(time.perf_counter() - start)
            self.cpu_s.append(time.thread_time() - cpu)

    def memory(self) -> dict[str, float]:
        """One forward + backward under the meter, in MB relative to just before it."""
        gc.collect()
        base, held = in_use(), {}
        with PeakMeter() as meter:
            self.forward_backward(after_forward=lambda: held.setdefault("after_forward", in_use() - base))
        self.optimizer.zero_grad(set_to_none=False)
        return {"after_forward_mb": held["after_forward"] / 1e6, "peak_mb": (meter.peak - base) / 1e6,
                "plan_mb": activations(self.cfg).peak() / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps at seq 128")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.seq_len = 2, 1, 128
    if in_use() is None:
        sys.exit("needs glibc's mallinfo2 to measure CPU memory")
    torch.set_num_threads(args.threads)
    runs = {name: Run(name, args.seq_len) for name in MODES}
    for _ in range(args.warmup):
        for run in runs.values():
            run.step(timed=False)
    results = {name: run.memory() for name, run in runs.items()}
    names = list(runs)
    for repeat in range(args.steps):  # modes interleaved, the order rotated: machine noise hits all alike
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            runs[name].step(timed=True)
    ref = runs["none"]
    for name, run in runs.items():
        assert run.losses == ref.losses, f"{name}: the losses differ from none"  # same computation
        r = results[name]
        r.update(step_ms=1e3 * statistics.median(run.step_s), cpu_ms=1e3 * statistics.median(run.cpu_s))
        for key, ref_key in (("peak_vs_none", "peak_mb"), ("after_forward_vs_none", "after_forward_mb"),
                             ("time_vs_none", "cpu_ms")):
            r[key] = r[ref_key] / results["none"][ref_key]
        print(f"{name:8s} after forward {r['after_forward_mb']:7.1f} MB  peak {r['peak_mb']:7.1f} MB "
              f"(x{r['peak_vs_none']:.2f}; plan {r['plan_mb']:.1f} MB)  step {r['step_ms']:7.0f} ms wall, "
              f"{r['cpu_ms']:7.0f} ms cpu (x{r['time_vs_none']:.2f})", flush=True)
    tokens = ref.inputs.numel()
    print(json.dumps({"modes": {k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()},
                      "seq_len": args.seq_len, "tokens_per_step": tokens, "steps": args.steps,
                      "threads": args.threads,
                      "memory": "glibc malloc in-use bytes (mallinfo2), relative to before the forward"}))


if __name__ == "__main__":
    main()
