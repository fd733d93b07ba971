"""Production-shape drill: one CPU process builds and steps what one rank of a cluster recipe holds.

For each recipe in recipes/cluster/ (world size from the `--dry-run` command in its header) and
for rank 0 and the rank the plan says is largest, a fresh process joins a fake process group
(torch.testing._internal.distributed.fake_pg: collectives keep shapes and move no data) as that
global rank of the recipe's world, builds the run through the real `Trainer` (trainer/loop.py:
meta-device construction, FSDP / expert / pipeline parallelism, materialisation of this rank's
share, optimizer; trainer/build.py) and runs --steps optimizer steps through its `Stepper` at a
short sequence. The layout, model, parallelism and precision are the recipe's; only the shapes
of a step shrink (data.seq_len --seq-len; one sequence per micro step, or per pipeline
microbatch with pp_microbatches = the number of stages, so as many microbatches are in flight on
each stage as in production; a DiT's 2 images) and the plan is computed for those same shapes.

The fake group moves no data: received tensors hold whatever their memory held (NaN possible).
Two consequences, both confined to this script: where what a rank receives steers its control
flow (the expert-parallel count exchange, the pipeline's warm-up vote, object broadcasts), it
receives what it would if every peer behaved as it does (`simulate_peers`); and every step is
taken whatever its loss (a non-finite one would otherwise be skipped by trainer/guards.py and the
optimizer state never made).

Measured (GB, 1e9 bytes), on the rank's own tensors, CPU memory standing in for the GPU's:
    params       this rank's parameters and buffers after construction (FSDP: its shards)
    grads        its gradients when the optimizer would step (FSDP: the sharded ones)
    optimizer    AdamW's state after the steps, and a DiT's EMA
    activations  the most a step holds for backward when a forward ends (of the model, or of each
                 pipeline stage: the microbatches in flight), gradients made so far left out:
                 activations and the weights FSDP keeps gathered (`ActivationProbe`)
    peak         the most bytes in use during the steps (glibc's mallinfo2, sampled after every
                 tensor op and every 0.5 ms; tests/helpers/memory.py) above what was in use just
                 before them, plus the state held then (parameters, a DiT's EMA): what the device
                 would hold at the step's worst moment
plan_gb has the same keys from launch/plan.py for the same shapes and rank: its activations add
the plan's "gathered" working set, and include what a block holds while it recomputes (the
probe sees forwards end, not recomputes); its peak is the --dry-run total, the sum of all parts,
while in a step of one micro batch the gradients grow as backward frees the activations, so the
measured peak can stay below it by up to the smaller of the two. Where the rank's whole state cannot fit this machine
(its plan total above --budget-gb, by default the memory available now less 1.5 GB), the
optimizer is not stepped (its state comes from the plan), and if even parameters, gradients and
activations cannot fit, no step is run (only the parameters are measured); `from_plan` lists
what was taken from the plan and `peak` then adds the plan's figure for it to the measured part.

    python benchmarks/scale_drill.py                      # the three cluster recipes (~10 minutes)
    python benchmarks/scale_drill.py --recipes recipes/cluster/dit_moe_xl_8e2a_32gpu.yaml --ranks 0
    python benchmarks/scale_drill.py --recipes recipes/llm/pretrain_tiny.yaml --world 2x4 \
        --set parallel.data_parallel=fsdp parallel.ep=2      # any recipe, any world

The last line printed is one JSON object: {"recipes": {recipe file name: {"rank", "world",
"measured_gb": {"params", "grads", "optimizer", "activations", "peak"}, "plan_gb": {same keys},
"peak_vs_plan", "from_plan", "build_s", "step_s", "device_gb", "fits"}, ...}}: the entry is the
plan's largest rank; rank 0 (when it differs) is under its "other_ranks".
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GB = 1e9
KEYS = ("params", "grads", "optimizer", "activations", "peak")
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "cluster", "*.yaml")))


def recipe_world(recipe: str, world: str = "") -> tuple[int, int, float]:
    """(nnodes, nproc_per_node, GPU bytes) as the recipe's header states them, or as `world`
    ("NNODESxNPROC") says."""
    if world:
        nnodes, nproc = (int(n) for n in world.split("x"))
        return nnodes, nproc, 80 * GB
    with open(recipe) as f:
        header = f.read()
    found = re.search(r"^#\s+sparseforge run \S+ (.*--dry-run)$", header, re.M)
    if found is None:
        raise SystemExit(f"{recipe}: no '# sparseforge run ... --dry-run' line in its header")
    argv = shlex.split(found.group(1))
    device = re.search(r"GPUs of (\d+) GB", header)
    return (int(argv[argv.index("--nnodes") + 1]), int(argv[argv.index("--nproc-per-node") + 1]),
            float(device.group(1)) * GB if device else 80 * GB)


def drill_overrides(recipe: str, seq_len: int, steps: int, extra: list[str]) -> list[str]:
    """The recipe at the drill's shapes: a short sequence, one sequence per micro step or pipeline
    microbatch (as many microbatches as stages), no accumulation, nothing logged or saved; then
    `extra` (--set)."""
    from parallel.config import pp_stages_per_rank
    from trainer.recipe import read_config

    cfg = read_config(recipe, extra)  # validated with the drill's shapes, by the caller
    out = ["train.grad_accum_steps=1", f"train.steps={steps}", "train.device=cpu", "logging.wandb=false",
           "logging.progress_bar=false", "logging.heatmap_every=0", "eval.every=0", "checkpoint.enabled=false",
           "data.max_bytes=2000000"]
    if cfg.model.family == "dit":
        return out + ["train.micro_batch_size=2"] + extra
    out += [f"data.seq_len={seq_len}"]
    if cfg.parallel.pp > 1:
        stages = cfg.parallel.pp * pp_stages_per_rank(cfg.parallel)
        return out + [f"parallel.pp_microbatches={stages}", f"train.micro_batch_size={stages}"] + extra
    return out + ["train.micro_batch_size=1"] + extra


def plan_gb(memory: dict[str, int]) -> dict[str, float]:
    """The plan's bytes in the drill's keys: FSDP's gathered working set counts as activations."""
    out = {k: memory.get(k, 0) / GB for k in ("params", "grads", "optimizer")}
    out["activations"] = (memory.get("activations", 0) + memory.get("gathered", 0)) / GB
    out["peak"] = sum(memory.values()) / GB
    return {k: round(v, 6) for k, v in out.items()}


def available_bytes() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return float(info["MemAvailable"].split()[0]) * 1024


# ----------------------------------------------------------------------------------------------
# The child: one rank.


def _tensor_bytes(tensors) -> int:
    from parallel.fsdp import local_tensor

    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        local = local_tensor(t)
        key = (local.untyped_storage().data_ptr(), local.dtype)
        if key not in seen:
            seen.add(key)
            total += local.untyped_storage().nbytes()
    return total


def _state_tensors(trainer) -> list:
    """AdamW's state and a DiT's EMA copy: what the plan counts as the optimizer's."""
    import torch

    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return state + (list(trainer.ema.shadow.values()) if trainer.ema is not None else [])


class DrillGuard:
    """Stands in for trainer/guards.py's NonFiniteGuard: steps (or never steps, when the optimizer
    state cannot fit) whatever the loss, and records the gradient bytes the rank holds then."""

    def __init__(self, step_optimizer: bool):
        self.step_optimizer, self.grad_bytes = step_optimizer, 0

    def check(self, step, loss, grad_norm, model) -> bool:
        self.grad_bytes = max(self.grad_bytes, _tensor_bytes(p.grad for p in model.parameters()))
        return self.step_optimizer

    def describe_skip(self, step, loss, grad_norm) -> str:
        return f"drill step {step}: optimizer not stepped (its state would not fit this machine)"


class ActivationProbe:
    """After every forward of the rank's model (or of each of its pipeline stages): the bytes in use
    above the step's start, less the gradients made since (none before the step: the optimizer
    frees them). The largest is what the step holds for backward: activations, and the weights
    FSDP keeps gathered; under 1F1B the microbatches in flight together."""

    def __init__(self, modules, params):
        self.params, self.start, self.peak = list(params), 0, 0
        for module in modules:
            module.register_forward_hook(self._after_forward)

    def step_starts(self) -> None:
        from tests.helpers.memory import in_use

        self.start = in_use()

    def _after_forward(self, module, args, output) -> None:
        from tests.helpers.memory import in_use

        grads = _tensor_bytes(p.grad for p in self.params)
        self.peak = max(self.peak, in_use() - self.start - grads)


def simulate_peers(dist) -> None:
    """Where a rank's control flow depends on what it receives, the fake group's received bytes
    (uninitialised memory) would send it astray. Each such collective is replaced by one that still
    reaches the fake group where it moves tensors, and then fills what this rank receives as if
    every peer behaved as this rank does:
        all_to_all_single    output of the input's shape (the expert-parallel count exchange)
                             gets the input: counts received match counts sent, so the row
                             exchanges that follow have consistent sizes
        recv                 an integer message (the pipeline schedule's warm-up vote: every
                             stage, built with its shapes, votes for static metadata) reads 1
        broadcast_object_list, all_gather_object
                             this rank's own objects (the checkpoint to resume, a stage's
                             router statistics), as every rank computed the same
    """
    real_a2a, real_recv = dist.all_to_all_single, dist.recv

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        work = real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
        if output.shape == input.shape:
            output.copy_(input)
        return work

    def recv(tensor, *args, **kwargs):
        out = real_recv(tensor, *args, **kwargs)
        if not tensor.is_floating_point():
            tensor.fill_(1)
        return out

    def broadcast_object_list(objects, *args, **kwargs):
        return None

    def all_gather_object(gathered, obj, *args, **kwargs):
        gathered[:] = [obj] * len(gathered)

    dist.all_to_all_single, dist.recv = all_to_all_single, recv
    dist.broadcast_object_list, dist.all_gather_object = broadcast_object_list, all_gather_object


def run_rank(recipe: str, rank: int, args, budget: float) -> dict:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from launch.plan import memory_by_pp_rank, tokens_per_sample
    from parallel import unwrap
    from parallel.config import resolved_dp
    from tests.helpers.memory import PeakSampler, in_use
    from trainer.loop import Trainer
    from trainer.recipe import load_config

    nnodes, nproc, device_bytes = recipe_world(recipe, args.world)
    world, steps = nnodes * nproc, args.steps
    cfg = load_config(recipe, drill_overrides(recipe, args.seq_len, steps, args.set), world_size=world)
    plan = memory_by_pp_rank(cfg, world)[rank // resolved_dp(cfg.parallel, world)]
    total = sum(plan.values())
    margin = 1.15  # the drill's target tolerance, as headroom
    step_optimizer = total * margin < budget
    run_steps = step_optimizer or (total - plan["optimizer"]) * margin < budget

    # The heartbeat thread (parallel/watchdog.py) writes to a store: a local one stands in for the job's.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    heartbeat_store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    simulate_peers(dist)

    base = in_use()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir, PeakSampler() as build_meter:
        trainer = Trainer(cfg, run_dir)
    build_s = time.perf_counter() - start
    model = unwrap(trainer.model)
    params = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
    measured = {"params": params / GB}
    from_plan = []
    step_s = None
    if run_steps:
        guard = trainer.stepper.guard = DrillGuard(step_optimizer)
        probe = ActivationProbe(trainer.pipeline.stage_modules if trainer.pipeline else [model], model.parameters())
        batches = trainer.data.train_batches()
        # What the device holds when the steps start: the parameters and, for a DiT, the EMA's
        # copy (made at construction; AdamW's state comes with the first step).
        held = _tensor_bytes(_state_tensors(trainer) + list(model.parameters()) + list(model.buffers()))
        before = in_use()
        start = time.perf_counter()
        with PeakSampler() as meter:
            for step in range(1, steps + 1):
                probe.step_starts()
                trainer.stepper(batches, step)
        step_s = (time.perf_counter() - start) / steps
        peak = meter.peak - before + held
        grads = guard.grad_bytes
        if step_optimizer:
            optimizer = _tensor_bytes(_state_tensors(trainer))
        else:
            optimizer = plan["optimizer"]
            from_plan.append("optimizer")
        measured.update(grads=grads / GB, optimizer=optimizer / GB, activations=probe.peak / GB,
                        peak=(peak + (0 if step_optimizer else optimizer)) / GB)
    else:
        rest = {k: v for k, v in plan_gb(plan).items() if k not in ("params", "peak")}
        from_plan += list(rest)
        measured.update(rest, peak=measured["params"] + sum(rest.values()))
    del heartbeat_store  # served the heartbeats until here
    planned = plan_gb(plan)
    return {"rank": rank, "world": world, "measured_gb": {k: round(measured[k], 6) for k in KEYS},
            "plan_gb": planned, "peak_vs_plan": round(measured["peak"] / planned["peak"], 3),
            "from_plan": from_plan, "build_s": round(build_s, 1),
            "build_peak_gb": round((build_meter.peak - base) / GB, 3),
            "step_s": None if step_s is None else round(step_s, 1), "device_gb": device_bytes / GB,
            "fits": measured["peak"] * GB < device_bytes, "tokens_per_sample": tokens_per_sample(cfg),
            "micro_batch_size": cfg.train.micro_batch_size, "budget_gb": round(budget / GB, 1)}


# ----------------------------------------------------------------------------------------------
# The parent: every recipe, its ranks, each in a fresh process.


def drill_ranks(recipe: str, args) -> list[int]:
    """Rank 0 and the first rank of the pipeline rank the plan estimates largest."""
    from launch.plan import memory_by_pp_rank
    from parallel.config import resolved_dp
    from trainer.recipe import load_config

    nnodes, nproc, _ = recipe_world(recipe, args.world)
    cfg = load_config(recipe, drill_overrides(recipe, args.seq_len, args.steps, args.set),
                      world_size=nnodes * nproc)
    par = cfg.parallel
    if cfg.train.engine == "deepspeed":
        raise SystemExit(f"{os.path.basename(recipe)}: the drill builds the native engine only (DeepSpeed "
                         f"initialises its own communication); set train.engine=native")
    if par.data_parallel == "ddp" and par.pp == 1 and resolved_dp(par, nnodes * nproc) > 1 and cfg.train.engine == "native":
        raise SystemExit(f"{os.path.basename(recipe)}: the drill cannot run DDP (its reducer needs the values "
                         f"of the fake group's all-reduces, which carry none); set parallel.data_parallel=fsdp")
    totals = [sum(m.values()) for m in memory_by_pp_rank(cfg, nnodes * nproc)]
    largest = max(range(len(totals)), key=totals.__getitem__) * resolved_dp(cfg.parallel, nnodes * nproc)
    if args.ranks == "both":
        return sorted({0, largest}, key=lambda r: r != largest)
    return [largest] if args.ranks == "largest" else [int(r) for r in args.ranks.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--ranks", default="both", help="both (rank 0 and the plan's largest), largest, or R[,R...]")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--budget-gb", type=float, default=0.0, help="default: memory available now less 1.5 GB")
    ap.add_argument("--world", default="", metavar="NNODESxNPROC", help="default: the recipe header's")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides after the drill's")
    ap.add_argument("--child", nargs=2, metavar=("RECIPE", "RANK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        budget = args.budget_gb * GB
        print(json.dumps(run_rank(args.child[0], int(args.child[1]), args, budget)), flush=True)
        return
    results = {}
    for recipe in args.recipes:
        entries = []
        for rank in drill_ranks(recipe, args):
            budget = args.budget_gb * GB or available_bytes() - 1.5 * GB
            cmd = [sys.executable, os.path.abspath(__file__), "--child", recipe, str(rank), "--seq-len",
                   str(args.seq_len), "--steps", str(args.steps), "--budget-gb", str(budget / GB),
                   "--world", args.world, "--set", *args.set]
            env = {**os.environ, "PYTHONPATH": ROOT}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
                raise SystemExit(f"{os.path.basename(recipe)} rank {rank}: drill failed (exit {done.returncode})")
            entry = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{os.path.basename(recipe)} rank {rank}/{entry['world']}: measured {entry['measured_gb']} "
                  f"plan {entry['plan_gb']} (from plan: {entry['from_plan'] or 'nothing'}; built in "
                  f"{entry['build_s']} s)", flush=True)
            entries.append(entry)
        results[os.path.basename(recipe)] = {**entries[0], "other_ranks": entries[1:]}
    print(json.dumps({"recipes": results}))


if __name__ == "__main__":
    main()
