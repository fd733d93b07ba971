"""MoE vs dense at equal active parameters, and aux-loss vs aux-loss-free balancing, on this CPU.

Three runs of the real trainer (`trainer.loop.train`, one process), on the embedded corpus
(data.source=stdlib), from the same initial seed over the same token stream and steps:

    moe_aux_loss   recipes/llm/pretrain_tiny.yaml as is: 8 experts top-2, Switch/GShard aux loss
                   0.01, z-loss 0.001. It is both run (a) "MoE" and run (c) "aux-loss balancing".
    dense          (b) model.preset=tiny_dense: ffn_dim = top_k x expert_ffn_dim, so the active
                   parameters per token equal the MoE's (the trainer prints both counts).
    moe_aux_free   (d) moe.aux_loss_coeff=0, moe.aux_free=true, update rate 1e-3; the z-loss
                   stays at 0.001 so that only the balancing method differs from (c).

Validation loss: the trainer's final evaluation, over the whole held-out split (eval.batches is
set to cover every validation window once; the trainer's default reads only the first few
batches, a contiguous slice of one or two files), identical for every run.
MaxVio: from the per-step loads in metrics.jsonl (`moe/tokens_per_expert`, log_every=1), for
each step and MoE layer (max load - mean load) / mean load over that step's batch of
(token, slot) assignments, averaged over the layers, then over the steps of the last half of
training (steps > steps/2). Each MoE run also leaves expert-load heatmaps at the middle and the
last step (the last covers exactly the last half) in its run directory's plots/.

    python benchmarks/moe_vs_dense.py            # 2000 steps each, ~22 minutes (--threads 1)

Why 2000 steps: the MoE starts slower (each expert sees a quarter of the tokens, its router is
learning) and overtakes the dense model late; at 600 steps the dense model is still ahead.
    python benchmarks/moe_vs_dense.py --quick    # smoke run, well under a minute

The last line printed is one JSON object with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RECIPE = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
RUNS = {
    "moe_aux_loss": [],
    "dense": ["model.preset=tiny_dense"],
    "moe_aux_free": ["moe.aux_loss_coeff=0", "moe.aux_free=true", "moe.aux_free_update_rate=1e-3"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences (of data.seq_len) per step")
    p.add_argument("--eval-batches", type=int, default=0, help="0: the whole validation split")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "benchmarks", "moe_vs_dense"),
                   help="parent of the three run directories (replaced)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); 1 when sharing the cores")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 steps on a small corpus")
    return p.parse_args(argv)


def run_one(name: str, overrides: list[str], args) -> dict:
    from trainer.recipe import load_config
    from trainer.loop import train

    run_dir = os.path.join(args.out, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # never resume a previous benchmark run
    common = [f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch_size}",
              "train.grad_accum_steps=1", "train.log_every=1", "eval.every=0",
              f"eval.batches={args.eval_batches or 1}", "checkpoint.enabled=false", "logging.wandb=false",
              "logging.progress_bar=false", f"logging.heatmap_every={max(args.steps // 2, 1)}",
              "logging.expert_loads=true"]
    if args.quick:
        common += ["data.max_bytes=300000", "optim.warmup_steps=4"]
    cfg = load_config(RECIPE, common + overrides)
    if not args.eval_batches:
        cfg.eval.batches = whole_validation_batches(cfg)
    start = time.perf_counter()
    result = train(cfg, run_dir)
    seconds = time.perf_counter() - start
    out = {"val_loss": result.final_val_loss, "seconds": round(seconds, 1),
           "tokens": cfg.train.steps * cfg.train.micro_batch_size * cfg.data.seq_len,
           "val_tokens": cfg.eval.batches * cfg.train.micro_batch_size * cfg.data.seq_len}
    maxvio = maxvio_last_half(os.path.join(run_dir, "metrics.jsonl"), args.steps)
    if maxvio is not None:
        out["maxvio"] = maxvio
    print(f"[{name}] val loss {result.final_val_loss:.4f}, "
          f"MaxVio {maxvio if maxvio is None else round(maxvio, 4)}, {seconds:.0f}s ({run_dir})",
          file=sys.stderr, flush=True)
    return out


def whole_validation_batches(cfg) -> int:
    """Validation batches that cover every validation window once (no wrap-around)."""
    from trainer.lm.data import build_text_data

    data = build_text_data(cfg.data, cfg.train.micro_batch_size, 0, 1, cfg.train.seed)
    return max(data.num_val_windows // cfg.train.micro_batch_size, 1)


def maxvio_last_half(metrics_path: str, steps: int) -> float | None:
    """Mean over the steps > steps/2 of the mean over MoE layers of (max - mean) / mean of that
    step's tokens per expert; None for a dense run (no loads logged)."""
    per_step = []
    with open(metrics_path) as f:
        for record in map(json.loads, f):
            loads = record.get("moe/tokens_per_expert")
            if loads is None or record["step"] <= steps / 2:
                continue
            vios = [(max(row) - sum(row) / len(row)) / (sum(row) / len(row)) for row in loads]
            per_step.append(sum(vios) / len(vios))
    return sum(per_step) / len(per_step) if per_step else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 20)
        args.eval_batches = args.eval_batches or 4
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {name: run_one(name, overrides, args) for name, overrides in RUNS.items()}
    moe, dense, aux, free = (results["moe_aux_loss"], results["dense"], results["moe_aux_loss"],
                             results["moe_aux_free"])
    summary = {
        "moe_val_loss": moe["val_loss"],
        "dense_val_loss": dense["val_loss"],
        "aux_loss": {"maxvio": aux["maxvio"], "val_loss": aux["val_loss"]},
        "aux_free": {"maxvio": free["maxvio"], "val_loss": free["val_loss"]},
        "moe_beats_dense": moe["val_loss"] < dense["val_loss"],
        "steps": args.steps,
        "tokens": moe["tokens"],
        "val_tokens": moe["val_tokens"],
        "seconds": {**{name: r["seconds"] for name, r in results.items()},
                    "total": round(time.perf_counter() - start, 1)},
        "threads": args.threads or None,
        "quick": args.quick,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
