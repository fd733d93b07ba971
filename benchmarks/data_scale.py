"""Data at pretraining scale: prepare-data throughput, per-rank memory that does not grow with the
corpus, and the data loader's share of a training step.

Setup: two generated jsonl corpora (documents of 300-6,000 bytes of random words, each unique by
its header): `small` (--small-mb, default 10 MB) and `large` (--large-mb, default 512 MB). Each is
prepared with `trainer.lm.prepare.prepare_text` (the byte tokenizer, --num-proc processes, shards
of 2**26 tokens), then the tiny LLM recipe (recipes/llm/pretrain_tiny.yaml: micro batch 16 x 128
tokens, fp32) trains --steps steps from it on 2 gloo ranks through the real Trainer. For reference
the small corpus is also trained from in memory (today's path: tokenized by every rank).

    prepare_mb_per_s   source bytes / wall seconds of `sparseforge prepare-data` on the large
                       corpus, the command's start included (reading
                       through HF datasets into memory-mapped Arrow, tokenizing, writing shards,
                       sha256 of every shard), and of the small one
    rss_mb             peak resident memory of rank 0 (VmHWM) after its steps: imports,
                       model, optimizer, and the pages of the shards it touched
    loader_fraction    time rank 0 spends in next(batches) over the wall time of its steps (median
                       over steps of the ratio): windows gathered from the memory-mapped shards
    targets            large - small rss < 100 MB per rank; loader_fraction < 0.02

    python benchmarks/data_scale.py                  # 10 MB and 512 MB (~5 minutes, 2.5 GB of disk)
    python benchmarks/data_scale.py --large-mb 40    # a quicker look

The last line printed is one JSON object: {"prepare_mb_per_s", "prepare_mb_per_s_small",
"rss_mb": {"small", "large", "in_memory_small"}, "rss_growth_mb", "loader_fraction",
"loader_fraction_large", "tokens": {"small", "large"}, "steps", "num_proc"}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.helpers.dist import run_distributed  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
QUIET = ["logging.wandb=false", "logging.progress_bar=false", "logging.heatmap_every=0", "eval.every=0",
         "checkpoint.enabled=false", "data.max_bytes=0"]
DP = 2


def write_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """A jsonl corpus of about `megabytes` MB; its size in bytes. Bodies come from a pool of random
    documents (fast to write); the header makes every document unique."""
    rng = np.random.default_rng(seed)
    words = [f"w{i:x}" for i in range(4096)]
    pool = [" ".join(words[j] for j in rng.integers(0, len(words), size=int(rng.integers(50, 1000))))
            for _ in range(512)]
    target, written, i = int(megabytes * 1e6), 0, 0
    with open(path, "w") as f:
        while written < target:
            line = json.dumps({"text": f"document {i}: {pool[i % len(pool)]}"}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    return os.path.getsize(path)


def prepare(corpus: str, out: str, num_proc: int) -> tuple[float, int]:
    """(seconds, training tokens) of `sparseforge prepare-data` on `corpus`, in a process of its
    own (so this one stays small: the ranks it starts later inherit nothing of it)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "launch.cli", "prepare-data", RECIPE, "--out", out, "--num-proc",
                    str(num_proc), "--shard-tokens", str(1 << 26), "--no-progress", "--set", f"data.source={corpus}",
                    "data.max_bytes=0"], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "manifest.json")) as f:
        return seconds, json.load(f)["splits"]["train"]["tokens"]


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss, not carried over from the
    process that started it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TimedBatches:
    """An iterator over the data's batches that adds up the time spent producing them."""

    def __init__(self, batches):
        self.batches, self.seconds = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.batches)
        self.seconds += time.perf_counter() - start
        return batch


def _rank(rank: int, world_size: int, source: str, steps: int, run_dir: str) -> dict:
    import torch

    from trainer.loop import Trainer
    from trainer.recipe import load_config

    torch.set_num_threads(1)
    cfg = load_config(RECIPE, QUIET + [f"data.source={source}", f"train.steps={steps + 2}"], world_size=DP)
    trainer = Trainer(cfg, run_dir)
    batches = TimedBatches(trainer.data.train_batches())
    fractions = []
    for step in range(1, steps + 3):
        before, start = batches.seconds, time.perf_counter()
        trainer.stepper(batches, step)
        if step > 2:  # warm-up steps out
            fractions.append((batches.seconds - before) / (time.perf_counter() - start))
    trainer.watchdog.stop()
    return {"rss_mb": peak_rss_mb(),
            "loader_fraction": statistics.median(fractions)}


def train(source: str, steps: int, run_dir: str) -> dict:
    return run_distributed(_rank, DP, source, steps, run_dir, timeout_s=1800)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mb", type=float, default=10)
    parser.add_argument("--large-mb", type=float, default=512)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per corpus")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="prepare-data processes")
    parser.add_argument("--work-dir", default=None, help="where the corpora go (default: a temporary directory)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="sparseforge-data-scale-")
    try:
        results, tokens, rss = {}, {}, {}
        for name, mb in (("small", args.small_mb), ("large", args.large_mb)):
            corpus = os.path.join(work, f"{name}.jsonl")
            size = write_corpus(corpus, mb, seed=len(name))
            seconds, tokens[name] = prepare(corpus, os.path.join(work, f"{name}_prepared"), args.num_proc)
            results[f"prepare_mb_per_s_{name}"] = size / 1e6 / seconds
            print(f"{name}: {size / 1e6:.1f} MB prepared in {seconds:.1f} s ({size / 1e6 / seconds:.1f} MB/s), "
                  f"{tokens[name]:,} training tokens", flush=True)
            os.unlink(corpus) if name == "large" else None
            r = train(os.path.join(work, f"{name}_prepared"), args.steps, os.path.join(work, f"run_{name}"))
            rss[name], results[f"loader_fraction_{name}"] = r["rss_mb"], r["loader_fraction"]
            print(f"{name}: rank 0 peak RSS {r['rss_mb']:.0f} MB, data loader {100 * r['loader_fraction']:.2f}% "
                  f"of a step", flush=True)
        r = train(os.path.join(work, "small.jsonl"), args.steps, os.path.join(work, "run_memory"))
        rss["in_memory_small"] = r["rss_mb"]
        print(f"small, in memory (tokenized by every rank): rank 0 peak RSS {r['rss_mb']:.0f} MB", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"prepare_mb_per_s": round(results["prepare_mb_per_s_large"], 2),
                      "prepare_mb_per_s_small": round(results["prepare_mb_per_s_small"], 2),
                      "rss_mb": {k: round(v, 1) for k, v in rss.items()},
                      "rss_growth_mb": round(rss["large"] - rss["small"], 1),
                      "loader_fraction": round(results["loader_fraction_small"], 5),
                      "loader_fraction_large": round(results["loader_fraction_large"], 5),
                      "tokens": tokens, "steps": args.steps, "num_proc": args.num_proc}))


if __name__ == "__main__":
    main()
