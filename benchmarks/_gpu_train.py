"""GPU suite, parts 3 and 4: training steps of a ~2B MoE LLM and of a DiT-MoE-XL on one device,
through the real Trainer (trainer/loop.py) on synthetic batches (docs/gpu.md).

Each run builds a Trainer (model on meta, activation checkpointing, per-rank materialisation,
AdamW, the DiT's EMA), times `trainer.stepper` (forward, backward, clip, AdamW, router loads;
the DiT's EMA) in bf16 autocast, then compiles every block (parallel/compile.py) and the LM loss,
as parallel.compile does, and times it again. Reported per run: median step time, tokens (images) per second, MFU, the peak device
memory of the timed steps beside launch/plan.py's estimate (weights, gradients, AdamW moments,
the DiT's EMA, activations).

MFU = FLOPs per step / step time / the device's dense bf16 peak (989 TFLOP/s on an H100/H200),
FLOPs per step = tokens x 6 x (multiply-adds per token of one forward, launch/plan.py's
`recompute_macs`: every active parameter but the input embedding (routed experts at top_k/E,
the output head included) plus the attention scores, 2·S·H·d_head per layer, halved by the LLM's
causal mask). The DiT's adaLN modulations and timestep MLP run once per image, not per token,
and are counted so. Recomputation is not model FLOPs: checkpointing lowers MFU by its extra work.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import tempfile
import time

import torch

from launch.plan import memory_per_rank, meta_model, param_breakdown, recompute_macs, tokens_per_sample
from models.moe.backends import select_backend
from models.registry import preset_overrides
from parallel.compile import compile_blocks
from parallel.recompute import checkpointed_modules
from trainer.config import config_from_dict, validate
from trainer.datasets_io import one_line
from trainer.lm.task import compiled_loss, lm_loss

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense, no sparsity (NVIDIA's datasheets)
MODES = ("none", "block", "moe_ffn")
MEMORY_SHARE = 0.8  # halve the batch while the plan's estimate exceeds this share of the device
OVERRIDES: dict[str, object] = {}  # dotted recipe keys set on every run (gpu_suite.py --optim, --set)
COMPILE_RESERVE_S = 75  # start compiling only with this much of the part's time left (cold inductor cache)


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU, else None (no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class SyntheticLM:
    """The LM task (trainer/lm/task.py) on uniformly random tokens, drawn on the device."""

    data = None
    loss_fn = staticmethod(lm_loss)  # compiled with the blocks (parallel.compile's compiled_loss)

    def __init__(self, cfg, device):
        self.vocab, self.shape, self.device = cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len), device

    def batches(self):
        gen = torch.Generator(self.device).manual_seed(0)
        while True:
            tokens = torch.randint(0, self.vocab, (self.shape[0], self.shape[1] + 1), generator=gen, device=self.device)
            yield tokens[:, :-1], tokens[:, 1:]

    def to_device(self, batch):
        return batch

    def micro_batch_loss(self, model, batch):
        inputs, targets = batch
        return self.loss_fn(model(inputs), targets)


class SyntheticImages:
    """The diffusion task's training loss (trainer/diffusion/task.py) on random latents and labels."""

    data = None

    def __init__(self, cfg, device):
        from trainer.diffusion.objectives import build_objective

        m = cfg.model
        self.objective = build_objective(cfg.diffusion, learn_sigma=m.learn_sigma)
        self.shape = (cfg.train.micro_batch_size, m.in_channels, m.image_size, m.image_size)
        self.num_classes, self.device = m.num_classes, device

    def batches(self):
        gen = torch.Generator(self.device).manual_seed(0)
        while True:
            yield (torch.randn(self.shape, generator=gen, device=self.device),
                   torch.randint(0, self.num_classes, self.shape[:1], generator=gen, device=self.device))

    def to_device(self, batch):
        return batch

    def micro_batch_loss(self, model, batch):
        x0, y = batch
        t = self.objective.sample_t(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.objective.q_sample(x0, t, noise)
        out = model(x_t, self.objective.model_time(t), y)
        return self.objective.loss(out.float(), x0, x_t, t, noise)["loss"].mean()


def make_config(preset: str, mode: str, batch: int, device: torch.device, seq_len: int = 0):
    """The run's config from a preset, built without the recipe loader (no pydantic on the box)."""
    p = preset_overrides(preset)
    # auto picks the grouped GEMM on a GPU; on the CPU it is asked for by name, so the smoke run
    # traces and compiles the same expert path (auto would take the loop there).
    backend = "auto" if device.type == "cuda" else "grouped_mm"
    raw = {"model": {**p["model"], "preset": preset}, "moe": {**p["moe"], "backend": backend},
           "train": {"dtype": "bf16", "micro_batch_size": batch, "steps": 10_000, "device": device.type},
           "parallel": {"activation_checkpoint": mode},
           "logging": {"wandb": False, "progress_bar": False, "heatmap_every": 0},
           "checkpoint": {"enabled": False}, "eval": {"every": 0}}
    if seq_len:
        raw["data"] = {"seq_len": seq_len}
        raw["model"]["max_seq_len"] = max(seq_len, p["model"]["max_seq_len"])
    for key, value in OVERRIDES.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    cfg = config_from_dict(raw)
    validate(cfg, world_size=1)
    return cfg


def flops_per_sample(cfg) -> float:
    """Training FLOPs of one sequence or image (see the module docstring)."""
    model = meta_model(cfg)
    per_token, _ = recompute_macs(cfg, model)
    per_sample = 0.0
    if cfg.model.family == "dit":
        ada_blocks = sum(p.numel() for n, p in model.layers.named_parameters() if "adaLN_modulation" in n)
        per_token += sum(p.numel() for p in model.x_embedder.parameters()) - ada_blocks
        per_sample = sum(p.numel() for n, p in model.named_parameters() if "adaLN_modulation" in n) + \
            sum(p.numel() for p in model.t_embedder.parameters())
    return 6.0 * (tokens_per_sample(cfg) * per_token + per_sample)


def plan_bytes(cfg) -> int:
    """launch/plan.py's memory estimate for one rank (pp 1): weights, gradients, AdamW moments (and
    the DiT's EMA), activations."""
    total, _, routed = param_breakdown(cfg)
    return sum(memory_per_rank(cfg, total, routed).values())


def fit_batch(preset: str, mode: str, batch: int, device, seq_len: int = 0) -> int:
    """The largest batch <= `batch` (halving) whose planned memory fits the device's share."""
    if device.type != "cuda":
        return batch
    capacity = torch.cuda.get_device_properties(device).total_memory * MEMORY_SHARE
    while batch > 1 and plan_bytes(make_config(preset, mode, batch, device, seq_len)) > capacity:
        batch //= 2
    return batch


def _time_steps(trainer, batches, first_step: int, warmup: int, steps: int, device) -> tuple[list[float], int]:
    """Wall seconds of `steps` optimizer steps after `warmup`, and the peak device memory then."""
    times = []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        trainer.stepper(batches, first_step + i)  # returns loss.item(): the step has finished
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times, peak


def _phase(cfg, trainer, batches, first_step, warmup, steps, device, peak, label, log) -> dict:
    times, peak_mem = _time_steps(trainer, batches, first_step, warmup, steps, device)
    step_s = statistics.median(times)
    samples = cfg.train.micro_batch_size
    flops = flops_per_sample(cfg) * samples
    out = {"step_ms": round(step_s * 1e3, 2), "samples_per_s": round(samples / step_s, 2),
           "tokens_per_s": round(samples * tokens_per_sample(cfg) / step_s, 1),
           "tflops": round(flops / step_s / 1e12, 2), "mfu": round(flops / step_s / peak, 4) if peak else None,
           "peak_memory_gib": round(peak_mem / 2**30, 2) if peak_mem is not None else None,
           "plan_memory_gib": round(plan_bytes(cfg) / 2**30, 2), "steps_timed": steps}
    log(f"    {label:22s} {out['step_ms']:9.1f} ms/step  {out['tokens_per_s']:12,.0f} tok/s  "
        f"MFU {out['mfu'] if out['mfu'] is not None else 'n/a'}  peak {out['peak_memory_gib']} GiB "
        f"(plan {out['plan_memory_gib']} GiB)")
    return out


def profile_step(trainer, batches, step: int, label: str, path: str, rows: int = 25) -> None:
    """One more step under torch.profiler; its kernels by self device time appended to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        trainer.stepper(batches, step)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"== {label}\n" + prof.key_averages().table(sort_by=key, row_limit=rows,
                                                             max_name_column_width=70) + "\n\n")


def train_run(cfg, task, device, compile_backend: str | None, deadline: float, compile_reserve_s: float,
              smoke: bool, log, profile_to: str | None = None) -> dict:
    """Eager steps, then (if a backend is given and time is left) compiled steps, on one Trainer;
    with `profile_to`, one profiled step after the last phase that ran."""
    from trainer.loop import Trainer

    warmup, steps = (1, 1) if smoke else (2, 5)
    peak = peak_flops(device)
    result = {"micro_batch_size": cfg.train.micro_batch_size, "tokens_per_step": cfg.train.micro_batch_size
              * tokens_per_sample(cfg)}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as run_dir:
        start = time.monotonic()
        trainer = Trainer(cfg, run_dir, task=task)
        result["build_s"] = round(time.monotonic() - start, 1)
        batches = task.batches()
        mode = cfg.parallel.activation_checkpoint
        # What the experts run on under bf16 autocast (the steps' own, cached choice): `auto` falls
        # back to the loop if the grouped GEMM's probe fails, which the numbers alone would not show.
        result["expert_backend"] = select_backend(cfg.moe.backend, device, torch.bfloat16, cfg.model.d_model,
                                                  cfg.moe.expert_ffn_dim)
        result["eager"] = _phase(cfg, trainer, batches, 1, warmup, steps, device, peak, f"{mode} eager", log)
        if compile_backend is None:
            result["compiled"] = {"skipped": "torch.compile not used here"}
        elif time.monotonic() + compile_reserve_s > deadline:
            result["compiled"] = {"skipped": "out of the part's time budget"}
        else:
            model = trainer.unwrapped_model
            start = time.monotonic()
            result["compiled_modules"] = compile_blocks(model, checkpointed_modules(model, cfg.parallel),
                                                        compile_backend)
            if hasattr(task, "loss_fn"):  # what parallel.compile does to the LM loss
                task.loss_fn = compiled_loss(dataclasses.replace(cfg.parallel, compile=True,
                                                                 compile_backend=compile_backend))
            try:
                result["compiled"] = _phase(cfg, trainer, batches, 1 + warmup + steps, warmup + 1, steps, device,
                                            peak, f"{mode} compiled", log)
                result["compiled"]["compile_and_warmup_s"] = round(time.monotonic() - start - steps
                                                                   * result["compiled"]["step_ms"] / 1e3, 1)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - a compiler failure: the eager numbers stand
                result["compiled"] = {"error": one_line(e)}
                log(f"    {mode} compiled failed: {result['compiled']['error']}")
        if profile_to:
            kind = "compiled" if "step_ms" in result["compiled"] else "eager"
            profile_step(trainer, batches, 100, f"{cfg.model.preset} {mode} {kind}, batch "
                         f"{cfg.train.micro_batch_size}", profile_to)
        del trainer, batches
    return result


def _run_fitted(preset: str, mode: str, batch: int, seq_len: int, task_cls, device, compile_backend, deadline,
                smoke: bool, log, profile_to: str | None = None) -> dict:
    """`train_run` at the largest batch the plan fits, halved once more on running out of memory."""
    batch = fit_batch(preset, mode, batch, device, seq_len)
    for attempt in range(2):
        cfg = make_config(preset, mode, batch, device, seq_len)
        try:
            return train_run(cfg, task_cls(cfg, device), device, compile_backend, deadline,
                             0.0 if smoke else COMPILE_RESERVE_S, smoke, log, profile_to)
        except torch.cuda.OutOfMemoryError:
            release(device)
            if attempt or batch == 1:
                raise
            log(f"    out of memory at batch {batch}; again at {batch // 2}")
            batch //= 2
        finally:
            release(device)


def run_llm(device: torch.device, smoke: bool, deadline: float, compile_backend: str | None, log,
            modes: tuple[str, ...] = MODES, profile_to: str | None = None) -> dict:
    """Part 3: each activation-checkpointing mode of `modes`, eager then compiled (see the module
    docstring)."""
    preset, seq_len, batch = ("tiny", 64, 2) if smoke else ("olmoe_2b_16e", 4096, 8)
    cfg = make_config(preset, "none", 1, device, seq_len)
    total, active = param_breakdown(cfg)[:2]
    out = {"preset": preset, "seq_len": seq_len, "params_total": total, "params_active": active,
           "train_flops_per_token": round(flops_per_sample(cfg) / seq_len),
           "peak_tflops": peak_flops(device) and peak_flops(device) / 1e12, "runs": {}}
    log(f"  llm {preset}: {total / 1e9:.2f}B total, {active / 1e9:.2f}B active, seq {seq_len}")
    for mode in modes:
        if time.monotonic() > deadline:
            out["runs"][mode] = {"skipped": "out of the part's time budget"}
            continue
        try:
            out["runs"][mode] = _run_fitted(preset, mode, batch, seq_len, SyntheticLM, device, compile_backend,
                                            deadline, smoke, log, profile_to)
        except Exception as e:  # noqa: BLE001 - the next mode still runs
            out["runs"][mode] = {"error": one_line(e)}
            log(f"    {mode} failed: {out['runs'][mode]['error']}")
    phases = [(mode, kind, run[kind]) for mode, run in out["runs"].items() for kind in ("eager", "compiled")
              if isinstance(run.get(kind), dict) and "tokens_per_s" in run[kind]]
    if phases:
        mode, kind, best = max(phases, key=lambda p: p[2]["tokens_per_s"])
        out["best"] = {"mode": mode, "compiled": kind == "compiled", "tokens_per_s": best["tokens_per_s"],
                       "mfu": best["mfu"]}
        out["target_mfu_ge_0.40"] = best["mfu"] >= 0.40 if best["mfu"] is not None else None
    return out


def run_dit(device: torch.device, smoke: bool, deadline: float, compile_backend: str | None, log,
            profile_to: str | None = None) -> dict:
    """Part 4: a DiT-MoE-XL/2 training step (256 tokens an image), eager then compiled."""
    preset, batch = ("dit_tiny_moe", 4) if smoke else ("dit_moe_XL_8E2A", 32)
    cfg = make_config(preset, "none", 1, device)
    total, active = param_breakdown(cfg)[:2]
    log(f"  dit {preset}: {total / 1e9:.2f}B total, {active / 1e9:.2f}B active, "
        f"{tokens_per_sample(cfg)} tokens an image")
    run = _run_fitted(preset, "none", batch, 0, SyntheticImages, device, compile_backend, deadline, smoke, log,
                      profile_to)
    return {"preset": preset, "params_total": total, "params_active": active,
            "train_flops_per_image": round(flops_per_sample(cfg)), **run}


def release(device) -> None:
    """Free what a run left (graphs, compiled code, cached blocks) before the next one."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
