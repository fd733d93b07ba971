"""Pipeline bubble per schedule, measured from per-stage timings against the theory, and tokens/s.

Every torch.distributed.pipelining schedule we offer (parallel/pipeline.py): GPipe, 1F1B,
Interleaved1F1B, ZBV, DualPipeV.

Setup: p=2 pipeline ranks (2 gloo processes on this machine, one torch thread each), m=8
microbatches per step, fp32 on CPU. The model is an MoE transformer sized so that a microbatch's
compute on a stage (forward ~75 ms, backward ~140 ms here) dwarfs the P2P send of its
activations (4 x 128 x 256 fp32 = 512 KiB over loopback): d_model 256, 8 layers, 8 heads (4 kv),
E=8 top-2, expert ffn 512, vocab 260 (bytes: the output head and the loss cost a few % of a
stage, so stages of equal layer counts are balanced; the split is parallel/pipeline.py's own,
balanced by FLOPs, and printed), 4 sequences of 128 tokens per microbatch (with 2, P2P and
scheduling overhead was ~0.015 of the step and 1F1B measured 1.26-1.31x theory). The MoE aux and z
losses stay on (attached inside each stage's graph, scaled 1/m, as in training).

Method: the step is `Pipeline.step` (parallel/pipeline.py), one forward + backward of the m
microbatches through the schedule; no optimizer. On each rank the compute methods of its torch
`PipelineStage`s are wrapped with perf_counter accumulators (the instances' bound methods are
monkeypatched): forward_one_chunk (F), backward_one_chunk (B, or I when the schedule splits the
backward), backward_weight_one_chunk (W), and the schedule's loss on the last stage (L, counted
as compute). Everything else in the step is idle: waiting on a P2P recv (the bubble), sends,
the schedule's bookkeeping, the microbatch split. Every repeat runs every schedule once, in an
order rotated per repeat so machine noise hits all alike, each after a barrier (the ranks start
together); the first --warmup repeats are not counted (shape inference, allocator warmup).
    span         the step's wall time: on each rank from the barrier to its return, max over
                 the ranks (a step is over when its last rank is; in 1F1B the last stage
                 finishes its last backward before the first stage does)
    bubble_r     1 - busy_r / span: rank r's idle fraction of the step, median over repeats
    bubble       the mean of bubble_r over the ranks (the per-rank values are printed too)
    tokens_per_s tokens of one step (m x microbatch x seq) / the median span
    theory       the papers', for equal stages and free P2P. GPipe, 1F1B: (p-1)/(m+p-1).
                 Interleaved1F1B with v stages per rank: (p-1)/(v·m+p-1). ZBV: 0, when the
                 forward (F), input-gradient (I) and weight-gradient (W) chunks take equal time
                 (Qi et al., Zero Bubble Pipeline Parallelism, ZB-V). DualPipeV: DeepSeek's
                 (PP/2-1)(F&B+B-3W) over PP = 2p stages, with F = I = W = 1, B = I + W and F&B =
                 F + B (torch runs an overlapped pair one after the other, and one CPU thread
                 could not overlap them anyway): (p-1)/(3m+p-1), 0.04 at p=2, m=8.
    ideal        this schedule as torch runs it (each rank's op order: the schedule's
                 pipeline_order, or the loops of GPipe/1F1B) replayed with the data
                 dependencies, free P2P and the papers' op times F = I = W = 1, B = 2: where it
                 differs from theory, torch's schedule is not the paper's
    sim          the same replay with the measured median duration of each op (per stage and
                 kind; F includes the loss on the last stage): adds stage imbalance and the real
                 F : I : W ratios
    sim-act      the same replay with each step's own op durations (median over steps): adds
                 the step-to-step and microbatch-to-microbatch variation of the op times, e.g.
                 a rank descheduled for a while. bubble - sim-act is what the runtime itself
                 costs: P2P latency and wake-ups, the schedule's bookkeeping
    busy         compute ms per rank and step. The zero-bubble schedules split the backward
                 into I and W, and that can cost compute: the printed "split backward" line is
                 (I + W) / B, measured on the same stages in DualPipeV. Compare schedules on
                 tokens/s: a lower bubble fraction out of more compute can still be slower.
    on-cpu       the ranks' thread CPU time inside the ops / their wall time there: below 100%
                 the ranks were descheduled (other jobs on the shared cores) while computing.
The losses of the first step of every schedule (same weights, inputs, microbatches) are printed:
they agree, so every schedule computes the same thing.

CPU contention: the two ranks need both of this machine's cores, and other jobs on them distort the
bubble both ways. A rank descheduled in the steady state makes the other wait: more bubble
(sim-act > sim). Under heavy load, a rank computing while the other one idles (the pipeline's
fill and drain, the bubble itself) gets a bigger share of the cores and runs its ops up to ~2x
faster than in the steady state (seen at load 7: 1F1B's first forward and last backward at half
the median time), which shrinks the idle periods: less bubble, even below the theory (sim-act <
sim). Only an idle machine measures the schedule; here read bubble next to on-cpu, sim and
sim-act. The load average is printed before and after, with a warning when other jobs were using
the cores.

    python benchmarks/pipeline.py                    # 5 schedules, 10 repeats (~2 minutes)
    python benchmarks/pipeline.py --schedules 1f1b,zbv --repeats 20
    python benchmarks/pipeline.py --quick            # smoke run: tiny model, 2 repeats (~15 s)

The last line printed is one JSON object: {"p", "m", "schedules": {name: {"bubble", "theory",
"tokens_per_s", "ideal", "sim", "sim_actual", "bubble_per_rank", "step_ms", "busy_ms_per_rank",
"on_cpu", "op_ms", ...}}, "target_1f1b_met" (1F1B bubble <= 1.2 x theory), "zbv_below_1f1b"
(bubble fractions), "split_backward_cost", "load_avg_1min" (before, after), "took_s"}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Idle OpenMP workers sleep instead of spinning: the cores are shared (see moe_layer.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PP = 2
# config name -> the name in the JSON line
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B", "zbv": "ZBV",
             "dualpipev": "DualPipeV"}
TARGET_RATIO = 1.2  # the 1F1B bubble may be at most this times the theory
# op durations of the idealised replay ("ideal"): the papers' F = I = W, B = I + W; free loss
UNIT_COST = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0, "L": 0.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedules", default=",".join(SCHEDULES),
                   help="comma-separated subset, config names or JSON names (1f1b or 1F1B)")
    p.add_argument("--microbatches", type=int, default=8, help="m")
    p.add_argument("--mb-size", type=int, default=4, help="sequences per microbatch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per schedule")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: d_model 64, 4 layers, seq 32, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.heads, args.seq, args.expert_ffn, args.mb_size = 64, 4, 4, 32, 128, 1
        args.repeats, args.warmup = 2, 1
    by_lower = {**{k: k for k in SCHEDULES}, **{v.lower(): k for k, v in SCHEDULES.items()}}
    try:
        args.schedules = [by_lower[s.strip().lower()] for s in args.schedules.split(",") if s.strip()]
    except KeyError as e:
        p.error(f"--schedules: unknown schedule {e.args[0]!r}; known: {', '.join(SCHEDULES)}")
    return args


def overrides(args, schedule: str) -> list[str]:
    return [f"model.d_model={args.d_model}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
            f"model.num_kv_heads={max(1, args.heads // 2)}", "model.vocab_size=260",
            f"model.max_seq_len={max(args.seq, 128)}", f"data.seq_len={args.seq}",
            f"moe.num_experts={args.experts}", f"moe.top_k={args.top_k}", f"moe.expert_ffn_dim={args.expert_ffn}",
            "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001",
            f"parallel.pp={PP}", f"parallel.pp_schedule={schedule}", f"parallel.pp_microbatches={args.microbatches}",
            f"train.micro_batch_size={args.microbatches * args.mb_size}", "train.grad_accum_steps=1"]


def theory(schedule: str, p: int, m: int, v: int) -> float:
    """The papers' bubble fraction (see the module docstring for the assumptions)."""
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    if schedule == "dualpipev":  # (PP/2-1)(F&B+B-3W) with PP = 2p stages, F=I=W=1, B=2, F&B=F+B
        return (p - 1) / (3 * m + p - 1)
    return 0.0  # zbv: zero bubble when F = I = W


# -- instrumentation, on every rank ------------------------------------------------------------------


class OpClock:
    """Busy wall time and thread CPU time inside the stages' compute methods during one step, and
    the duration of each op of the step by (stage, kind, microbatch)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.busy = self.cpu = 0.0
        self.ops: dict[str, float] = {}  # "stage:kind:microbatch" -> seconds
        self.losses = 0

    def timed(self, fn, stage: int, kind: str):
        def wrapper(*a, **kw):
            k = "I" if kind == "B" and not kw.get("full_backward", True) else kind
            if k == "L":  # the last stage computes the losses in microbatch order
                mb, self.losses = self.losses, self.losses + 1
            else:  # forward_one_chunk(fwd_chunk_id, ...), backward_*(bwd_chunk_id, ...)
                mb = a[0] if a else kw.get("fwd_chunk_id", kw.get("bwd_chunk_id"))
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                wall = time.perf_counter() - t0
                self.busy += wall
                self.cpu += time.thread_time() - c0
                self.ops[f"{stage}:{k}:{mb}"] = wall
        return wrapper


def instrument(pipe, clock: OpClock) -> None:
    """Wrap the compute of this rank's stages (instance attributes shadow the class methods)."""
    for st in pipe.stages:
        for name, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"),
                           ("backward_weight_one_chunk", "W")):
            setattr(st, name, clock.timed(getattr(st, name), st.stage_index, kind))
    # the loss runs in the schedule (_maybe_compute_loss -> self._compute_loss), on the last stage only
    sched = pipe.schedule
    sched._compute_loss = clock.timed(sched._compute_loss, pipe.num_stages - 1, "L")


def op_orders(pipe, p: int, m: int, num_stages: int) -> dict[int, list[tuple[int, str, int]]]:
    """Each rank's compute ops in execution order: (stage, kind, microbatch)."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti

    if isinstance(pipe.schedule, PipelineScheduleMulti):  # what runs: pipeline_order, every rank's
        order = pipe.schedule.pipeline_order
        out = {}
        for rank, actions in order.items():
            flat = []
            for a in actions:
                if a is None:
                    continue
                for sub in (a.sub_actions or (a,)):
                    kind = sub.computation_type.value
                    if kind in ("F", "B", "I", "W"):
                        flat.append((sub.stage_index, kind, sub.microbatch_index))
            out[rank] = flat
        return out
    # GPipe and 1F1B: one stage per rank, run by the loops of torch's Schedule{GPipe,1F1B}
    # ._step_microbatches (their pipeline_order attribute is descriptive only, not what runs)
    out = {}
    for s in range(p):
        if type(pipe.schedule).__name__ == "ScheduleGPipe":
            out[s] = [(s, "F", j) for j in range(m)] + [(s, "B", j) for j in range(m)]
            continue
        warmup = min(m, num_stages - s)
        ops, f, b = [(s, "F", j) for j in range(warmup)], warmup, 0
        while b < m:
            ops.append((s, "B", b))
            b += 1
            if f < m:
                ops.append((s, "F", f))
                f += 1
        out[s] = ops
    return out


def worker(rank: int, world_size: int, args) -> dict:
    import torch
    import torch.distributed as dist

    import models
    from models.moe import set_aux_loss_scale
    from parallel import build_mesh, parallelize_pipeline
    from parallel.pipeline import stage_layer_counts
    from parallel.config import pp_stages_per_rank
    from trainer.recipe import load_config
    from trainer.lm.task import lm_loss

    runs = {}
    for sched in args.schedules:
        cfg = load_config(None, overrides(args, sched), world_size=world_size)
        mesh = build_mesh(cfg.parallel, torch.device("cpu"))
        torch.manual_seed(0)  # the same weights for every schedule, on every rank
        model = models.build_model(cfg.model, cfg.moe)
        set_aux_loss_scale(model, 1.0 / args.microbatches)
        pipe = parallelize_pipeline(model, mesh, cfg.parallel, lm_loss, micro_batch_size=cfg.train.micro_batch_size,
                                grad_accum_steps=cfg.train.grad_accum_steps, seq_len=cfg.data.seq_len)
        clock = OpClock()
        instrument(pipe, clock)
        runs[sched] = dict(pipe=pipe, clock=clock, counts=stage_layer_counts(cfg.parallel, model, cfg.moe),
                           v=pp_stages_per_rank(cfg.parallel), spans=[], busy=[], cpu_in_ops=[], proc_cpu=[],
                           ops=[], first_loss=None)
    g = torch.Generator().manual_seed(1)
    B = args.microbatches * args.mb_size
    x = torch.randint(0, 260, (B, args.seq), generator=g)
    y = torch.randint(0, 260, (B, args.seq), generator=g)
    names = list(runs)
    for r in range(args.warmup + args.repeats):
        k = r % len(names)
        for sched in names[k:] + names[:k]:
            run = runs[sched]
            pipe, clock = run["pipe"], run["clock"]
            for param in pipe.module.parameters():
                param.grad = None
            clock.reset()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = pipe.step((x,), y)
            span, proc_cpu = time.perf_counter() - t0, time.process_time() - c0
            span_t = torch.tensor([span], dtype=torch.float64)
            dist.all_reduce(span_t, op=dist.ReduceOp.MAX)  # the step ends with its last rank
            if run["first_loss"] is None:
                run["first_loss"] = pipe.broadcast_from_last(loss, torch.device("cpu")).item()
            if r >= args.warmup:
                run["spans"].append(span_t.item())
                run["busy"].append(clock.busy)
                run["cpu_in_ops"].append(clock.cpu)
                run["proc_cpu"].append(proc_cpu)
                run["ops"].append(dict(clock.ops))
    out = {}
    for sched, run in runs.items():
        pipe = run["pipe"]
        out[sched] = {k: run[k] for k in ("counts", "v", "spans", "busy", "cpu_in_ops", "proc_cpu", "ops",
                                          "first_loss")}
        out[sched]["stage_ids"] = pipe.stage_ids
        out[sched]["orders"] = op_orders(pipe, PP, args.microbatches, pipe.num_stages) if rank == 0 else None
        out[sched]["num_stages"] = pipe.num_stages
    return out


# -- the driver ------------------------------------------------------------------------------------


def simulate(orders: dict[int, list[tuple[int, str, int]]], dur, num_stages: int) -> list[float]:
    """Replay every rank's op order with free, instant communication: each op starts when its
    rank is free and its inputs exist (F after the previous stage's F of that microbatch; B or I
    after its own F and the next stage's B or I; W after its I) and lasts dur(stage, kind, mb)
    (F on the last stage includes the loss). Returns each rank's bubble, 1 - busy / span."""
    def deps(s, kind, j):
        if kind == "F":
            return [(s - 1, "F", j)] if s > 0 else []
        if kind in ("B", "I"):
            return [(s, "F", j)] + ([(s + 1, "grad", j)] if s < num_stages - 1 else [])
        return [(s, "I", j)]  # W

    done: dict[tuple, float] = {}
    clock = {r: 0.0 for r in orders}
    busy = {r: 0.0 for r in orders}
    pos = {r: 0 for r in orders}
    while any(pos[r] < len(orders[r]) for r in orders):
        progress = False
        for r, ops in orders.items():
            while pos[r] < len(ops):
                s, kind, j = ops[pos[r]]
                need = deps(s, kind, j)
                if any(d not in done for d in need):
                    break
                t = dur(s, kind, j) + (dur(s, "L", j) if kind == "F" and s == num_stages - 1 else 0.0)
                clock[r] = max([clock[r]] + [done[d] for d in need]) + t
                busy[r] += t
                done[(s, kind, j)] = clock[r]
                if kind in ("B", "I"):
                    done[(s, "grad", j)] = clock[r]
                pos[r] += 1
                progress = True
        if not progress:
            stuck = [orders[r][pos[r]] for r in orders if pos[r] < len(orders[r])]
            raise RuntimeError(f"simulation deadlocked at {stuck}")
    span = max(clock.values())
    return [1 - busy[r] / span for r in sorted(orders)]


def summarize(args, results: list[dict]) -> dict:
    rows = {}
    m, tokens = args.microbatches, args.microbatches * args.mb_size * args.seq
    for sched in args.schedules:
        per_rank = [res[sched] for res in results]
        spans = per_rank[0]["spans"]  # identical on every rank (all-reduced)
        bubbles = [statistics.median(1 - b / s for b, s in zip(r["busy"], spans)) for r in per_rank]
        orders, num_stages = per_rank[0]["orders"], per_rank[0]["num_stages"]
        # every op of every timed step: "stage:kind:mb" -> seconds (the ranks hold disjoint stages)
        steps = [{k: v for r in per_rank for k, v in r["ops"][i].items()} for i in range(len(spans))]
        by_kind: dict[str, list[float]] = {}
        for step in steps:
            for key, sec in step.items():
                by_kind.setdefault(key.rsplit(":", 1)[0], []).append(sec)
        op_med = {k: statistics.median(v) for k, v in by_kind.items()}
        ideal = simulate(orders, lambda s, kind, j: UNIT_COST[kind], num_stages)
        sim = simulate(orders, lambda s, kind, j: op_med.get(f"{s}:{kind}", 0.0), num_stages)
        sim_steps = [simulate(orders, lambda s, kind, j, st=st: st.get(f"{s}:{kind}:{j}", 0.0), num_stages)
                     for st in steps]
        step = statistics.median(spans)
        rows[sched] = {
            "bubble": round(statistics.mean(bubbles), 4),
            "theory": round(theory(sched, PP, m, per_rank[0]["v"]), 4),
            "ideal": round(statistics.mean(ideal), 4),
            "tokens_per_s": round(tokens / step, 1),
            "bubble_per_rank": [round(b, 4) for b in bubbles],
            "sim": round(statistics.mean(sim), 4),
            "sim_per_rank": [round(b, 4) for b in sim],
            "sim_actual": round(statistics.median(statistics.mean(b) for b in sim_steps), 4),
            "step_ms": round(step * 1e3, 1),
            "step_ms_spread": [round(min(spans) * 1e3), round(max(spans) * 1e3)],
            "busy_ms_per_rank": [round(statistics.median(r["busy"]) * 1e3, 1) for r in per_rank],
            "on_cpu": round(sum(sum(r["cpu_in_ops"]) for r in per_rank) / sum(sum(r["busy"]) for r in per_rank), 3),
            "proc_cpu_share": [round(statistics.median(c / s for c, s in zip(r["proc_cpu"], spans)), 3)
                               for r in per_rank],
            "first_loss": per_rank[0]["first_loss"],
            "layers_per_stage": per_rank[0]["counts"],
            "stages_per_rank": [r["stage_ids"] for r in per_rank],
            "op_ms": {k: round(v * 1e3, 2) for k, v in sorted(op_med.items())},
        }
    return rows


def split_backward_cost(rows: dict) -> float | None:
    """(I + W) / B, both measured on the same stages in the same schedule: DualPipeV runs full
    backwards (in its overlapped F+B pairs) and split ones. Stage 0 is left out: torch skips its I
    and runs a full backward as its W."""
    if "dualpipev" not in rows:
        return None
    ops = rows["dualpipev"]["op_ms"]
    stages = [s for s in range(1, 2 * PP) if all(f"{s}:{k}" in ops for k in ("B", "I", "W"))]
    if not stages:
        return None
    return sum(ops[f"{s}:I"] + ops[f"{s}:W"] for s in stages) / sum(ops[f"{s}:B"] for s in stages)


def print_table(args, rows: dict) -> None:
    print(f"\nbubble = idle / step span, median over {args.repeats} steps, mean over the {PP} ranks (per rank "
          f"beside it). theory: the papers'. ideal: this schedule's op order replayed with F=I=W=1, B=2 and free "
          f"P2P; sim: with the median measured op times; sim-act: with each step's own op times (median over "
          f"steps). busy: compute ms per rank per step. on-cpu: CPU / wall time inside the ops", flush=True)
    print(f"  {'schedule':<17}{'bubble':>8}{'theory':>8}{'ideal':>8}{'sim':>8}{'sim-act':>8}{'per rank':>14}"
          f"{'busy ms':>9}{'step ms':>9}{'tokens/s':>10}{'on-cpu':>8}  step spread", flush=True)
    for sched, r in rows.items():
        per = " ".join(f"{b:.3f}" for b in r["bubble_per_rank"])
        lo, hi = r["step_ms_spread"]
        print(f"  {SCHEDULES[sched]:<17}{r['bubble']:8.3f}{r['theory']:8.3f}{r['ideal']:8.3f}{r['sim']:8.3f}"
              f"{r['sim_actual']:8.3f}{per:>14}{statistics.mean(r['busy_ms_per_rank']):9.0f}{r['step_ms']:9.0f}"
              f"{r['tokens_per_s']:10.0f}{r['on_cpu']:8.0%}  [{lo}..{hi}]", flush=True)
    print("\nop medians (ms) per stage:kind (F forward, L loss, B full backward, I input grad, W weight grad):",
          flush=True)
    for sched, r in rows.items():
        print(f"  {SCHEDULES[sched]:<17}{' '.join(f'{k}={v:.1f}' for k, v in r['op_ms'].items())}", flush=True)
    ratio = split_backward_cost(rows)
    if ratio is not None:
        print(f"\nsplit backward: I + W = {ratio:.2f} x B (DualPipeV's stages > 0, which run both kinds): the "
              f"price of the zero-bubble schedules' backward split here (1 if splitting were free)", flush=True)
    losses = {SCHEDULES[s]: r["first_loss"] for s, r in rows.items()}
    spread = max(losses.values()) - min(losses.values())
    print(f"\nfirst-step loss per schedule (same weights and microbatches): "
          f"{json.dumps({k: round(v, 6) for k, v in losses.items()})}  (spread {spread:.1e})", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tests.helpers.dist import run_distributed

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    m, tokens = args.microbatches, args.microbatches * args.mb_size * args.seq
    print(f"pipeline bubble: p={PP} ranks (gloo, 1 torch thread each), m={m} microbatches of {args.mb_size} x "
          f"{args.seq} tokens ({tokens} tokens/step); model d={args.d_model}, {args.layers} layers, {args.heads} "
          f"heads, E={args.experts} top-{args.top_k}, expert ffn {args.expert_ffn}, vocab 260, fp32, aux + z "
          f"losses on; {args.warmup} warm-up + {args.repeats} timed steps per schedule", flush=True)
    print(f"machine: {cores} cores, load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
          f"(1/5/15 min) before the run", flush=True)
    if load_before[0] > 0.5 * cores:
        print(f"WARNING: other jobs are using the cores (1-min load {load_before[0]:.1f} on {cores} cores, before "
              f"this run's {PP} ranks start): descheduled ranks make each other wait, and a lone rank "
              f"runs faster while the other idles: both distort the measured bubbles; read them with on-cpu, sim "
              f"and sim-act", flush=True)
    started = time.perf_counter()
    results = run_distributed(worker, PP, args, timeout_s=1800)
    took = time.perf_counter() - started
    rows = summarize(args, results)
    for sched, r in rows.items():
        print(f"  {SCHEDULES[sched]}: layers per stage {r['layers_per_stage']}, stages per rank "
              f"{r['stages_per_rank']}", flush=True)
    print_table(args, rows)
    load_after = os.getloadavg()
    print(f"\ntook {took:.0f} s; load average {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} after "
          f"(this run's {PP} ranks included)", flush=True)
    out = {"p": PP, "m": m, "schedules": {SCHEDULES[s]: r for s, r in rows.items()}}
    if "1f1b" in rows:
        r = rows["1f1b"]
        out["target_1f1b_met"] = r["bubble"] <= TARGET_RATIO * r["theory"]
        print(f"1F1B: bubble {r['bubble']:.3f} vs theory {r['theory']:.3f} = {r['bubble'] / r['theory']:.2f}x "
              f"(target <= {TARGET_RATIO}x): {'met' if out['target_1f1b_met'] else 'NOT met'}", flush=True)
    if "1f1b" in rows and "zbv" in rows:
        z, o = rows["zbv"], rows["1f1b"]
        out["zbv_below_1f1b"] = z["bubble"] < o["bubble"]
        print(f"ZBV: bubble {z['bubble']:.3f} {'<' if out['zbv_below_1f1b'] else '>='} 1F1B's {o['bubble']:.3f}; "
              f"busy {statistics.mean(z['busy_ms_per_rank']) / statistics.mean(o['busy_ms_per_rank']):.2f}x and "
              f"tokens/s {z['tokens_per_s'] / o['tokens_per_s']:.2f}x 1F1B's", flush=True)
    ratio = split_backward_cost(rows)
    if ratio is not None:
        out["split_backward_cost"] = round(ratio, 3)
    out["tokens_per_step"] = tokens
    out["load_avg_1min"] = [round(load_before[0], 2), round(load_after[0], 2)]
    out["took_s"] = round(took, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
