"""Prune runs in the trainer: compress a checkpoint of ours, evaluate it before and after, save
the result as step 0 of the run, then (train.steps > 0) let the ordinary loop fine-tune it.

    preflight_prune(cfg)                   launcher preflight: every checkpoint the run reads holds
                                           this model's tensors (DCP metadata only, no tensor read)
    resumed_prune_config(cfg, path)        a rerun: the compressed model's shapes from its checkpoint
    prune_model(model, cfg, task, mesh, run_dir) -> PruneResult
                                           load, evaluate, calibrate, compress, evaluate, on the
                                           whole model before expert/pipeline/data parallelism
    finish_prune(trainer, log)             step 0: checkpoint, RUN_DIR/prune_report.json, metrics

Methods (prune.method; the mechanisms are models/pruning):
    experts    drop the lowest-scoring experts (prune.criterion) of every MoE layer, per layer or
               under a global budget; kept counts are multiples of parallel.ep
    merge      merge similar experts (router-logit similarity) into the kept count per layer
    dare/darex the fine-tuned checkpoint's delta to prune.reference: DARE (drop p, rescale 1/(1-p))
               or DAREx-q (rescale 1/q; q tuned on one calibration batch, errors summed over dp)
    ties       TIES merge of prune.checkpoint and prune.ties_checkpoints, deltas to prune.reference
    magnitude  zero the smallest expert weights (unstructured share, or N:M)

Every rank holds the whole model here: it loads the checkpoint itself (no collective), scores its
own calibration batches (the recipe's training data; the data position is restored afterwards, so
training still starts at batch 0), and the statistics are summed over dp in one all-reduce; rank 0's
decision is broadcast, so every rank compresses alike. A DiT is compressed from its EMA weights (what
samples; the run's EMA then starts from the compressed weights).

A rerun of the same command finds the run's checkpoints and resumes from them: nothing is pruned
twice. The compressed checkpoint's config is an ordinary one (prune.method none; the provenance is in
prune_report.json and the checkpoint's run state), so it loads anywhere a checkpoint of ours does
(`--resume`, `model.init_from`, `peft.base`, `model.upcycle_from` for dense ones) at any ep dividing
its expert counts.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import models
from models.moe import moe_layers
from models.pruning import (calibrate, choose_kept, dare_state, expert_scores, keep_counts, last_hidden,
                            magnitude_prune_experts, merge_experts, naee_kept, parse_nm, prune_experts,
                            pruned_moe_config, skip_betas, tune_darex_q)
from parallel import all_reduce_sum
from trainer.adapt.config import PruneConfig, prune_checkpoints
from trainer.adapt.prune_eval import evaluate
from trainer.adapt.sources import check_full_model, require_checkpoint
from trainer.checkpoint import check_stored_shapes, read_model_state
from trainer.config import Config, ConfigError, validate
from trainer.atomic import write_atomic
from trainer.recipe import checkpoint_config

REPORT = "prune_report.json"


@dataclass
class PruneResult:
    """What a prune run hands to the trainer."""

    cfg: Config  # the compressed model's config (prune section cleared: an ordinary run from here)
    report: dict  # RUN_DIR/prune_report.json
    after_extra: dict = field(default_factory=dict)  # the family's evaluation after (DiT: eval/acc, eval/fd)

    @property
    def summary(self) -> str:
        r = self.report
        before, after = r["before"], r["after"]
        line = f"prune {r['method']}: val loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}"
        if "fd" in after and "fd" in before:
            line += f", FD {before['fd']:.3f} -> {after['fd']:.3f}, class accuracy {before['acc']:.3f} -> {after['acc']:.3f}"
        if "experts_after" in r:
            line += f"; experts per MoE layer {r['experts_before']} -> {r['experts_after']}"
        if "params_after" in r:
            line += (f"; params {r['params_before']['total']:,} -> {r['params_after']['total']:,} total, "
                     f"{r['params_before']['active']:,} -> {r['params_after']['active']:,} active")
        return line

    def metrics(self) -> dict:
        """The step-0 line of metrics.jsonl: prune/<before|after|reference>_<metric>."""
        out = {}
        for phase in ("before", "after", "reference"):
            for k, v in self.report.get(phase, {}).items():
                out[f"prune/{phase}_{k}"] = v
        return out


# ---------------------------------------------------------------------------------------------
# Checkpoints read by a prune run


def preflight_prune(cfg: Config) -> None:
    """Launcher preflight of a fresh prune run: each checkpoint it reads is a full model of ours
    with exactly this recipe's tensors (names and shapes, from the DCP metadata). Raises
    `ConfigError` (one line naming the key)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in models.build_model(cfg.model, cfg.moe).state_dict().items()}
    hint = " (the recipe's model and moe sections must describe the checkpoint's model)"
    for key, path in prune_checkpoints(cfg.prune):
        require_checkpoint(path, key)
        check_full_model(path, key)
        check_stored_shapes(key, path, expected, hint)


def resumed_prune_config(cfg: Config, path: str) -> Config:
    """A prune recipe rerun (or resumed from `path`): the model is the compressed one, so its
    expert counts, top_k and skip betas come from the checkpoint's config; the prune section is
    cleared (nothing is compressed twice)."""
    saved = checkpoint_config(path, path)
    arch = {k: getattr(saved.moe, k) for k in ("num_experts", "top_k", "layer_num_experts", "skip_beta")}
    out = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **arch), prune=PruneConfig())
    validate(out)
    return out


def read_weights(path: str, family: str) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of checkpoint `path` on the CPU, whole: the model's, with a DiT's parameters
    replaced by their EMA when the checkpoint has one (the weights that sample).

    Returns:
        (state dict with the model's keys, "ema" or "model").
    """
    state = read_model_state(path)
    if family == "dit":
        ema = read_model_state(path, section="ema")
        ema.pop("num_updates", None)
        if ema:
            if missing := sorted(set(ema) - set(state)):
                raise ConfigError(f"{path}: EMA tensor {missing[0]} is not a model tensor")
            state.update(ema)
            return state, "ema"
    return state, "model"


# ---------------------------------------------------------------------------------------------
# Compression


def _broadcast(obj, mesh):
    """Rank 0's value on every rank (the same decision everywhere, whatever the reduction order)."""
    if not (dist.is_initialized() and mesh.world_size > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _calibration_batches(task, n: int) -> list:
    """The first n training micro batches of this rank; the data position is restored, so the
    run's training (the recovery fine-tune) still starts at batch 0."""
    data = task.data
    saved = data.state_dict()
    batches = data.train_batches()
    out = [task.to_device(next(batches)) for _ in range(n)]
    data.load_state_dict(saved)
    return out


def _calibrate(model, task, batches, mesh, criteria):
    """Routing statistics over `batches` (eval mode, no grad), summed over dp."""
    # eval_loss: a DiT noises at fixed evaluation keys, so no training RNG is consumed.
    calib = calibrate(model, lambda i: task.eval_loss(model, batches[i], i), len(batches), criteria)
    calib.all_reduce(lambda flat: all_reduce_sum(flat, mesh.dp_group))
    return calib


def _experts(model, cfg, task, mesh, batches, report) -> list[int]:
    """experts / merge: returns the kept count per MoE layer (the model is sliced in place)."""
    p, ep = cfg.prune, cfg.parallel.ep
    Es = [layer.router.num_experts for layer in moe_layers(model)]
    criterion = p.criterion if p.method == "experts" else "frequency"
    calib = _calibrate(model, task, batches, mesh, {criterion} - {"router_norm", "random"})
    report["calib_tokens_per_layer"] = int(calib.num_tokens[0].item())
    report["routed_share_before"] = [(load_E / load_E.sum().clamp_min(1)).tolist() for load_E in calib.loads]
    if p.method == "merge":
        # Every rank holds the same weights and summed statistics, so each merges alike; checked.
        groups = merge_experts(model, calib, keep_counts(Es, p.sparsity, 1, ep))
        if _broadcast(groups, mesh) != groups:
            raise RuntimeError(f"rank {mesh.rank}: expert merging chose other groups than rank 0")
        report["groups"] = groups
        return [len(g) for g in groups]
    if criterion == "naee":
        # Every candidate subset's error summed over the ranks' own rows: one choice everywhere.
        kept = naee_kept(model, calib, keep_counts(Es, p.sparsity, 1, ep),
                         all_reduce=lambda t: all_reduce_sum(t, mesh.dp_group))
    else:
        reference = read_weights(p.reference, cfg.model.family)[0] if criterion == "router_norm" else None
        scores = expert_scores(model, calib, criterion, reference_state=reference, seed=p.seed)
        report["scores"] = [s.tolist() for s in scores]
        kept = choose_kept(scores, p.sparsity, p.budget, min_keep=1, multiple_of=ep)
    kept = _broadcast(kept, mesh)
    prune_experts(model, kept)
    report["kept"] = kept
    return [len(k) for k in kept]


def _delta(model, cfg, task, mesh, batches, report) -> None:
    """dare / darex / ties: the fine-tuned weights (loaded) against prune.reference, in place."""
    p = cfg.prune
    ft_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}  # not aliases of the live weights
    base_sd = read_weights(p.reference, cfg.model.family)[0]
    base_sd = {k: v.to(ft_sd[k].device) for k, v in base_sd.items()}
    if p.method == "ties":
        others = [read_weights(path, cfg.model.family)[0] for path in p.ties_checkpoints]
        from models.pruning import ties_merge

        merged = ties_merge(base_sd, [ft_sd] + [{k: v.to(ft_sd[k].device) for k, v in o.items()} for o in others],
                            p.ties_density, p.ties_lambda)
        model.load_state_dict(merged)
        report["ties"] = {"num_finetunes": 1 + len(others), "density": p.ties_density, "lambda": p.ties_lambda}
        return
    q = None  # DARE: 1 - p
    if p.method == "darex":
        q = p.darex_q or None
        if q is None:
            batch = batches[0]
            hidden_fn = lambda: last_hidden(model, lambda: task.eval_loss(model, batch, 0))  # noqa: E731
            model.eval()
            _, errors = tune_darex_q(model, base_sd, ft_sd, p.drop_rate, hidden_fn, seed=p.seed)
            # Each rank measured its own batch: add the errors up, so every rank picks the same q.
            qs = sorted(errors)
            summed = all_reduce_sum(torch.tensor([errors[v] for v in qs], dtype=torch.float64,
                                                 device=next(model.parameters()).device), mesh.dp_group)
            q = _broadcast(qs[int(torch.argmin(summed))], mesh)
            report["darex_q_errors"] = dict(zip([round(v, 6) for v in qs], summed.tolist()))
    compressed = dare_state(base_sd, ft_sd, p.drop_rate, q=q, seed=p.seed)
    model.load_state_dict(compressed)
    kept = total = 0
    for k, v in compressed.items():
        if k in base_sd and torch.is_floating_point(v) and base_sd[k].shape == v.shape:
            changed = ft_sd[k] != base_sd[k]
            kept += int(((v != base_sd[k]) & changed).sum())
            total += int(changed.sum())
    report["delta"] = {"drop_rate": p.drop_rate, "q": q if q is not None else 1.0 - p.drop_rate,
                       "kept_fraction": kept / max(total, 1)}


@torch.no_grad()
def prune_model(model: nn.Module, cfg: Config, task, mesh, run_dir: str) -> PruneResult:
    """Compress the whole (not yet sharded, split or wrapped) `model` as cfg.prune says.

    Loads prune.checkpoint into `model`, evaluates it (and the reference of a delta method),
    compresses it in place (expert tensors sliced for experts/merge), evaluates again.

    Returns:
        PruneResult: the compressed model's config, the report, the evaluation after.
    """
    p = cfg.prune
    start = time.perf_counter()
    state, weights = read_weights(p.checkpoint, cfg.model.family)
    model.load_state_dict(state)
    del state
    report: dict = {"method": p.method, "checkpoint": p.checkpoint, "weights": weights,
                    "prune": dataclasses.asdict(p), "calib_batches_per_rank": p.calib_batches, "dp": mesh.dp}
    total_before, active_before = models.param_counts(model, cfg.moe)
    report["params_before"] = {"total": total_before, "active": active_before}
    report["before"], _ = evaluate(model, cfg, task, mesh, run_dir, "before")
    new_cfg = copy.deepcopy(cfg)
    batches = _calibration_batches(task, p.calib_batches)
    if p.method in ("dare", "darex", "ties"):
        compressed = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(read_weights(p.reference, cfg.model.family)[0])
        report["reference"], _ = evaluate(model, cfg, task, mesh, run_dir, "reference")
        model.load_state_dict(compressed)
        del compressed
        _delta(model, cfg, task, mesh, batches, report)
    elif p.method == "magnitude":
        nm = parse_nm(p.nm) if p.nm else None
        report["magnitude"] = {"sparsity": None if nm else p.sparsity, "nm": p.nm or None,
                               "expert_zero_fraction": magnitude_prune_experts(model, p.sparsity, nm)}
    else:
        report["experts_before"] = [layer.router.num_experts for layer in moe_layers(model)]
        counts = _experts(model, cfg, task, mesh, batches, report)
        new_cfg.moe = pruned_moe_config(cfg.moe, counts)
        report["experts_after"] = counts
        if p.dynamic_skip:
            # β from the compressed model's own routing (its weights renormalise over fewer experts).
            betas = skip_betas(_calibrate(model, task, batches, mesh, ()))
            if new_cfg.moe.top_k >= 2:
                new_cfg.moe.skip_beta = betas
                for layer, beta in zip(moe_layers(model), betas):
                    layer.router.skip_beta = beta
            report["skip_beta"] = new_cfg.moe.skip_beta
    new_cfg.prune = PruneConfig()
    try:
        validate(new_cfg)
    except ConfigError as e:
        raise ConfigError(f"prune: the compressed model's config is invalid: {e}") from None
    total_after, active_after = models.param_counts(model, new_cfg.moe)
    report["params_after"] = {"total": total_after, "active": active_after}
    report["after"], after_extra = evaluate(model, cfg, task, mesh, run_dir, "after")
    report["seconds"] = round(time.perf_counter() - start, 1)
    model.train()
    return PruneResult(new_cfg, report, after_extra)


# ---------------------------------------------------------------------------------------------
# Step 0 of a prune run


def finish_prune(trainer, log) -> tuple[float, dict]:
    """After the trainer is set up on the compressed model: write it as checkpoint step 0 (an
    ordinary checkpoint with the compressed config; resumable, so a rerun trains on from it),
    RUN_DIR/prune_report.json and the step-0 metrics line.

    Returns:
        (val loss after compression, the family's evaluation after), the run's result when it
        trains no further (train.steps 0).
    """
    from trainer.checkpoint import save_checkpoint

    result, cfg = trainer.prune, trainer.cfg
    if cfg.checkpoint.enabled:
        path = save_checkpoint(trainer.run_dir, 0, trainer.model, trainer.optimizer, trainer.scheduler, trainer.data,
                               cfg, trainer.mesh, extra_state=trainer.extra_state(),
                               run_state={**trainer.run_state(), "pruned_from": result.report["checkpoint"],
                                          "prune_method": result.report["method"]})
        result.report["checkpoint_out"] = path
    else:
        result.report["checkpoint_out"] = None
    if trainer.mesh.is_main:
        write_atomic(os.path.join(trainer.run_dir, REPORT), lambda f: json.dump(result.report, f, indent=1),
                     binary=False)
    log.log({"step": 0, **result.metrics()})
    where = result.report["checkpoint_out"] or "checkpoint.enabled false: not saved"
    log.print(f"{result.summary} ({where}; {os.path.join(trainer.run_dir, REPORT)})")
    return result.report["after"]["val_loss"], result.after_extra
