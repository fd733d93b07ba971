"""Expert-pruning criteria against random choices, and DARE / DAREx-q on a fine-tuning delta.

Every compression is a real prune run of the trainer (`trainer.loop.train` on a prune recipe, one
process): load the checkpoint, evaluate, calibrate on the recipe's training data, compress,
evaluate, then a short recovery fine-tune (--recovery-steps, the recipe's learning rate) and its
final evaluation. All runs of a part evaluate on the same validation batches.

LLM (default):
    base       recipes/llm/pretrain_tiny.yaml as documented (2 ranks, 300 steps), or --run DIR
    finetune   recipes/llm/finetune_pydoc.yaml: every weight of the base fine-tuned on another
               corpus (data.source=pydoc, English prose), or --finetune-run DIR
    part A     the base, stdlib validation: prune 25% and 50% of the experts of every layer (per-layer
               budget) by frequency, gate_mass, reap, naee and random (--seeds seeds); val loss
               before (= dense_val_loss), after, after the recovery fine-tune (on stdlib)
    part B     the fine-tune, pydoc validation: router_norm (router-row norm change against the base,
               the checkpoint before fine-tuning), reap and random (--seeds) at 25% and 50%, recovery
               on pydoc
    DARE       each fine-tune's delta to the base (finetune_pydoc.yaml at --dare-lrs: the recipe's
               3e-4, and lighter 1e-4, 3e-5; each one's delta size printed): DARE p=0.9 (--dare-seeds
               drop masks) against the unpruned fine-tune (target: within 2%), DAREx-q p=0.99 (q tuned
               on one calibration batch) vs DARE p=0.99; pydoc validation, no recovery (training would
               refill the delta)
DiT (--dit): recipes/dit/pretrain_digits_moe.yaml trained for --dit-steps (or --dit-run DIR), pruned
    like part A (EMA weights) with FD and class accuracy of --dit-samples DDIM samples (fixed seed)
    before, after and after --dit-recovery-steps.

"Beats random" compares a criterion's val loss (FD for the DiT) with the mean over the random seeds
at equal sparsity, before and after recovery; the table prints the random seeds' spread too.

    python benchmarks/prune_compare.py                 # LLM, ~20 min on 2 cores (training included)
    python benchmarks/prune_compare.py --run runs/pretrain_tiny --finetune-run runs/finetune_pydoc
    python benchmarks/prune_compare.py --dit           # the DiT part, ~25 min
    python benchmarks/prune_compare.py --quick         # smoke run, ~3 min

Last line: {"rows": [{"criterion": "reap", "sparsity": 0.25, "val_loss": ..., "val_loss_recovered": ...},
...], "dense_val_loss": ..., "finetune": {...}, "dare": {...}, ...} (--dit: rows with fd, dense_fd).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PRUNE_LLM = "recipes/llm/prune_experts.yaml"
PRUNE_DIT = "recipes/dit/prune_experts.yaml"
DARE = "recipes/llm/dare.yaml"
CRITERIA_A = ("frequency", "gate_mass", "reap", "naee")
CRITERIA_B = ("router_norm", "reap")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="", help="a trained pretrain_tiny run directory (its latest checkpoint)")
    p.add_argument("--finetune-run", default="", help="a trained finetune_pydoc run directory of that base")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "benchmarks", "prune_compare"))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--seeds", type=int, default=10,
                   help="random-choice seeds per sparsity (one 3-seed mean swung by 0.1 in val loss at 50%%)")
    p.add_argument("--recovery-seeds", type=int, default=3,
                   help="random seeds below this one also get the recovery fine-tune (the rest: pruned and "
                        "evaluated only, which is seconds instead of minutes)")
    p.add_argument("--dare-seeds", type=int, default=3, help="DARE / DAREx-q drop-mask seeds")
    p.add_argument("--recovery-steps", type=int, default=40)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=16, help="stdlib validation batches of 16 sequences")
    p.add_argument("--dare-lrs", type=float, nargs="+", default=[3e-4, 1e-4, 3e-5],
                   help="fine-tunes compressed by DARE / DAREx-q: finetune_pydoc.yaml at these learning rates "
                        "(the first, the recipe's, is --finetune-run when given and part B's checkpoint)")
    p.add_argument("--parts", nargs="+", choices=("pretrain", "finetune", "dare"), default=["pretrain", "finetune", "dare"],
                   help="LLM parts to run: A (pretrain), B (finetune), DARE")
    p.add_argument("--dit", action="store_true", help="the DiT part instead of the LLM parts")
    p.add_argument("--dit-run", default="", help="a trained pretrain_digits_moe run directory")
    p.add_argument("--dit-steps", type=int, default=1500)
    p.add_argument("--dit-recovery-steps", type=int, default=150)
    p.add_argument("--dit-samples", type=int, default=300)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows an interrupted run of the same settings finished (their result.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny training, one seed, few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.recovery_seeds, args.dare_seeds = 1, 1, 1
        args.recovery_steps, args.calib_batches, args.eval_batches = 4, 2, 2
        args.dit_steps, args.dit_recovery_steps, args.dit_samples = 40, 4, 20
    return args


def latest(run_dir: str) -> str:
    from trainer.checkpoint_files import latest_checkpoint

    path = latest_checkpoint(run_dir)
    if path is None:
        sys.exit(f"prune_compare: no complete checkpoint in {run_dir}")
    return path


def delta_size(base_ckpt: str, ft_ckpt: str) -> dict:
    """How far a fine-tune moved from its base: ‖Δ‖/‖W_base‖ over all weights, mean and max |Δ|.
    DARE's drop-and-rescale keeps the output only while the delta is small (the DARE paper: SFT
    deltas of a few 1e-3); these numbers say which regime each fine-tune is in."""
    import torch

    from trainer.checkpoint import read_model_state

    base, ft = read_model_state(base_ckpt), read_model_state(ft_ckpt)
    sq_d = sq_w = abs_sum = max_abs = 0.0
    count = 0
    for key, weight in ft.items():
        if key not in base or not torch.is_floating_point(weight):
            continue
        delta = weight.double() - base[key].double()
        sq_d += float((delta ** 2).sum())
        sq_w += float((base[key].double() ** 2).sum())
        abs_sum += float(delta.abs().sum())
        max_abs = max(max_abs, float(delta.abs().max()))
        count += delta.numel()
    return {"rel_norm": (sq_d / sq_w) ** 0.5, "mean_abs": abs_sum / count, "max_abs": max_abs}


def train_cli(recipe: str, run_dir: str, overrides: list[str], reuse: bool = False) -> str:
    """Train a recipe as documented (2 ranks, the real CLI) into `run_dir`; its latest checkpoint.
    reuse (--resume): a run directory that already holds a checkpoint is kept as it is, because the
    rows resumed from result.json were measured against it."""
    from trainer.checkpoint_files import latest_checkpoint

    kept = latest_checkpoint(run_dir) if reuse else None
    if kept is not None:
        print(f"[train] reusing {kept}", file=sys.stderr, flush=True)
        return kept
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "launch.cli", "run", recipe, "--nproc-per-node", "2", "--run-dir", run_dir,
           "--set", "logging.wandb=false", "logging.progress_bar=false", *overrides]
    print(f"[train] {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)  # stdout: the table and the JSON line only
    return latest(run_dir)


def prune_run(name: str, recipe: str, overrides: list[str], args) -> dict:
    """One prune run (one process): its report plus the val loss (and FD) after recovery."""
    from trainer.recipe import load_config
    from trainer.loop import train

    run_dir = os.path.join(args.out, "runs", name)
    done = os.path.join(run_dir, "result.json")
    if args.resume and os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    shutil.rmtree(run_dir, ignore_errors=True)  # never resume a previous benchmark run's training
    common = ["logging.wandb=false", "logging.progress_bar=false", "logging.heatmap_every=0", "eval.every=0",
              "checkpoint.enabled=false", f"prune.calib_batches={args.calib_batches}", "train.log_every=10"]
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the table and the JSON line only
        result = train(load_config(recipe, common + overrides), run_dir)
    with open(os.path.join(run_dir, "prune_report.json")) as f:
        report = json.load(f)
    out = {"before": report["before"], "after": report["after"], "seconds": round(time.perf_counter() - start, 1)}
    if result.final_step > 0:
        out["recovered"] = {"val_loss": result.final_val_loss,
                            **{k.split("/", 1)[1]: v for k, v in (result.final_eval or {}).items()}}
    for key in ("reference", "delta", "experts_after"):
        if key in report:
            out[key] = report[key]
    print(f"[{name}] val loss {report['before']['val_loss']:.4f} -> {report['after']['val_loss']:.4f}"
          + (f" -> {out['recovered']['val_loss']:.4f} recovered" if "recovered" in out else "")
          + (f"; FD {report['before']['fd']:.2f} -> {report['after']['fd']:.2f}" if "fd" in report["after"] else "")
          + (f" -> {out['recovered']['fd']:.2f}" if "fd" in out.get("recovered", {}) else "")
          + f" ({out['seconds']:.0f}s)", file=sys.stderr, flush=True)
    with open(done, "w") as f:
        json.dump(out, f)
    return out


def criteria_rows(tag: str, recipe: str, ckpt: str, criteria, overrides: list[str], args, metric="val_loss",
                  recovery_steps: int = 0) -> tuple[list[dict], dict]:
    """Prune `ckpt` at every sparsity with each criterion and each random seed."""
    rows, before = [], None
    for s in args.sparsities:
        runs = [(c, None) for c in criteria] + [("random", seed) for seed in range(args.seeds)]
        for criterion, seed in runs:
            recover = seed is None or seed < args.recovery_seeds
            extra = [f"prune.checkpoint={ckpt}", f"prune.criterion={criterion}", f"prune.sparsity={s}",
                     f"train.steps={recovery_steps if recover else 0}"] + ([f"prune.seed={seed}"] if seed is not None else [])
            name = f"{tag}_{criterion}{'' if seed is None else seed}_{int(s * 100)}"
            r = prune_run(name, recipe, overrides + extra, args)
            before = r["before"]
            row = {"checkpoint": tag, "criterion": criterion, "sparsity": s, "seed": seed,
                   "val_loss": r["after"]["val_loss"], "val_loss_recovered": r.get("recovered", {}).get("val_loss")}
            if metric == "fd":
                row.update(fd=r["after"]["fd"], acc=r["after"]["acc"], fd_recovered=r.get("recovered", {}).get("fd"),
                           acc_recovered=r.get("recovered", {}).get("acc"))
            rows.append(row)
    return rows, before


def beats_random(rows: list[dict], keys=("val_loss", "val_loss_recovered")) -> dict:
    """Per (checkpoint, sparsity, criterion): lower than the random seeds' mean, per key."""
    out = {}
    for tag in sorted({r["checkpoint"] for r in rows}):
        for s in sorted({r["sparsity"] for r in rows}):
            group = [r for r in rows if r["checkpoint"] == tag and r["sparsity"] == s]
            rand = [r for r in group if r["criterion"] == "random"]
            for r in group:
                if r["criterion"] == "random":
                    continue
                out[f"{tag}/{r['criterion']}/{s}"] = {
                    k: r[k] < statistics.mean(x[k] for x in rand if x.get(k) is not None)
                    for k in keys if r.get(k) is not None and any(x.get(k) is not None for x in rand)}
    return out


def print_table(rows: list[dict], before: dict, keys=("val_loss", "val_loss_recovered")) -> None:
    print(f"\n{'checkpoint':<10} {'criterion':<12} {'sparsity':>8}  " + "  ".join(f"{k:>26}" for k in keys))
    print(f"{'':<10} {'(unpruned)':<12} {'0':>8}  " + "  ".join(f"{before[k.replace('_recovered', '')]:>26.4f}"
                                                              for k in keys[:1]))
    for tag in sorted({r["checkpoint"] for r in rows}, key=lambda t: [r["checkpoint"] for r in rows].index(t)):
        for s in sorted({r["sparsity"] for r in rows}):
            group = [r for r in rows if r["checkpoint"] == tag and r["sparsity"] == s]
            for r in group:
                if r["criterion"] != "random":
                    print(f"{tag:<10} {r['criterion']:<12} {s:>8.2f}  " + "  ".join(
                        f"{r[k]:>26.4f}" if r.get(k) is not None else f"{'-':>26}" for k in keys))
            rand = [r for r in group if r["criterion"] == "random"]
            cells = []
            for k in keys:
                vals = [r[k] for r in rand if r.get(k) is not None]
                cells.append(f"{statistics.mean(vals):.4f} [{min(vals):.3f},{max(vals):.3f}] n={len(vals)}" if vals else "-")
            print(f"{tag:<10} {f'random x{len(rand)}':<12} {s:>8.2f}  " + "  ".join(f"{c:>26}" for c in cells))


def llm(args) -> dict:
    quick = ["train.steps=20", "data.max_bytes=300000", "checkpoint.every=20"] if args.quick else []
    base = latest(args.run) if args.run else train_cli("recipes/llm/pretrain_tiny.yaml",
                                                       os.path.join(args.out, "pretrain_tiny"), quick,
                                                       reuse=args.resume)
    if args.finetune_run:
        finetune = latest(args.finetune_run)
    else:
        finetune = train_cli("recipes/llm/finetune_pydoc.yaml", os.path.join(args.out, "finetune_pydoc"),
                             [f"peft.base={base}"] + (["train.steps=10", "checkpoint.every=10"] if args.quick else []),
                             reuse=args.resume)
    stdlib = [f"eval.batches={args.eval_batches}", "train.micro_batch_size=16"]
    stdlib += ["data.max_bytes=300000"] if args.quick else []
    pydoc = ["data.source=pydoc", "data.max_bytes=0", "eval.batches=3", "train.micro_batch_size=16"]
    rows_a, before_a, rows_b, before_b, dare = [], {}, [], {}, {}
    if "pretrain" in args.parts:
        rows_a, before_a = criteria_rows("pretrain", PRUNE_LLM, base, CRITERIA_A, stdlib, args,
                                         recovery_steps=args.recovery_steps)
    if "finetune" in args.parts:
        rows_b, before_b = criteria_rows("finetune", PRUNE_LLM, finetune, CRITERIA_B,
                                         pydoc + [f"prune.reference={base}"], args, recovery_steps=args.recovery_steps)
    # DARE / DAREx-q on each fine-tune's delta to the base.
    base_loss = None
    for i, lr in enumerate(args.dare_lrs if "dare" in args.parts else ()):
        ckpt = finetune if i == 0 else train_cli(
            "recipes/llm/finetune_pydoc.yaml", os.path.join(args.out, f"finetune_pydoc_lr{lr:g}"),
            [f"peft.base={base}", f"optim.lr={lr}"] + (["train.steps=10", "checkpoint.every=10"] if args.quick else []),
            reuse=args.resume)
        dare_common = [f"prune.checkpoint={ckpt}", f"prune.reference={base}", "prune.calib_batches=1"] + pydoc
        entry = {"checkpoint": ckpt, "delta_size": delta_size(base, ckpt)}
        for method, p in (("dare", 0.9), ("dare", 0.99), ("darex", 0.99)):
            runs = [prune_run(f"lr{lr:g}_{method}_{p}_seed{seed}", DARE, dare_common + [
                f"prune.method={method}", f"prune.drop_rate={p}", f"prune.seed={seed}"], args) for seed in range(args.dare_seeds)]
            losses = [r["after"]["val_loss"] for r in runs]
            entry["finetune_val_loss"], base_loss = runs[0]["before"]["val_loss"], runs[0]["reference"]["val_loss"]
            entry[f"{method}_p{p}"] = {"val_loss": losses, "mean_val_loss": statistics.mean(losses),
                                       "rel_to_finetune": statistics.mean(losses) / entry["finetune_val_loss"] - 1.0,
                                       "q": [r["delta"]["q"] for r in runs]}
        entry["dare_p0.9_within_2pct"] = entry["dare_p0.9"]["rel_to_finetune"] <= 0.02
        entry["darex_beats_dare_p0.99"] = entry["darex_p0.99"]["mean_val_loss"] < entry["dare_p0.99"]["mean_val_loss"]
        dare[f"lr{lr:g}"] = entry
    if rows_a or rows_b:
        print_table(rows_a + rows_b, before_a or before_b)
    if before_b:
        print(f"\nfine-tune on pydoc, unpruned: val loss {before_b['val_loss']:.4f}")
    if dare:
        print(f"\nDARE / DAREx-q on fine-tuning deltas (pydoc val loss; the base: {base_loss:.4f}):")
    for name, entry in dare.items():
        size = entry["delta_size"]
        print(f"fine-tune {name}: {entry['finetune_val_loss']:.4f} (delta: ‖Δ‖/‖W_base‖ {size['rel_norm']:.3f}, "
              f"mean |Δ| {size['mean_abs']:.5f}, max |Δ| {size['max_abs']:.4f})")
        for key in ("dare_p0.9", "dare_p0.99", "darex_p0.99"):
            e = entry[key]
            print(f"  {key:<12} val loss {e['mean_val_loss']:.4f} ({100 * e['rel_to_finetune']:+.2f}% vs the fine-tune; "
                  f"seeds {', '.join(f'{v:.4f}' for v in e['val_loss'])}; q {', '.join(f'{q:.3f}' for q in e['q'])})")
    return {"rows": rows_a + rows_b, "dense_val_loss": before_a.get("val_loss"),
            "finetune": {"val_loss": before_b.get("val_loss"), "base_val_loss": base_loss, "checkpoint": finetune},
            "dare": dare, "beats_random": beats_random(rows_a + rows_b), "base_checkpoint": base}


def dit(args) -> dict:
    steps = [f"train.steps={args.dit_steps}", f"checkpoint.every={args.dit_steps}",
             "diffusion.num_samples=20" if args.quick else "diffusion.num_samples=100", "diffusion.sample_steps=50",
             "diffusion.sampler=ddim"]
    base = latest(args.dit_run) if args.dit_run else train_cli("recipes/dit/pretrain_digits_moe.yaml",
                                                               os.path.join(args.out, "pretrain_digits_moe"), steps,
                                                               reuse=args.resume)
    sampling = [f"diffusion.num_samples={args.dit_samples}", "diffusion.sampler=ddim", "diffusion.sample_steps=50"]
    rows, before = criteria_rows("dit", PRUNE_DIT, base, CRITERIA_A, sampling, args, metric="fd",
                                 recovery_steps=args.dit_recovery_steps)
    keys = ("val_loss", "val_loss_recovered", "fd", "fd_recovered")
    print_table(rows, before, keys)
    return {"rows": rows, "dense_val_loss": before["val_loss"], "dense_fd": before["fd"], "dense_acc": before["acc"],
            "beats_random": beats_random(rows, keys), "base_checkpoint": base}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    summary = dit(args) if args.dit else llm(args)
    summary.update(part="dit" if args.dit else "llm", seconds=round(time.perf_counter() - start, 1), quick=args.quick, seeds=args.seeds,
                   recovery_steps=args.dit_recovery_steps if args.dit else args.recovery_steps)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
