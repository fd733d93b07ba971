"""The Trainer's construction, as named steps (trainer/loop.py calls them in this order):

    build        the model from model/moe, with its aux-loss scale          (models/)
    adapt        the recipe's whole-model transforms, before anything is sharded:
                 prune (prune.*), upcycle (model.upcycle_from), init (model.init_from),
                 PEFT (peft.*)                                             (trainer/adapt/)
    parallelize  pipeline stages (parallel.pp), or expert parallelism + DDP, or expert
                 parallelism under DeepSpeed (train.engine)                (parallel/)
    optimize     the optimizer and lr schedule (DeepSpeed's, or AdamW), the DiT's EMA
    load         resume from a checkpoint (trainer/checkpoint.py), in trainer/loop.py

Every step runs on every rank alike (same seed, same sources read), so the ranks start from
identical weights without a broadcast.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import models
from models.moe import moe_layers, set_aux_loss_scale
from models.peft import partially_frozen_parameters
from parallel import ParallelMesh, apply_expert_parallel, parallelize, parallelize_pipeline
from parallel.config import pp_microbatches
from trainer.adapt.peft import PeftState, prepare_peft
from trainer.adapt.prune import PruneResult, prune_model
from trainer.config import Config
from trainer.ema import EMA
from trainer.optim import build_optimizer, build_scheduler


def build(cfg: Config, mesh: ParallelMesh) -> nn.Module:
    """The whole model on this rank's device, initialised from train.seed."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    with torch.device(mesh.device):
        model = models.build_model(cfg.model, cfg.moe)
    # The aux-loss gradient of one forward: 1 / (forwards per optimizer step), as the LM loss.
    forwards = cfg.train.grad_accum_steps * (pp_microbatches(cfg.parallel) if mesh.pp > 1 else 1)
    set_aux_loss_scale(model, 1.0 / forwards)
    return model


@dataclass
class Adapted:
    """What `adapt` did: the config of the adapted model, and the results the run reports."""

    cfg: Config  # a prune run's is the compressed model's
    prune: PruneResult | None
    peft: PeftState | None
    lines: list[str]  # for the log (rank 0 prints them)


def adapt(model: nn.Module, cfg: Config, task, mesh: ParallelMesh, run_dir: str,
          resume_path: str | None) -> Adapted:
    """The whole-model transforms of the recipe, in place, before experts are sharded, stages
    split or an optimizer holds the parameters: every layout then starts from the same weights."""
    prune = peft = None
    lines = []
    if cfg.prune.method != "none":  # the checkpoint compressed on the whole model (trainer/adapt/prune.py)
        prune = prune_model(model, cfg, task, mesh, run_dir)
        cfg = prune.cfg
    if resume_path is None and cfg.model.upcycle_from:  # a fresh MoE run from a dense checkpoint
        from trainer.adapt.upcycle import upcycle_into

        lines.append(upcycle_into(model, cfg.model.upcycle_from, granularity=cfg.model.upcycle_granularity,
                                  seed=cfg.train.seed))
    elif resume_path is None and cfg.model.init_from:  # a fresh run from an HF model or ours
        from trainer.adapt.hf_bridge import init_model_from

        lines.append(init_model_from(model, cfg.model.init_from))
    if cfg.peft.method != "none":  # base weights, (ESFT) expert selection, adapters
        peft, base_line = prepare_peft(model, cfg, task, mesh, resume_path)
        lines += [base_line, peft.summary]
    return Adapted(cfg, prune, peft, lines)


@dataclass
class Parallelized:
    """This rank's part of the model. `model` holds this rank's parameters: DDP-wrapped, the
    pipeline's stage module, or the expert-sharded model DeepSpeed wraps."""

    model: nn.Module
    pipeline: object | None  # parallel.pipeline.Pipeline when parallel.pp > 1


def parallelize_model(model: nn.Module, cfg: Config, mesh: ParallelMesh, task) -> Parallelized:
    """Expert parallelism, then pipeline stages or data-parallel wrapping (parallel/apply.py)."""
    par = cfg.parallel
    if mesh.pp > 1:  # this rank keeps its stages only
        pipeline = parallelize_pipeline(model, mesh, par, task.pipeline_loss_fn,
                                        micro_batch_size=cfg.train.micro_batch_size,
                                        grad_accum_steps=cfg.train.grad_accum_steps, seq_len=cfg.data.seq_len)
        return Parallelized(pipeline.module, pipeline)
    if cfg.train.engine == "deepspeed":  # experts sharded here; DeepSpeed wraps the rest, not DDP
        return Parallelized(apply_expert_parallel(model, mesh, par.ep_overlap, par.ep_chunks), None)
    return Parallelized(parallelize(model, mesh, par), None)


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


def trains_aux_free_bias(model: nn.Module, cfg: Config) -> bool:
    """The MoE layers have an aux-loss-free selection bias and it is trained: a PEFT run that
    freezes the routers keeps the base's routing, selection bias included."""
    routing_frozen = cfg.peft.method in ("lora", "perft", "esft") and not cfg.peft.train_router
    return any(layer.expert_bias_E is not None for layer in moe_layers(model)) and not routing_frozen
