"""The Trainer's construction, as named steps (trainer/loop.py calls them in this order):

    build        the model from model/moe on the meta device: nothing allocated  (models/)
    adapt        structural transforms, still on meta: PEFT adapters (peft.*); a fresh prune
                 run instead compresses its checkpoint on the whole, materialised model
    parallelize  expert shards, pipeline stages, FSDP shards, still on meta    (parallel/)
    materialize  memory for this rank's share only, initial values from train.seed, the same
                 on any layout (models/init.py, parallel/materialize.py)
    load         what the run starts from, read for this rank's share: model.init_from,
                 model.upcycle_from, peft.base (then ESFT's expert selection)  (trainer/adapt/)
    wrap         DDP around the model (parallel.data_parallel ddp, pp 1): it needs real tensors
    optimize     the optimizer and lr schedule (DeepSpeed's, or AdamW), the DiT's EMA
    resume       a checkpoint (trainer/checkpoint.py), in trainer/loop.py

Every step runs on every rank alike (same seed, same sources read), so the ranks start from
identical weights without a broadcast, and no rank ever holds the whole model (but a fresh prune
run, which compresses a checkpoint it reads whole).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import models
from models.moe import moe_layers, set_aux_loss_scale
from models.peft import apply_peft, count_parameters, partially_frozen_parameters
from parallel import ParallelMesh, apply_expert_parallel, parallelize, parallelize_pipeline, unwrap
from parallel.config import pp_microbatches
from parallel.data_parallel import wrap_data_parallel
from parallel.materialize import materialize
from trainer.adapt.peft import PeftState
from trainer.adapt.prune import PruneResult
from trainer.config import Config
from trainer.ema import EMA
from trainer.optim import build_optimizer, build_scheduler


def build(cfg: Config, mesh: ParallelMesh, whole: bool = False) -> nn.Module:
    """The model on the meta device, or (`whole`) materialised on this rank's device from train.seed."""
    with torch.device(mesh.device if whole else "meta"):
        model = models.build_model(cfg.model, cfg.moe, seed=cfg.train.seed)
    # The aux-loss gradient of one forward: 1 / (forwards per optimizer step), as the LM loss.
    forwards = cfg.train.grad_accum_steps * (pp_microbatches(cfg.parallel) if mesh.pp > 1 else 1)
    set_aux_loss_scale(model, 1.0 / forwards)
    return model


@dataclass
class Adapted:
    """What `adapt` did: the config of the adapted model, and the results the run reports."""

    cfg: Config  # a prune run's is the compressed model's
    prune: PruneResult | None
    peft: PeftState | None  # lora / perft / full: the adapters added (ESFT selects after `load`)


def adapt(model: nn.Module, cfg: Config, task, mesh: ParallelMesh, run_dir: str) -> Adapted:
    """The structural transforms of the recipe on the whole model, before it is split: a fresh
    prune run's compression (on the materialised whole model), PEFT adapters (on meta; ESFT's
    selection needs the base's weights and comes after `load`)."""
    prune = peft = None
    if cfg.prune.method != "none":  # the checkpoint compressed on the whole model (trainer/adapt/prune.py)
        from trainer.adapt.prune import prune_model

        prune = prune_model(model, cfg, task, mesh, run_dir)
        cfg = prune.cfg
    if cfg.peft.method not in ("none", "esft"):
        summary = apply_peft(model, cfg.peft)
        trainable, total = count_parameters(model)  # of the whole model, before it is split
        peft = PeftState(summary, trainable, total, None)
    return Adapted(cfg, prune, peft)


@dataclass
class Parallelized:
    """This rank's part of the model. `model` holds this rank's parameters: the model (FSDP-sharded,
    or DDP-wrapped after `wrap`), the pipeline's stage module, or the expert-sharded model
    DeepSpeed wraps."""

    model: nn.Module
    pipeline: object | None  # parallel.pipeline.Pipeline when parallel.pp > 1


def parallelize_model(model: nn.Module, cfg: Config, mesh: ParallelMesh, task) -> Parallelized:
    """Expert parallelism, then pipeline stages or FSDP (parallel/apply.py); on meta or materialised."""
    par = cfg.parallel
    if mesh.pp > 1:  # this rank keeps its stages only
        pipeline = parallelize_pipeline(model, mesh, par, task.pipeline_loss_fn,
                                        micro_batch_size=cfg.train.micro_batch_size,
                                        grad_accum_steps=cfg.train.grad_accum_steps, seq_len=cfg.data.seq_len)
        return Parallelized(pipeline.module, pipeline)
    if cfg.train.engine == "deepspeed":  # experts sharded here; DeepSpeed wraps the rest, not DDP
        return Parallelized(apply_expert_parallel(model, mesh, par.ep_overlap, par.ep_chunks), None)
    return Parallelized(parallelize(model, mesh, par), None)


def materialize_share(model: nn.Module, parts: Parallelized, cfg: Config, mesh: ParallelMesh) -> None:
    """Memory and initial values for this rank's share (a no-op for a materialised model)."""
    if any(p.is_meta for p in parts.model.parameters()):
        materialize(model, parts.model, mesh.device, cfg.train.seed)


def wrap(parts: Parallelized, cfg: Config, mesh: ParallelMesh) -> Parallelized:
    """DDP around a pp-1 native run's model (FSDP, pipeline stages and DeepSpeed need none)."""
    if parts.pipeline is not None or mesh.fsdp or cfg.train.engine == "deepspeed":
        return parts
    return Parallelized(wrap_data_parallel(unwrap(parts.model), mesh), None)


@dataclass
class Optimization:
    """What steps the weights: `optimizer` is what checkpoints save beside the model (DeepSpeed:
    the optimizer of the experts outside ZeRO, or ()); `engine` is DeepSpeed's, or None."""

    optimizer: object
    scheduler: object
    engine: object | None
    ema: EMA | None


def optimize(model: nn.Module, cfg: Config, mesh: ParallelMesh) -> Optimization:
    """The optimizer and lr schedule of this rank's parameters (`model` unwrapped), and the DiT's
    EMA of them (for sampling, checkpointed with them)."""
    # ESFT's expert tensors hold frozen rows: no weight decay, so those rows never move.
    no_decay = partially_frozen_parameters(model)
    engine = None
    if cfg.train.engine == "deepspeed":
        from trainer.adapt.ds_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(model, cfg, mesh, no_decay_params=no_decay)
        optimizer, scheduler = engine.expert_optimizer or (), engine.scheduler
    else:
        optimizer = build_optimizer(model, cfg.optim, no_decay_params=no_decay)
        scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.optim)
    ema = EMA(model, cfg.diffusion.ema_decay) if cfg.model.family == "dit" else None
    return Optimization(optimizer, scheduler, engine, ema)


@dataclass
class Built:
    """What `construct` made: this rank's share of the model and what steps it."""

    cfg: Config  # a prune run's is the compressed model's
    model: nn.Module  # the whole model (on meta but for a fresh prune run): names, counts, structure
    parts: Parallelized
    optimization: Optimization
    param_counts: tuple[int, int]  # (total, active per token) of the whole model
    prune: PruneResult | None
    peft: PeftState | None
    lines: list[str]  # for the log (rank 0 prints them)


def construct(cfg: Config, mesh: ParallelMesh, task, run_dir: str, resume_path: str | None) -> Built:
    """The steps above, in order, on this rank: what every run (and benchmarks/scale_drill.py) builds."""
    from trainer.adapt.load import load_sources
    from trainer.adapt.peft import prepare_peft

    fresh_prune = cfg.prune.method != "none"  # compresses a checkpoint: the whole model, materialised
    model = build(cfg, mesh, whole=fresh_prune)
    adapted = adapt(model, cfg, task, mesh, run_dir)
    cfg = adapted.cfg
    counts = models.param_counts(model, cfg.moe)  # before ep shards the experts
    parts = parallelize_model(model, cfg, mesh, task)
    materialize_share(model, parts, cfg, mesh)
    lines = load_sources(parts.model, cfg, mesh, resume_path)
    peft = adapted.peft
    if cfg.peft.method != "none":  # base weights (also on resume: PEFT checkpoints hold none)
        peft, base_line = prepare_peft(parts.model, cfg, task, mesh, resume_path, adapted.peft)
        if cfg.peft.init_adapter and resume_path is None:  # on resume the checkpoint holds the adapters
            from trainer.adapt.peft_interop import load_init_adapter  # a peft library adapter (lora)

            base_line += "; " + load_init_adapter(parts.model, cfg)
        lines += [base_line, peft.summary]
    parts = wrap(parts, cfg, mesh)
    return Built(cfg, model, parts, optimize(unwrap(parts.model), cfg, mesh), counts, adapted.prune, peft, lines)


def trains_aux_free_bias(model: nn.Module, cfg: Config) -> bool:
    """The MoE layers have an aux-loss-free selection bias and it is trained: a PEFT run that
    freezes the routers keeps the base's routing, selection bias included."""
    routing_frozen = cfg.peft.method in ("lora", "perft", "esft") and not cfg.peft.train_router
    return any(layer.expert_bias_E is not None for layer in moe_layers(model)) and not routing_frozen
