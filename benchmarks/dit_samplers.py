"""DiT samplers: Fréchet distance and class accuracy vs NFE, every sampler on one trained checkpoint.

What is measured: the latest checkpoint of a trained DiT run (the one `sparseforge run` writes,
whatever its number of ranks or expert-parallel size), sampled with its EMA weights by every
sampler of trainer/diffusion/samplers.py at several step counts. Every row draws the same --num-samples N
images with the same class-balanced labels (i % classes) and the same seed, i.e. the same initial
noise (and for ddpm the same per-step noise stream), through the trainer's own evaluation path
(`DiffusionTask.draw_samples` + `DiffusionTask.score`): classifier-free guidance at the run's
diffusion.cfg_scale (or --cfg-scale), x0 predictions clipped to [-1, 1] as in training-time
evaluation, then
    fd    Fréchet distance between the features of the cached digits classifier
          (trainer/diffusion/image_eval.py) of the N samples and of the whole training split;
    acc   share of samples the classifier assigns to the label they were drawn for;
    nfe   model calls per sample as the sampler reports it (a guided call of 2B rows is one);
    seconds  wall time of the sampling alone (scoring excluded).
    fid   Inception FID as well, only where trainer/diffusion/image_eval.py finds its weights on disk.
FD is biased by the sample count (fewer samples, larger FD), so every row uses the same N: compare
rows with each other, not with FDs at another N. With --seeds 0 1 ..., each row is drawn once per
seed and fd/acc are the means (fd_per_seed, acc_per_seed list them): the spread between seeds is
the noise level against which "within 10%" should be read. It is not small: on the 3000-step
pretrain_digits_moe run, at N=1000, ddpm-250's FD was 10.8, 13.3, 15.3, 14.5, 11.7 for seeds 0-4
and dpm_solver_pp-20's 11.3, 11.6, 12.2, 10.5, 14.1 (a standard deviation of ~1.5-2 FD per draw,
~15% of the value), so one seed can put a sampler on either side of the 10% line (seed 3 passes
by far, seed 4 fails); average several seeds, or raise N, before concluding.

Sweeps. DDPM-objective run (--run-dir): ddpm 250 (the reference) and 50 steps; ddim 10, 20, 50;
dpm_solver_pp (DPM-Solver++(2M), logSNR-uniform steps) 5, 10, 15, 20. Flow-matching run
(--flow-run-dir, optional): euler 10, 25, 50 and heun 5, 10, 25 steps (heun's NFE is 2·steps-1).
The target of the issue: the best dpm_solver_pp row with 10 <= NFE <= 20 has an FD at most 1.10x
that of ddpm at 250 steps (`dpm_solver_pp_within_10pct`; null when the sweep has no such row).

Loading a checkpoint in this one process: the run's config (the checkpoint's own config.yaml) with
parallel.dp/ep/pp set to 1 and train.micro_batch_size set to the global micro-batch recorded in
the checkpoint's data state (saved micro-batch x saved dp), so the restore is the trainer's exact
resume path (trainer.loop.Trainer -> trainer/checkpoint.py load_checkpoint: expert tensors
resharded onto one rank, EMA weights restored, data-position check passes). Nothing is written
into the run directory.

Without --run-dir, the script first trains recipes/dit/pretrain_digits_moe.yaml itself, in this one
process, into runs/benchmarks/dit_samplers: the recipe's 3000 steps (--train-steps), micro-batch
128 = the recipe's global batch at its documented 2 ranks, its own end-of-training sample check
cut to 100 samples. That took ~15 minutes on this 2-core CPU box; a run directory whose
checkpoint has reached the step count is reused, a partial one resumed. Pass --run-dir to sample a
run you trained yourself (e.g. `sparseforge run recipes/dit/pretrain_digits_moe.yaml
--nproc-per-node 2 --run-dir RUN`).

    python benchmarks/dit_samplers.py --run-dir RUN                  # N=1000, ~10 min on 2 CPU cores
    python benchmarks/dit_samplers.py --run-dir RUN --flow-run-dir FLOW_RUN --seeds 0 1
    python benchmarks/dit_samplers.py                                # trains first (see above)
    python benchmarks/dit_samplers.py --quick [--run-dir RUN]        # smoke run, < 1 minute

--quick: 50 samples and a tiny sweep (ddpm 20 as the reference, ddim 5, dpm_solver_pp 5 and 10;
euler 5, heun 3 with a flow run) on the given run directories; without --run-dir it trains a
30-step DDPM run (and, without --flow-run-dir, a 30-step flow run) into runs/benchmarks/
dit_samplers_quick/ first (replaced every time). Its numbers only show that the path works.

The last line printed is one JSON object: {"rows": [...], "reference": {...},
"dpm_solver_pp_within_10pct": ..., "num_samples": N, "run_dir": ..., ...}.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DDPM_RECIPE = os.path.join(ROOT, "recipes", "dit", "pretrain_digits_moe.yaml")
FLOW_RECIPE = os.path.join(ROOT, "recipes", "dit", "pretrain_digits_flow.yaml")
DEFAULT_OUT = os.path.join(ROOT, "runs", "benchmarks", "dit_samplers")
QUICK_OUT = os.path.join(ROOT, "runs", "benchmarks", "dit_samplers_quick")
# (sampler, steps); the reference is the ddpm row with the most steps.
DDPM_SWEEP = [("ddpm", 250), ("ddpm", 50), ("ddim", 10), ("ddim", 20), ("ddim", 50),
              ("dpm_solver_pp", 5), ("dpm_solver_pp", 10), ("dpm_solver_pp", 15), ("dpm_solver_pp", 20)]
FLOW_SWEEP = [("euler", 10), ("euler", 25), ("euler", 50), ("heun", 5), ("heun", 10), ("heun", 25)]
QUICK_DDPM_SWEEP = [("ddpm", 20), ("ddim", 5), ("dpm_solver_pp", 5), ("dpm_solver_pp", 10)]
QUICK_FLOW_SWEEP = [("euler", 5), ("heun", 3)]
TARGET_NFE = (10, 20)  # DPM-Solver++ within 10% of the reference FD somewhere in this NFE range
TARGET_RATIO = 1.10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default=None,
                   help="a trained DDPM-objective DiT run (default: train one into runs/benchmarks/dit_samplers)")
    p.add_argument("--flow-run-dir", default=None, help="optional: a trained flow-matching DiT run")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per row (the same N for every row)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="sampling seeds; with several, each row is drawn per seed and fd/acc averaged")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the run's diffusion.cfg_scale)")
    p.add_argument("--sweep", default=None,
                   help="override the DDPM-objective sweep: comma-separated sampler:steps, e.g. "
                        "ddpm:250,dpm_solver_pp:10 (the ddpm row with the most steps is the reference)")
    p.add_argument("--flow-sweep", default=None, help="override the flow sweep, e.g. euler:50,heun:10")
    p.add_argument("--train-steps", type=int, default=0,
                   help="without --run-dir: training steps of the run trained first (0: the recipe's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: 50 samples, a tiny sweep (< 1 minute)")
    return p.parse_args(argv)


def parse_sweep(text: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, steps = item.partition(":")
        if not steps.isdigit():
            raise SystemExit(f"--sweep: {item!r} is not sampler:steps")
        out.append((name, int(steps)))
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- training (no --run-dir)

def train_run(recipe: str, run_dir: str, overrides: list[str], replace: bool = False) -> None:
    """Train `recipe` in this process into run_dir, unless its checkpoint already reached the end."""
    from trainer.checkpoint_files import latest_checkpoint
    from trainer.recipe import load_config
    from trainer.loop import train

    if replace:
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(recipe, ["logging.wandb=false", "logging.progress_bar=false", *overrides], world_size=1)
    done = latest_checkpoint(run_dir)
    if done and int(os.path.basename(done).split("_")[1]) >= cfg.train.steps:
        log(f"[train] {run_dir} already holds {os.path.basename(done)}: reused")
        return
    log(f"[train] {os.path.relpath(recipe, ROOT)}: {cfg.train.steps} steps, 1 process -> {run_dir}")
    start = time.perf_counter()
    train(cfg, run_dir)
    log(f"[train] done in {time.perf_counter() - start:.0f}s")
    gc.collect()


# ----------------------------------------------------------------------------- loading a run

def load_run(run_dir: str, device: str, cfg_scale: float | None):
    """(trainer, checkpoint path): the run's latest checkpoint restored into one process, EMA included."""
    import torch

    from trainer.checkpoint_files import latest_checkpoint
    from trainer.recipe import load_config
    from trainer.loop import Trainer

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("dit_samplers.py runs as one process (do not launch it with torchrun)")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"{run_dir}: no complete checkpoint under {os.path.join(run_dir, 'checkpoints')}; "
                         f"pass --run-dir of a trained DiT run (or none, to train one first)")
    config_path = os.path.join(ckpt, "config.yaml")
    if not os.path.isfile(config_path):
        config_path = os.path.join(run_dir, "config.yaml")
    extra = torch.load(os.path.join(ckpt, "extra_rank0.pt"), weights_only=False, map_location="cpu")
    global_batch = int(extra["data"]["global_batch_size"])  # saved micro-batch x saved dp
    overrides = ["parallel.dp=1", "parallel.ep=1", "parallel.pp=1", "parallel.ep_overlap=none",
                 f"train.micro_batch_size={global_batch}", f"train.device={device}", "logging.wandb=false",
                 "logging.progress_bar=false"]
    if cfg_scale is not None:
        overrides.append(f"diffusion.cfg_scale={cfg_scale}")
    cfg = load_config(config_path, overrides, world_size=1)
    # DCP's note that it loads in a single process without a process group: intended here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
    if cfg.model.family != "dit":
        raise SystemExit(f"{run_dir}: model.family is {cfg.model.family!r}, not a DiT run")
    trainer = Trainer(cfg, run_dir, resume_from=ckpt)
    log(f"[load] {ckpt}: step {trainer.step}, saved on {extra.get('world_size')} rank(s), global micro-batch "
        f"{global_batch}; objective {cfg.diffusion.objective}, EMA after {int(trainer.ema.num_updates)} updates "
        f"(decay {cfg.diffusion.ema_decay}), cfg scale {cfg.diffusion.cfg_scale}")
    return trainer, ckpt


def sweep_run(trainer, sweep: list[tuple[str, int]], num_samples: int, seeds: list[int], objective: str) -> list[dict]:
    """One row per (sampler, steps): N samples per seed with the EMA weights, scored."""
    import torch

    task, model = trainer.task, trainer.unwrapped_model
    model.eval()
    rows = []
    with trainer.ema.applied():
        for sampler, steps in sweep:
            fds, accs, fids, secs, nfes = [], [], [], [], set()
            for seed in seeds:
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                samples, labels, nfe = task.draw_samples(model, num_samples, sampler, steps, seed=seed)
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize()
                secs.append(time.perf_counter() - start)
                samples, labels = samples[:num_samples], labels[:num_samples]
                scores = task.score(samples, labels)
                fds.append(scores["fd"])
                accs.append(scores["acc"])
                if "fid" in scores:  # Inception FID, only where its weights are on this machine
                    fids.append(scores["fid"])
                nfes.add(nfe)
            row = {"objective": objective, "sampler": sampler, "steps": steps, "nfe": nfes.pop(),
                   "fd": statistics.fmean(fds), "acc": statistics.fmean(accs),
                   "seconds": round(statistics.fmean(secs), 2)}
            if fids:
                row["fid"] = round(statistics.fmean(fids), 4)
            if len(seeds) > 1:
                row["fd_per_seed"] = [round(x, 4) for x in fds]
                row["acc_per_seed"] = [round(x, 4) for x in accs]
            rows.append(row)
            log(f"[{objective}] {sampler:>14} {steps:>4} steps, {row['nfe']:>4} NFE: FD {row['fd']:.3f}, "
                f"acc {row['acc']:.3f}, {row['seconds']:.1f}s/seed")
    return rows


def release(trainer) -> None:
    del trainer
    gc.collect()


# ----------------------------------------------------------------------------- report

def print_table(rows: list[dict], ref_fd: float | None) -> None:
    print(f"{'objective':<10}{'sampler':<15}{'steps':>6}{'NFE':>6}{'FD':>10}{'FD/ref':>8}{'acc':>8}{'seconds':>9}")
    for r in rows:
        ratio = f"{r['fd'] / ref_fd:.3f}" if ref_fd and r["objective"] != "flow" else "-"
        spread = ""
        if "fd_per_seed" in r:
            spread = "  FD per seed " + ", ".join(f"{x:.3f}" for x in r["fd_per_seed"])
        print(f"{r['objective']:<10}{r['sampler']:<15}{r['steps']:>6}{r['nfe']:>6}{r['fd']:>10.3f}{ratio:>8}"
              f"{r['acc']:>8.3f}{r['seconds']:>9.1f}{spread}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.quick:
        args.num_samples = min(args.num_samples, 50)
    ddpm_sweep = parse_sweep(args.sweep) if args.sweep else (QUICK_DDPM_SWEEP if args.quick else DDPM_SWEEP)
    flow_sweep = parse_sweep(args.flow_sweep) if args.flow_sweep else (QUICK_FLOW_SWEEP if args.quick else FLOW_SWEEP)

    run_dir, flow_run_dir = args.run_dir, args.flow_run_dir
    if run_dir is None and args.quick:
        tiny = ["train.steps=30", "optim.warmup_steps=5", "diffusion.num_samples=10", "diffusion.sample_steps=5",
                "logging.heatmap_every=0", "train.log_every=10"]
        run_dir = os.path.join(QUICK_OUT, "ddpm")
        train_run(DDPM_RECIPE, run_dir, tiny, replace=True)
        if flow_run_dir is None:
            flow_run_dir = os.path.join(QUICK_OUT, "flow")
            train_run(FLOW_RECIPE, flow_run_dir, tiny, replace=True)
    elif run_dir is None:
        run_dir = DEFAULT_OUT
        overrides = ["train.micro_batch_size=128", "diffusion.num_samples=100"]
        if args.train_steps:
            overrides.append(f"train.steps={args.train_steps}")
        train_run(DDPM_RECIPE, run_dir, overrides)

    trainer, ckpt = load_run(run_dir, args.device, args.cfg_scale)
    cfg_scale, step = trainer.cfg.diffusion.cfg_scale, trainer.step
    if trainer.cfg.diffusion.objective == "flow":
        raise SystemExit(f"{run_dir} is a flow-matching run: pass it as --flow-run-dir, and a DDPM run as --run-dir")
    rows = sweep_run(trainer, ddpm_sweep, args.num_samples, args.seeds, trainer.cfg.diffusion.objective)
    release(trainer)
    flow_info = None
    if flow_run_dir:
        flow_trainer, flow_ckpt = load_run(flow_run_dir, args.device, args.cfg_scale)
        if flow_trainer.cfg.diffusion.objective != "flow":
            raise SystemExit(f"--flow-run-dir {flow_run_dir}: objective is {flow_trainer.cfg.diffusion.objective!r}, "
                             f"not flow")
        flow_info = {"run_dir": os.path.abspath(flow_run_dir), "checkpoint_step": flow_trainer.step,
                     "cfg_scale": flow_trainer.cfg.diffusion.cfg_scale}
        rows += sweep_run(flow_trainer, flow_sweep, args.num_samples, args.seeds, "flow")
        release(flow_trainer)

    ddpm_rows = [r for r in rows if r["sampler"] == "ddpm"]
    ref = max(ddpm_rows, key=lambda r: r["steps"]) if ddpm_rows else None
    ref_fd = ref["fd"] if ref else None
    for r in rows:
        r["fd"], r["acc"] = round(r["fd"], 4), round(r["acc"], 4)
        if ref_fd and r["objective"] != "flow":
            r["fd_over_reference"] = round(r["fd"] / ref_fd, 4)
    print()
    print(f"{args.num_samples} samples per row, seeds {args.seeds}, cfg scale {cfg_scale}, EMA weights; "
          f"{ckpt} (step {step})" + (f"; flow: {flow_info['run_dir']} (step {flow_info['checkpoint_step']})"
                                     if flow_info else ""))
    print_table(rows, ref_fd)
    lo, hi = TARGET_NFE
    target_rows = [r for r in rows if r["sampler"] == "dpm_solver_pp" and lo <= r["nfe"] <= hi]
    within, within_per_seed = None, None
    if ref_fd is not None and target_rows:
        best = min(target_rows, key=lambda r: r["fd"])
        within = best["fd"] <= TARGET_RATIO * ref_fd
        print(f"\nbest dpm_solver_pp at {lo}-{hi} NFE: FD {best['fd']:.3f} at {best['nfe']} NFE = "
              f"{best['fd'] / ref_fd:.3f} x ddpm-{ref['steps']} FD {ref_fd:.3f}: "
              f"{'within' if within else 'NOT within'} {TARGET_RATIO - 1:.0%}")
        if len(args.seeds) > 1:  # the same check on each seed's draws alone
            within_per_seed = [min(r["fd_per_seed"][i] for r in target_rows) <= TARGET_RATIO * ref["fd_per_seed"][i]
                               for i in range(len(args.seeds))]
            print(f"per seed {args.seeds}: {within_per_seed}")
    result = {
        "rows": rows,
        "reference": ({"sampler": "ddpm", "steps": ref["steps"], "nfe": ref["nfe"], "fd": ref["fd"], "acc": ref["acc"]}
                      if ref else None),
        "dpm_solver_pp_within_10pct": within,
        "dpm_solver_pp_within_10pct_per_seed": within_per_seed,
        "num_samples": args.num_samples,
        "seeds": args.seeds,
        "cfg_scale": cfg_scale,
        "run_dir": os.path.abspath(run_dir),
        "checkpoint_step": step,
        "flow": flow_info,
        "device": str(torch.device("cuda" if args.device == "cuda" or (args.device == "auto"
                                                                       and torch.cuda.is_available()) else "cpu")),
        "threads": torch.get_num_threads(),
        "seconds_total": round(time.perf_counter() - start, 1),
        "quick": args.quick,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
