"""Expert-parallel communication overlap on a cluster in a box: how much all-to-all each strategy
hides, against DeepSpeed-MoE, per MoE layer and end to end.

Setup: tests/helpers/cluster_box.py makes 2 hosts (network namespaces) x 2 ranks, a real c10d torchrun
rendezvous across them, gloo bound to each host's link, every host link limited both ways by tc.

1. MoE layer, forward + backward (the input needs a gradient, as inside a model, so backward
   reverses both exchanges), fp32, one torch thread per rank. D=256, E=8 top-2, expert ffn 512,
   one shared expert of ffn 512 (DeepSeek/Qwen style, so shared_expert has work to hide), 2048
   tokens per rank (the tiny recipe's 16 x 128 per micro step). Expert parallel over 2 ranks, one
   on each host: the ep groups are {local rank i of host 0, local rank i of host 1}, so every
   all-to-all crosses the limited link and both ep groups of a host share it. Variants, all on
   identical weights and inputs:
     none, async, chunked, shared_expert, combinable   our AllToAllDispatcher (parallel.ep_overlap);
                  chunked and combinable at 2, 4 and 8 chunks (the row per strategy: its fastest)
     local        t_local: the same per-rank work without communication: our layer on one rank
                  with the rank's shard (E/2 experts, their router rows, the shared expert) and
                  its own tokens through the LocalDispatcher. With balanced routing that is the
                  EP rank's work exactly: the router, permute and combine of T·K rows, T·K rows
                  (the number it would receive) through E/2 experts, the shared expert.
     deepspeed    deepspeed.moe.layer.MoE, ep_size=2, drop_tokens=False, its strided ("data before
                  expert") groups, which are the same cross-host pairs (checked); the shared
                  expert as its residual MLP (use_residual). deepspeed_local: ep_size=1, the
                  rank's shard.
   A step's time is the slowest rank's; every repeat runs every variant once (order rotated per
   repeat), each after a barrier; medians over repeats. Also printed per variant: the forward
   alone, and the CPU time of all ranks (gloo's threads included) over the cores.
   exposed = (t_strategy − t_local) / (t_none − t_local): the communication left on the critical
   path as a fraction of the un-overlapped one (none: 1.0). DeepSpeed's: (t_deepspeed −
   t_deepspeed_local) / (t_none − t_local), its communication time in units of ours without
   overlap (above 1 when its capacity-padded exchange moves more bytes).
   Outputs are checked: our strategies against none, DeepSpeed's routed output against ours.
2. Link rate: a calibration run with the link unlimited measures the local forward and backward
   times and the bytes a host sends across per step (half in each pass). The rate is the slowest
   at which each pass's bytes still take no longer than the shorter local pass: the most
   communication overlap could hide completely; without overlap it is then about half of the
   step. `--link-mbit` overrides.
3. End to end: the tiny LLM recipe (recipes/llm/pretrain_tiny.yaml, ep=4 over both hosts) through
   `sparseforge run --nnodes 2`, with the best strategy of 1 and with none, against the same model
   with every MoE FFN swapped for DeepSpeed's layer (benchmarks/_ds_moe.py), trained by the same
   Trainer (same data, optimizer, DDP, expert-gradient reduction; the step-1 losses, before any
   update, are printed and agree). tokens/s: the trainer's own per-step measurement (training
   steps only), median after 3 warm-up steps.

    python benchmarks/ep_overlap.py            # about 12 minutes on a loaded 2-core box
    python benchmarks/ep_overlap.py --quick    # smoke run (a few minutes)

Needs root (network namespaces); without, it says so and its JSON line carries "error".
The last line printed is one JSON object (see `summary`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers sleep: shared cores

HOSTS, NPROC = 2, 2
D_MODEL, NUM_EXPERTS, TOP_K, FFN = 256, 8, 2, 512
STRATEGIES = ("none", "async", "chunked", "shared_expert", "combinable")
CHUNKS = (2, 4, 8)
DS_AUX_COEFF = 0.01


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank in the layer benchmark")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--link-mbit", type=float, default=None, help="skip the calibration, use this rate")
    p.add_argument("--e2e-steps", type=int, default=30)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 256 tokens, 2 repeats, 6 e2e steps")
    p.add_argument("--worker", choices=("calibrate", "measure"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.warmup, args.e2e_steps = 256, 2, 1, 6
    return args


# -- the layer benchmark, on every rank (under torchrun) --------------------------------------------


def _cross_host_groups(dist, rank: int, world: int):
    """ep groups {local rank i of every host}: each all-to-all crosses hosts. Returns (group, ranks)."""
    own = None
    for i in range(NPROC):
        ranks = [h * NPROC + i for h in range(world // NPROC)]
        group = dist.new_group(ranks)
        if rank in ranks:
            own = (group, ranks)
    return own


def _reference_layer():
    import torch

    from models.moe import MoE
    from models.config import MoEConfig

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=NUM_EXPERTS, top_k=TOP_K, expert_ffn_dim=FFN, num_shared_experts=1,
                    shared_expert_ffn_dim=FFN)
    layer = MoE(D_MODEL, cfg)
    layer.init_weights(std=0.02, out_std=0.02)
    return layer, cfg


def _local_layer(ref, cfg, expert_ids: list[int]):
    """Our layer holding only `expert_ids` (their router rows), local dispatch: no communication."""
    import dataclasses

    import torch

    from models.moe import MoE

    layer = MoE(D_MODEL, dataclasses.replace(cfg, num_experts=len(expert_ids)))
    with torch.no_grad():
        layer.router.gate.weight.copy_(ref.router.gate.weight[expert_ids])
        for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
            getattr(layer.experts, name).copy_(getattr(ref.experts, name)[expert_ids])
    layer.shared_experts.load_state_dict(ref.shared_experts.state_dict())
    return layer


def build_variants(args, dist, ep_group, ep: int, ep_rank: int, with_deepspeed: bool):
    """name -> (module, kind); kind "ours" or "deepspeed" (returns (y, l_aux, counts))."""
    from parallel.expert_parallel import AllToAllDispatcher, shard_experts

    ref, cfg = _reference_layer()
    local_ids = list(range(ep_rank * NUM_EXPERTS // ep, (ep_rank + 1) * NUM_EXPERTS // ep))
    variants = {"local": (_local_layer(ref, cfg, local_ids), "ours")}
    strategies = ("none",) if args.worker == "calibrate" else STRATEGIES
    for s in strategies:
        for c in (CHUNKS if s in ("chunked", "combinable") else (1,)):
            layer = copy.deepcopy(ref)
            shard_experts(layer.experts, ep_rank, ep)
            layer.dispatcher = AllToAllDispatcher(ep_group, NUM_EXPERTS, s, c)
            variants[s if c == 1 else f"{s}_c{c}"] = (layer, "ours")
    if with_deepspeed:
        from benchmarks._ds_moe import ds_layer_like, init_deepspeed_comm

        init_deepspeed_comm()
        variants["deepspeed"] = (ds_layer_like(ref, local_ids, ep, data_before_expert_parallel=True), "deepspeed")
        variants["deepspeed_local"] = (ds_layer_like(ref, local_ids, 1, gate_rows=local_ids), "deepspeed")
        from deepspeed.utils import groups

        ds_ranks = list(groups._get_expert_parallel_group_ranks(f"ep_size_{ep}"))
        if ds_ranks != sorted(dist.get_process_group_ranks(ep_group)):
            raise RuntimeError(f"DeepSpeed's ep group {ds_ranks} is not ours")
    for module, _ in variants.values():
        module.train()
    return variants


def fwd_bwd(module, kind: str, x, dy, clock: list | None = None):
    """One training step of the layer; appends the forward's end time to `clock` if given."""
    import torch

    for p in module.parameters():
        p.grad = None
    x.grad = None
    if kind == "deepspeed":
        y, l_aux, _ = module(x)
        if clock is not None:
            clock.append(time.perf_counter())
        torch.autograd.backward([y, l_aux], [dy, torch.tensor(DS_AUX_COEFF, dtype=l_aux.dtype)])
    else:
        y = module(x)
        if clock is not None:
            clock.append(time.perf_counter())
        y.backward(dy)
    return y.detach()


def _check_outputs(variants, x, dy) -> dict:
    """Max |y - y_none| of every our-strategy variant, and of DeepSpeed's routed part vs ours."""
    import torch

    y_none = fwd_bwd(*variants["none"], x, dy)
    diffs = {}
    for name, (module, kind) in variants.items():
        if kind == "ours" and name not in ("none", "local"):
            diffs[name] = (fwd_bwd(module, kind, x, dy) - y_none).abs().max().item()
    if "deepspeed" in variants:
        with torch.no_grad():
            ours = variants["none"][0]
            routed = ours.dispatcher(x, ours.router(x).routing, ours.experts)
            ds_routed = variants["deepspeed"][0].deepspeed_moe(x, None)
            diffs["deepspeed_routed"] = (ds_routed - routed).abs().max().item()
    return diffs


def _bytes_across_per_step(variants, x, ep: int, ep_rank: int, dist, ep_group) -> int:
    """Bytes this rank sends to the other host per layer step (fwd + bwd) with `none`:
    S rows to its partner and R rows back (its results for the partner's tokens), forward, and
    the same counts again backward (the reverse exchanges), D fp32 values each."""
    import torch

    ours = variants["none"][0]
    with torch.no_grad():
        expert_N = ours.router(x).routing.expert_idx_N
    send_P = torch.bincount(expert_N // (NUM_EXPERTS // ep), minlength=ep)
    recv_P = torch.empty_like(send_P)
    dist.all_to_all_single(recv_P, send_P, group=ep_group)
    rows = (send_P.sum() - send_P[ep_rank] + recv_P.sum() - recv_P[ep_rank]).item()
    return 2 * rows * D_MODEL * 4


def layer_worker(args) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    ep_group, ep_ranks = _cross_host_groups(dist, rank, world)
    ep, ep_rank = len(ep_ranks), ep_ranks.index(rank)
    variants = build_variants(args, dist, ep_group, ep, ep_rank, with_deepspeed=args.worker == "measure")
    torch.manual_seed(100 + rank)
    # The layer's input needs a gradient, as inside a model: backward then reverses both
    # exchanges (dispatch and combine), not only the combine.
    x = torch.randn(args.tokens, D_MODEL, requires_grad=True)
    dy = torch.randn(args.tokens, D_MODEL) * 0.01
    diffs = _check_outputs(variants, x, dy)
    sent = torch.tensor([_bytes_across_per_step(variants, x, ep, ep_rank, dist, ep_group)], dtype=torch.float64)
    host_sent = [torch.zeros_like(sent) for _ in range(world)]
    dist.all_gather(host_sent, sent)
    names = list(variants)
    samples = {n: [] for n in names}
    fwd_samples = {n: [] for n in names}
    cpu_samples = {n: [] for n in names}
    for r in range(args.warmup + args.repeats):
        k = r % len(names)
        order = names[k:] + names[:k]
        row, cpu = [], []
        for name in order:
            dist.barrier()
            clock, cpu0 = [time.perf_counter()], time.process_time()
            fwd_bwd(*variants[name], x, dy, clock)
            clock.append(time.perf_counter())
            cpu.append(time.process_time() - cpu0)  # every thread of the rank: gloo's included
            row += [clock[2] - clock[0], clock[1] - clock[0]]
        row_t = torch.tensor(row, dtype=torch.float64)
        dist.all_reduce(row_t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        cpu_t = torch.tensor(cpu, dtype=torch.float64)
        dist.all_reduce(cpu_t)  # CPU seconds of all ranks together
        if r >= args.warmup:
            for i, name in enumerate(order):
                samples[name].append(row_t[2 * i].item() * 1e3)
                fwd_samples[name].append(row_t[2 * i + 1].item() * 1e3)
                cpu_samples[name].append(cpu_t[i].item() * 1e3)
    diff_t = torch.tensor([diffs.get(n, 0.0) for n in sorted(diffs)], dtype=torch.float64)
    dist.all_reduce(diff_t, op=dist.ReduceOp.MAX)
    if rank == 0:
        per_host = [sum(v.item() for v in host_sent[h * NPROC:(h + 1) * NPROC]) for h in range(world // NPROC)]
        out = {"step_ms": {n: statistics.median(v) for n, v in samples.items()},
               "fwd_ms": {n: statistics.median(v) for n, v in fwd_samples.items()},
               "cpu_ms_all_ranks": {n: statistics.median(v) for n, v in cpu_samples.items()},
               "spread_ms": {n: [min(v), max(v)] for n, v in samples.items()},
               "max_abs_diff": dict(zip(sorted(diffs), diff_t.tolist())),
               "host_bytes_per_step": max(per_host), "tokens_per_rank": args.tokens}
        with open(args.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


# -- the driver (root, outside the box) ---------------------------------------------------------------


def run_layer(box, args, phase: str) -> dict:
    out = os.path.join(tempfile.mkdtemp(prefix="ep_overlap_"), "layer.json")
    script = [os.path.abspath(__file__), "--worker", phase, "--out", out, "--tokens", str(args.tokens),
              "--repeats", str(args.repeats if phase == "measure" else max(2, args.repeats // 3)),
              "--warmup", str(args.warmup)]
    env = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    argvs = [box.torchrun_argv(h, NPROC, script, rdzv_id=f"layer-{phase}") for h in range(HOSTS)]
    results = box.run_on_hosts(argvs, env=env, timeout=1800, cwd=ROOT)
    _check(results, f"layer benchmark ({phase})")
    with open(out) as f:
        return json.load(f)


def _check(results, what: str) -> None:
    for h, proc in enumerate(results):
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed on host {h} (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def choose_rate(cal: dict) -> float:
    """The slowest link (Mbit/s, 2 significant digits) at which the bytes a host sends across in
    the forward (half of a step's) still take no longer than the local forward compute, and those
    of the backward no longer than the local backward: the most communication that overlap could
    still hide completely, in both passes."""
    fwd_s = cal["fwd_ms"]["local"] / 1e3
    bwd_s = (cal["step_ms"]["local"] - cal["fwd_ms"]["local"]) / 1e3
    mbit = cal["host_bytes_per_step"] / 2 * 8 / min(fwd_s, bwd_s) / 1e6
    return float(f"{mbit:.2g}")


def exposed_fractions(step_ms: dict) -> tuple[dict, dict, dict | None]:
    """(every variant, one row per strategy, DeepSpeed's row): {"step_ms", "exposed"[, "chunks"]}.
    A chunked strategy's row is its fastest chunk count."""
    t_local, comm = step_ms["local"], step_ms["none"] - step_ms["local"]
    variants = {name: {"step_ms": round(t, 2), "exposed": round((t - t_local) / comm, 3)}
                for name, t in step_ms.items() if name not in ("local", "deepspeed", "deepspeed_local")}
    variants["none"]["exposed"] = 1.0
    strategies = {}
    for s in STRATEGIES:
        if s in variants:
            strategies[s] = variants[s]
            continue
        chunks = min(CHUNKS, key=lambda c: variants[f"{s}_c{c}"]["step_ms"])
        strategies[s] = {**variants[f"{s}_c{chunks}"], "chunks": chunks}
    ds = None
    if "deepspeed" in step_ms:
        ds_comm = step_ms["deepspeed"] - step_ms["deepspeed_local"]
        ds = {"step_ms": round(step_ms["deepspeed"], 2), "exposed": round(ds_comm / comm, 3),
              "local_ms": round(step_ms["deepspeed_local"], 2)}
    return variants, strategies, ds


def print_layer_table(res: dict, variants: dict, ds: dict | None, repeats: int) -> None:
    cores = os.cpu_count() or 1
    step, fwd, cpu = res["step_ms"], res["fwd_ms"], res["cpu_ms_all_ranks"]
    print(f"\nMoE layer fwd+bwd, median of {repeats} (slowest rank per step). fwd: the forward alone, its "
          f"exposed fraction likewise. cpu floor: CPU time of all {HOSTS * NPROC} ranks (gloo threads "
          f"included) / {cores} cores, the step if compute and communication shared the cores perfectly.",
          flush=True)
    print(f"  {'':<16}{'step ms':>9}{'exposed':>9}{'fwd ms':>9}{'fwd exp':>9}{'cpu floor':>11}  spread", flush=True)
    rows = {"local": None, **variants, **({"deepspeed_local": None, "deepspeed": ds} if ds else {})}
    fwd_comm = fwd["none"] - fwd["local"]
    for name, row in rows.items():
        base = "deepspeed_local" if name.startswith("deepspeed") else "local"
        f_exp = f"{(fwd[name] - fwd[base]) / fwd_comm:9.3f}" if row else f"{'':9}"
        exp = f"{row['exposed']:9.3f}" if row else f"{'':9}"
        lo, hi = res["spread_ms"][name]
        print(f"  {name:<16}{step[name]:9.1f}{exp}{fwd[name]:9.1f}{f_exp}{cpu[name] / cores:11.1f}  "
              f"[{lo:.0f}..{hi:.0f}]", flush=True)
    print(f"  un-overlapped communication: {(step['none'] - step['local']) / step['none']:.0%} of the none step",
          flush=True)
    print(f"  max |y - y_none|: {json.dumps({k: float(f'{v:.2e}') for k, v in res['max_abs_diff'].items()})}",
          flush=True)


def run_e2e(box, args, overlap: str, chunks: int) -> dict:
    """tokens/s of the tiny recipe: ours through the CLI with `overlap` and with none, and
    DeepSpeed's layer in the same model and trainer through _ds_moe."""
    from trainer.recipe import load_config, save_config

    base = tempfile.mkdtemp(prefix="ep_overlap_e2e_")
    recipe = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
    common = [f"train.steps={args.e2e_steps}", "train.log_every=1", "checkpoint.enabled=false", "eval.every=0",
              "eval.batches=1", "logging.progress_bar=false", "parallel.ep=4"]
    env = {"PYTHONPATH": ROOT, "WANDB_MODE": "disabled"}
    out = {}
    for name, strategy in (("ours", overlap), ("ours_no_overlap", "none")):
        run_dir = os.path.join(base, name)
        argv = [sys.executable, "-m", "launch.cli", "run", recipe, "--run-dir", run_dir, "--nnodes", str(HOSTS),
                "--nproc-per-node", str(NPROC), "--rdzv-endpoint", f"{box.hosts[0].addr}:29400", "--set", *common,
                f"parallel.ep_overlap={strategy}", f"parallel.ep_chunks={chunks}"]
        _check(box.run_on_hosts([argv] * HOSTS, env=env, timeout=1800, cwd=ROOT), f"e2e ({name})")
        out[name] = _throughput(run_dir)
    ds_dir = os.path.join(base, "deepspeed")
    os.makedirs(ds_dir)
    cfg = load_config(recipe, common, world_size=HOSTS * NPROC)
    cfg.train.run_dir = ds_dir
    save_config(cfg, os.path.join(ds_dir, "config.yaml"))
    script = [os.path.join(ROOT, "benchmarks", "_ds_moe.py"), "--config", os.path.join(ds_dir, "config.yaml"),
              "--run-dir", ds_dir]
    ds_env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // NPROC))}  # as the CLI sets it
    argvs = [box.torchrun_argv(h, NPROC, script, rdzv_id="e2e-deepspeed") for h in range(HOSTS)]
    results = box.run_on_hosts(argvs, env=ds_env, timeout=1800, cwd=ROOT)
    _check(results, "e2e (deepspeed)")
    out["deepspeed"] = _throughput(ds_dir)
    out["deepspeed"]["padding"] = next((line for p in results for line in p.stdout.splitlines()
                                        if line.startswith("deepspeed padding")), "")
    return out


def _throughput(run_dir: str, skip: int = 3) -> dict:
    """Median of the per-step tokens/s after `skip` warm-up steps; the step-1 loss (before any
    update: equal for both models when they start from the same weights on the same data)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"tokens_per_s"' in line]
    per_step = [r["tokens_per_s"] for r in records]
    loads = [r["moe/load_max_over_mean"] for r in records if "moe/load_max_over_mean" in r]
    return {"tokens_per_s": statistics.median(per_step[skip:] or per_step),
            "steps": [round(v) for v in per_step], "first_loss": records[0]["loss"],
            "load_max_over_mean": statistics.mean(loads) if loads else None}


def print_e2e(e2e: dict, overlap: str, chunks: int) -> None:
    print(f"\nend to end, tiny recipe (2048 tokens/rank/step), ep=4 over both hosts; ours with "
          f"ep_overlap={overlap} ep_chunks={chunks}, and with none:", flush=True)
    for name, r in e2e.items():
        print(f"  {name:<16}{r['tokens_per_s']:8.0f} tokens/s (median of steps 4..)   step-1 loss "
              f"{r['first_loss']:.6f}   per step {r['steps']}", flush=True)
    ds = e2e["deepspeed"]["tokens_per_s"]
    print(f"  ours / deepspeed: {e2e['ours']['tokens_per_s'] / ds:.2f}x; without overlap "
          f"{e2e['ours_no_overlap']['tokens_per_s'] / ds:.2f}x", flush=True)
    if e2e["ours"]["load_max_over_mean"]:
        print(f"  routing: busiest expert / mean load {e2e['ours']['load_max_over_mean']:.2f} (ours, mean over "
              f"steps); {e2e['deepspeed']['padding']}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        layer_worker(args)
        return 0
    from tests.helpers.cluster_box import ClusterBox, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        print(f"ep_overlap: {reason}")
        print(json.dumps({"error": reason}))
        return 0
    started = time.perf_counter()
    with ClusterBox(num_hosts=HOSTS) as box:
        print(f"cluster in a box: {HOSTS} hosts x {NPROC} ranks, {os.cpu_count()} cores; layer D={D_MODEL} "
              f"E={NUM_EXPERTS} top-{TOP_K} ffn {FFN} + 1 shared expert, {args.tokens} tokens/rank, fp32", flush=True)
        rate = args.link_mbit
        if rate is None:
            cal = run_layer(box, args, "calibrate")
            rate = choose_rate(cal)
            fwd = cal["fwd_ms"]["local"]
            print(f"calibration (link unlimited): t_local {cal['step_ms']['local']:.1f} ms (forward {fwd:.1f}, "
                  f"backward {cal['step_ms']['local'] - fwd:.1f}), t_none {cal['step_ms']['none']:.1f} ms; "
                  f"{cal['host_bytes_per_step'] / 1e6:.2f} MB per host per step across, half in each pass -> "
                  f"link {rate} Mbit/s (each pass's bytes take as long as the shorter local pass)", flush=True)
        box.set_link(rate)
        measured = box.measure_mbit(0, 1, megabytes=max(2, int(rate / 8 * 2)))
        print(f"link: tbf {rate} Mbit/s each way per host, queue {box.queue_ms} ms; one TCP stream measures "
              f"{measured:.1f} Mbit/s", flush=True)
        res = run_layer(box, args, "measure")
        variants, strategies, ds = exposed_fractions(res["step_ms"])
        print_layer_table(res, variants, ds, args.repeats)
        best = min((n for n in strategies if n != "none"), key=lambda n: strategies[n]["step_ms"])
        e2e = None
        if not args.skip_e2e:
            chunks = strategies[best].get("chunks", 2)
            e2e = run_e2e(box, args, best, chunks)
            print_e2e(e2e, best, chunks)
    print(f"\ntook {time.perf_counter() - started:.0f} s; best strategy {best} "
          f"(chunks {strategies[best].get('chunks', '-')}): exposed {strategies[best]['exposed']}", flush=True)
    print(json.dumps(summary(rate, strategies, variants, ds, e2e, best)))
    return 0


def summary(rate, strategies, variants, ds, e2e, best) -> dict:
    """The last line: {"link_mbit", "strategies": {s: {"step_ms", "exposed"[, "chunks"]}},
    "deepspeed": {"step_ms", "exposed", "local_ms"}, "e2e_tokens_per_s": {"ours", "deepspeed",
    "ours_no_overlap"}, "best": s, "chunk_sweep": {variant: {"step_ms", "exposed"}}}."""
    out = {"link_mbit": rate, "strategies": strategies, "deepspeed": ds}
    if e2e:
        out["e2e_tokens_per_s"] = {k: round(v["tokens_per_s"], 1) for k, v in e2e.items()}
    out["best"] = best
    out["chunk_sweep"] = {k: v for k, v in variants.items() if "_c" in k}
    return out


if __name__ == "__main__":
    sys.exit(main())
