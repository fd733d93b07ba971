"""DiT-MoE vs the dense DiT at equal active parameters: sample quality over several training seeds.

The two recipes are recipes/dit/pretrain_digits_moe.yaml and recipes/dit/pretrain_digits_dense.yaml
(same data, objective, steps, optimizer, EMA; the dense FFN is as wide as the MoE's active experts,
top-2 routed + shared: 1.34M active parameters each). Each is trained once per --train-seeds value
(train.seed: initial weights, data order, diffusion noise; the validation split is fixed). Each run's
latest checkpoint is loaded into one process (EMA weights) and sampled the same way: the same
class-balanced labels, the same sampling seeds, the sampler and guidance of the recipe (DDPM, 250
steps, cfg 1.5) unless --sampler/--steps. Every sampling seed draws --num-samples and a run's FD is
the mean over --seeds; a model's FD is the mean over its training seeds. Two noise sources are
printed apart: the sampling spread within a run and the spread between training seeds (one
training run per model cannot tell a unit of FD from the luck of its initialisation).

    python benchmarks/dit_moe_vs_dense.py                    # trains what is missing (2 ranks, ~11 min each)
    python benchmarks/dit_moe_vs_dense.py --moe-run A B --dense-run C D     # already trained runs

Last line: {"moe": {"fd": ..., "fd_per_run": [...], "acc": ..., "val_loss": [...]}, "dense": {...},
"dense_fd_no_better": bool, "paired_fd_dense_minus_moe": [...], ...}
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
    p.add_argument("--moe-run", nargs="*", default=[], help="trained run directories of the MoE recipe")
    p.add_argument("--dense-run", nargs="*", default=[], help="trained run directories of the dense recipe")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "benchmarks", "dit_moe_vs_dense"),
                   help="where runs are trained (OUT/KIND_seedS) when --moe-run/--dense-run are not given")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sampler", default="", help="default: the run's diffusion.sampler")
    p.add_argument("--steps", type=int, default=0, help="default: the run's diffusion.sample_steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 100 samples, 1 seed, 20 dpm_solver_pp steps")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.seeds, args.sampler, args.steps = 100, [0], "dpm_solver_pp", 20
        args.train_seeds = args.train_seeds[:1]
    return args


def train(kind: str, out: str, seed: int, quick: bool) -> str:
    """OUT/KIND_seedS trained with the recipe as documented; a run that already finished is kept."""
    from trainer.checkpoint_files import checkpoint_step, latest_checkpoint
    from trainer.recipe import load_config

    run_dir = os.path.join(out, f"{kind}_seed{seed}")
    extra = ["train.steps=40", "checkpoint.every=40", "diffusion.num_samples=20", "diffusion.sample_steps=10"] if quick else []
    steps = load_config(os.path.join(ROOT, RECIPES[kind]), extra).train.steps
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and checkpoint_step(ckpt) >= steps:
        print(f"[train] reusing {ckpt}", flush=True)
        return run_dir
    cmd = [sys.executable, "-m", "launch.cli", "run", RECIPES[kind], "--nproc-per-node", "2", "--run-dir", run_dir,
           "--set", "logging.wandb=false", "logging.progress_bar=false", f"train.seed={seed}", *extra]
    print(f"[train] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir


def final_val_loss(run_dir: str) -> float | None:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [r["eval/loss"] for r in map(json.loads, f) if "eval/loss" in r]
    return losses[-1] if losses else None


def evaluate(kind: str, run_dir: str, args) -> dict:
    """Scores of one run, kept in RUN_DIR/moe_vs_dense_eval.json per (checkpoint, sampler, steps,
    samples, seeds): a later call with the same settings (more runs added) reads them back."""
    import torch

    from dit_samplers import load_run, sweep_run
    from trainer.checkpoint_files import latest_checkpoint

    cache_path = os.path.join(run_dir, "moe_vs_dense_eval.json")
    key = json.dumps([os.path.basename(latest_checkpoint(run_dir) or ""), args.sampler, args.steps, args.num_samples, args.seeds])
    cache = {}
    if os.path.isfile(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
        if key in cache:
            print(f"[eval] {run_dir}: scores of an earlier call with the same settings", flush=True)
            return cache[key]
    trainer, ckpt = load_run(run_dir, "cpu", None)
    d = trainer.cfg.diffusion
    sampler, steps = args.sampler or d.sampler, args.steps or d.sample_steps
    row = sweep_run(trainer, [(sampler, steps)], args.num_samples, args.seeds, d.objective)[0]
    total, active = trainer.param_counts
    del trainer
    torch.set_num_threads(args.threads)
    cache[key] = {"run_dir": run_dir, "checkpoint": ckpt, "sampler": sampler, "steps": steps, "nfe": row["nfe"],
                  "fd": row["fd"], "acc": row["acc"], "fd_per_seed": row.get("fd_per_seed", [row["fd"]]),
                  "val_loss": final_val_loss(run_dir), "params_total": total, "params_active": active}
    with open(cache_path, "w") as f:
        json.dump(cache, f)
    return cache[key]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runs = {"moe": args.moe_run, "dense": args.dense_run}
    for kind in runs:
        if not runs[kind]:
            runs[kind] = [train(kind, args.out, seed, args.quick) for seed in args.train_seeds]
    results = {kind: [evaluate(kind, run_dir, args) for run_dir in dirs] for kind, dirs in runs.items()}
    print(f"\n{'model':<6} {'run':<40} {'params total/active':>22} {'val loss':>9} {'acc':>6} {'FD':>8}  FD per sampling seed")
    for kind, rows in results.items():
        for r in rows:
            val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
            print(f"{kind:<6} {os.path.basename(r['run_dir']):<40} {r['params_total']:>11,}/{r['params_active']:<10,} "
                  f"{val:>9} {r['acc']:>6.3f} {r['fd']:>8.3f}  {', '.join(f'{x:.2f}' for x in r['fd_per_seed'])}")
    summary = {}
    for kind, rows in results.items():
        fds = [r["fd"] for r in rows]
        summary[kind] = {"fd": statistics.fmean(fds), "fd_per_run": fds,
                         "fd_train_seed_std": statistics.stdev(fds) if len(fds) > 1 else None,
                         "acc": statistics.fmean(r["acc"] for r in rows), "val_loss": [r["val_loss"] for r in rows],
                         "fd_per_seed": [r["fd_per_seed"] for r in rows], "params_active": rows[0]["params_active"],
                         "run_dir": [r["run_dir"] for r in rows]}
        print(f"{kind:<6} mean over {len(rows)} training run(s): FD {summary[kind]['fd']:.3f}"
              + (f" (training-seed std {summary[kind]['fd_train_seed_std']:.3f})" if len(fds) > 1 else "")
              + f", acc {summary[kind]['acc']:.3f}")
    paired = [d["fd"] - m["fd"] for m, d in zip(results["moe"], results["dense"])]
    sampling_std = max(statistics.pstdev(r["fd_per_seed"]) for rows in results.values() for r in rows)
    first = results["moe"][0]
    out = {**summary, "sampler": first["sampler"], "steps": first["steps"], "num_samples": args.num_samples,
           "seeds": args.seeds, "dense_fd_no_better": summary["dense"]["fd"] >= summary["moe"]["fd"],
           "paired_fd_dense_minus_moe": paired, "fd_sampling_std": sampling_std}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
