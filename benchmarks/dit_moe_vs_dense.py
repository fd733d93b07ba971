"""DiT-MoE vs the dense DiT at equal active parameters: sample quality of two trained runs.

The two runs are recipes/dit/pretrain_digits_moe.yaml and recipes/dit/pretrain_digits_dense.yaml
(same data, objective, steps, optimizer, EMA; the dense FFN is as wide as the MoE's active experts,
top-2 routed + shared: 1.34M active parameters each). Each run's latest checkpoint is loaded into
one process (EMA weights) and sampled the same way: the same class-balanced labels, the same seeds,
the sampler and guidance of the recipe (DDPM, 250 steps, cfg 1.5) unless --sampler/--steps. The
evaluation at the end of a training run scores 500 samples once; here every seed draws
--num-samples and FD is averaged over --seeds, because one FD of a few hundred samples moves by
about a unit from seed to seed (the per-seed values are printed). Also printed: each run's final
validation loss (from its metrics.jsonl) and class accuracy.

    python benchmarks/dit_moe_vs_dense.py --moe-run RUN_A --dense-run RUN_B
    python benchmarks/dit_moe_vs_dense.py              # trains both first (2 ranks each, ~11 min each)

Last line: {"moe": {"fd": ..., "acc": ..., "val_loss": ...}, "dense": {...}, "dense_fd_no_better": bool, ...}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

RECIPES = {"moe": "recipes/dit/pretrain_digits_moe.yaml", "dense": "recipes/dit/pretrain_digits_dense.yaml"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moe-run", default="", help="trained run directory of the MoE recipe")
    p.add_argument("--dense-run", default="", help="trained run directory of the dense recipe")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "benchmarks", "dit_moe_vs_dense"),
                   help="where runs are trained when --moe-run/--dense-run are not given")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sampler", default="", help="default: the run's diffusion.sampler")
    p.add_argument("--steps", type=int, default=0, help="default: the run's diffusion.sample_steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 100 samples, 1 seed, 20 dpm_solver_pp steps")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.seeds, args.sampler, args.steps = 100, [0], "dpm_solver_pp", 20
    return args


def train(kind: str, out: str) -> str:
    run_dir = os.path.join(out, kind)
    cmd = [sys.executable, "-m", "launch.cli", "run", RECIPES[kind], "--nproc-per-node", "2", "--run-dir", run_dir,
           "--set", "logging.wandb=false", "logging.progress_bar=false"]
    print(f"[train] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir


def final_val_loss(run_dir: str) -> float | None:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [r["eval/loss"] for r in map(json.loads, f) if "eval/loss" in r]
    return losses[-1] if losses else None


def evaluate(kind: str, run_dir: str, args) -> dict:
    import torch

    from dit_samplers import load_run, sweep_run

    trainer, ckpt = load_run(run_dir, "cpu", None)
    d = trainer.cfg.diffusion
    sampler, steps = args.sampler or d.sampler, args.steps or d.sample_steps
    row = sweep_run(trainer, [(sampler, steps)], args.num_samples, args.seeds, d.objective)[0]
    total, active = trainer.param_counts
    del trainer
    torch.set_num_threads(args.threads)
    return {"run_dir": run_dir, "checkpoint": ckpt, "sampler": sampler, "steps": steps, "nfe": row["nfe"],
            "fd": row["fd"], "acc": row["acc"], "fd_per_seed": row.get("fd_per_seed", [row["fd"]]),
            "val_loss": final_val_loss(run_dir), "params_total": total, "params_active": active}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runs = {"moe": args.moe_run, "dense": args.dense_run}
    for kind in runs:
        if not runs[kind]:
            runs[kind] = train(kind, args.out)
    results = {kind: evaluate(kind, run_dir, args) for kind, run_dir in runs.items()}
    print(f"\n{'model':<6} {'params total/active':>22} {'val loss':>9} {'acc':>6} {'FD (mean)':>10}  FD per seed")
    for kind, r in results.items():
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        print(f"{kind:<6} {r['params_total']:>11,}/{r['params_active']:<10,} {val:>9} {r['acc']:>6.3f} "
              f"{r['fd']:>10.3f}  {', '.join(f'{x:.2f}' for x in r['fd_per_seed'])}")
    spread = max(statistics.pstdev(r["fd_per_seed"]) for r in results.values())
    out = {**{k: {key: r[key] for key in ("fd", "acc", "val_loss", "fd_per_seed", "params_active", "run_dir")}
              for k, r in results.items()},
           "sampler": results["moe"]["sampler"], "steps": results["moe"]["steps"], "num_samples": args.num_samples,
           "seeds": args.seeds, "dense_fd_no_better": results["dense"]["fd"] >= results["moe"]["fd"],
           "fd_seed_std": spread}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
